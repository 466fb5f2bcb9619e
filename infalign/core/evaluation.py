"""Evaluation statistics (spec section 7): inference-time win rate and KL, with confidence intervals.

Pure math: tensors in, tensors and frozen dataclasses out; nothing here touches a model.

**Inference-time win rate (all-subsets estimator).** For one prompt, with M policy rewards ``a`` and M'
reference rewards ``b``, and a procedure T that serves the response at ascending rank ``j`` (1-based,
``j = procedure.rank + 1``) among a group of ``n``, the estimator is the U-statistic

    W_hat = C(M, n)^-1 C(M', n)^-1  sum_{S, S'}  ( 1{a_T(S) > b_T(S')} + 1/2 1{a_T(S) = b_T(S')} )

over every n-subset S of the policy samples and S' of the reference samples, where ``a_T(S)`` is the
j-th smallest reward in S. It is unbiased for ``W_T(pi > pi_ref | x)`` and has far lower variance than
comparing fresh disjoint groups. It is computed without enumerating subsets: sort each side ascending;
the i-th smallest (1-based) of M values is the j-th smallest of a uniformly random n-subset with
probability

    w_i = C(i-1, j-1) C(M-i, n-j) / C(M, n)            (``subset_weights``)

(BoN_n: j = n; WoN_n: j = 1; sample: n = 1, w_i = 1/M). This holds with ties too, because the j-th
smallest *value* of a subset of sorted positions is the value at its j-th smallest position. Hence

    W_hat = sum_i sum_k w_i w'_k ( 1{a_i > b_k} + 1/2 1{a_i = b_k} )
          = sum_i w_i ( CW'[#{b < a_i}] + CW'[#{b <= a_i}] ) / 2,

with ``CW'`` the cumulative reference weights (``CW'[0] = 0``) and the two counts from ``searchsorted``
(left and right): O((M + M') log(M + M')) per prompt, vectorised over prompts.

**KL.** ``KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]`` at sequence level (nats),
estimated by the Monte-Carlo mean of the log-ratios with its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch

from infalign.core.procedures import Procedure, parse_procedure

__all__ = [
    "KLEstimate",
    "WinRate",
    "all_subsets_win",
    "bootstrap_interval",
    "inference_win_rate",
    "kl_estimate",
    "subset_weights",
]

_BOOTSTRAP_CHUNK = 1 << 22  # resampled prompt indices held at once (32 MiB of int64)


# ---------------------------------------------------------------------------------------------------
# Subset weights


def _subset_weights(m: int, n: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    j = rank + 1
    i = torch.arange(1, m + 1, dtype=torch.float64, device=device)
    valid = (i >= j) & (m - i >= n - j)
    # log C(i-1, j-1) + log C(m-i, n-j) - log C(m, n), with invalid entries clamped then zeroed.
    lg = torch.lgamma
    top = i.clamp(min=j)
    bot = (m - i).clamp(min=n - j)
    log_w = (
        lg(top)
        - lg(top - j + 1)
        + lg(bot + 1)
        - lg(bot - (n - j) + 1)
        - (math.lgamma(j) + math.lgamma(n - j + 1))
        - (math.lgamma(m + 1) - math.lgamma(n + 1) - math.lgamma(m - n + 1))
    )
    w = torch.where(valid, torch.exp(log_w), torch.zeros_like(log_w))
    return w / w.sum()


def subset_weights(m: int, n: int, rank: int) -> torch.Tensor:
    """Probability that the i-th smallest of ``m`` values is served from a random ``n``-subset.

    ``w_i = C(i-1, j-1) C(m-i, n-j) / C(m, n)`` for ``i = 1..m``, ``j = rank + 1`` (0-based ascending
    rank served within a group of n: BoN ``rank = n-1``, WoN ``rank = 0``). Computed in float64 log
    space (lgamma), accurate to ~1e-12 relative for m in the thousands and n up to ~100.

    Returns:
        (m,) float64 tensor summing to 1, indexed by ascending sorted position (0-based).
    """
    for name, v in (("m", m), ("n", n), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"subset_weights: {name} must be an int, got {v!r}")
    if n < 1 or not 0 <= rank < n:
        raise ValueError(f"subset_weights: need n >= 1 and 0 <= rank < n, got n={n}, rank={rank}")
    if m < n:
        raise ValueError(f"subset_weights: need m >= n, got m={m}, n={n}")
    return _subset_weights(m, n, rank)


# ---------------------------------------------------------------------------------------------------
# Win rate


def bootstrap_interval(
    per_prompt: torch.Tensor, confidence: float = 0.95, bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval for the mean of ``per_prompt`` (P,), resampling prompts.

    Draws a (B, P) matrix of prompt indices with replacement (seeded, in chunks bounding memory), takes
    the B resampled means and returns their ``(1-c)/2`` and ``(1+c)/2`` quantiles. With
    ``bootstrap=0`` returns the normal interval ``mean -/+ z * std(ddof=1) / sqrt(P)`` instead.
    """
    _check_confidence(confidence)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0, got {bootstrap!r}")
    x = torch.as_tensor(per_prompt).detach().to("cpu", torch.float64).reshape(-1)
    P = x.numel()
    if P == 0:
        raise ValueError("bootstrap_interval: per_prompt is empty")
    mean = float(x.mean())
    if bootstrap == 0:
        if P < 2:
            return mean, mean
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * float(x.std()) / math.sqrt(P)
        return mean - half, mean + half
    gen = torch.Generator().manual_seed(int(seed))
    rows = max(1, _BOOTSTRAP_CHUNK // P)
    means = torch.cat(
        [
            x[torch.randint(0, P, (min(rows, bootstrap - s), P), generator=gen)].mean(dim=1)
            for s in range(0, bootstrap, rows)
        ]
    )
    alpha = (1 - confidence) / 2
    q = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


@dataclass(frozen=True)
class WinRate:
    """Inference-time win rate of the policy against the reference under one procedure.

    ``mean`` is the average over prompts of ``per_prompt`` (P,) all-subsets estimates; ``low``/``high``
    the interval at ``confidence`` (percentile bootstrap over prompts, or normal when ``bootstrap=0``);
    ``stderr = std(per_prompt, ddof=1) / sqrt(P)`` (NaN for a single prompt).
    """

    mean: float
    low: float
    high: float
    stderr: float
    procedure: str
    num_prompts: int
    num_policy_samples: int
    num_reference_samples: int
    confidence: float
    per_prompt: torch.Tensor = field(repr=False, compare=False)

    def to_dict(self, per_prompt: bool = False) -> dict[str, Any]:
        """JSON-ready scalars; with ``per_prompt=True`` also the per-prompt estimates as a list."""
        d: dict[str, Any] = {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "stderr": self.stderr,
            "procedure": self.procedure,
            "num_prompts": self.num_prompts,
            "num_policy_samples": self.num_policy_samples,
            "num_reference_samples": self.num_reference_samples,
            "confidence": self.confidence,
        }
        if per_prompt:
            d["per_prompt"] = self.per_prompt.tolist()
        return d


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _check_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        idx = [int(v) for v in bad.nonzero()[0]]
        where = f"prompt {idx[0]}, sample {idx[1]}" if len(idx) == 2 else f"index {tuple(idx)}"
        raise ValueError(f"{name}: non-finite value {float(x[tuple(idx)])} at {where}")


def _as_rewards(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be (prompts, samples), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.to(torch.float64)


def _resolve(procedure: Procedure | str) -> tuple[Procedure, int]:
    proc = parse_procedure(procedure)
    try:
        rank = int(proc.rank)
    except NotImplementedError:
        raise ValueError(
            f"procedure {proc} has no sample-level rank; the all-subsets estimator needs a procedure "
            "that serves a fixed order statistic (sample, bon:N, won:N, kth:K:N)"
        ) from None
    return proc, rank


def all_subsets_win(
    policy_rewards: torch.Tensor, reference_rewards: torch.Tensor, n: int, rank: int
) -> torch.Tensor:
    """Per-prompt all-subsets win rate, no validation (see the module docstring for the equation).

    Args:
        policy_rewards: (P, M) float64, reference_rewards: (P, M') float64, both with M, M' >= n.
        n, rank: group size and 0-based ascending rank served.

    Returns:
        (P,) float64: ``sum_i w_i (CW'[#{b < a_i}] + CW'[#{b <= a_i}]) / 2`` per prompt.
    """
    M, Mr = policy_rewards.shape[1], reference_rewards.shape[1]
    dev = policy_rewards.device
    a = torch.sort(policy_rewards, dim=1).values
    b = torch.sort(reference_rewards, dim=1).values
    w = _subset_weights(M, n, rank, dev)
    cw = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64, device=dev),
            torch.cumsum(_subset_weights(Mr, n, rank, dev), 0),
        ]
    )
    below = cw[torch.searchsorted(b, a, right=False)]  # (P, M) reference weight strictly below a_i
    le = cw[torch.searchsorted(b, a, right=True)]  # (P, M) reference weight at or below a_i
    # rounding can leave the sum at 1 + 1e-16; the exact value lies in [0, 1]
    return ((below + le) * 0.5 * w).sum(dim=1).clamp(0.0, 1.0)


def inference_win_rate(
    policy_rewards: torch.Tensor,
    reference_rewards: torch.Tensor,
    procedure: Procedure | str,
    confidence: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> WinRate:
    """Inference-time win rate ``W_T(pi > pi_ref)`` by the all-subsets estimator, averaged over prompts.

    Args:
        policy_rewards: (P, M) rewards of M policy samples per prompt (finite).
        reference_rewards: (P, M') rewards of M' reference samples for the same prompts (finite).
        procedure: a Procedure with a sample-level ``rank`` (Sample, BestOfN, WorstOfN, KthBestOfN) or
            its spec string (``sample``, ``bon:N``, ``won:N``, ``kth:K:N``). Needs M, M' >= n.
        confidence: interval level in (0, 1).
        bootstrap: percentile-bootstrap resamples over prompts; 0 gives the normal interval.
        seed: seed of the bootstrap generator.

    Returns:
        WinRate with ``per_prompt`` (P,) float64 estimates
        ``W_hat_p = sum_i sum_k w_i w'_k (1{a_i > b_k} + 1/2 1{a_i = b_k})`` (sorted rewards, weights
        from ``subset_weights``), their mean, standard error and interval.
    """
    proc, rank = _resolve(procedure)
    _check_confidence(confidence)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0, got {bootstrap!r}")
    a = _as_rewards(policy_rewards, "policy_rewards")
    b = _as_rewards(reference_rewards, "reference_rewards")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"policy_rewards has {a.shape[0]} prompts but reference_rewards has {b.shape[0]} "
            f"(shapes {tuple(a.shape)} and {tuple(b.shape)})"
        )
    n = proc.n
    for name, m in (("policy_rewards", a.shape[1]), ("reference_rewards", b.shape[1])):
        if m < n:
            raise ValueError(f"{name}: {m} samples per prompt, fewer than n={n} for {proc}")
    b = b.to(a.device)
    _check_finite(a, "policy_rewards")
    _check_finite(b, "reference_rewards")

    per_prompt = all_subsets_win(a, b, n, rank)
    P = per_prompt.numel()
    mean = float(per_prompt.mean())
    stderr = float(per_prompt.std()) / math.sqrt(P) if P > 1 else math.nan
    low, high = bootstrap_interval(per_prompt, confidence, bootstrap, seed)
    return WinRate(
        mean=mean,
        low=low,
        high=high,
        stderr=stderr,
        procedure=proc.spec(),
        num_prompts=P,
        num_policy_samples=int(a.shape[1]),
        num_reference_samples=int(b.shape[1]),
        confidence=float(confidence),
        per_prompt=per_prompt,
    )


# ---------------------------------------------------------------------------------------------------
# KL


@dataclass(frozen=True)
class KLEstimate:
    """Monte-Carlo estimate of the sequence-level ``KL(pi || pi_ref)`` in nats.

    ``n`` is the number of policy samples, ``num_clusters`` the number of independent units the
    standard error is computed over (prompts when ``clustered``, else ``n``).
    """

    mean: float
    stderr: float
    low: float
    high: float
    n: int
    num_clusters: int
    clustered: bool
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "stderr": self.stderr,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "num_clusters": self.num_clusters,
            "clustered": self.clustered,
            "confidence": self.confidence,
        }


def kl_estimate(
    policy_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    confidence: float = 0.95,
    clustered: bool | None = None,
) -> KLEstimate:
    """``KL(pi || pi_ref) ~= mean(log pi(y) - log pi_ref(y))`` over policy samples y, with its stderr.

    Args:
        policy_logprobs, reference_logprobs: same shape; each entry is a sequence-level log-probability
            (sum over the completion's tokens) of one policy sample under pi and pi_ref.
        confidence: level of the normal interval ``mean -/+ z * stderr``.
        clustered: stderr clustered by prompt. Default: True for a (P, M) input, False otherwise.

    The mean is ``d_bar = (1/N) sum d`` with ``d = log pi - log pi_ref`` (float64) either way.
    Standard error returned:

    - not clustered (any shape, flattened to N values): ``std(d, ddof=1) / sqrt(N)``;
    - clustered (2-D (P, M), the default there, since samples of one prompt are correlated):
      ``std(d_bar_p, ddof=1) / sqrt(P)`` with ``d_bar_p`` the per-prompt means (rows).

    The stderr is NaN with fewer than 2 units.
    """
    _check_confidence(confidence)
    lp = torch.as_tensor(policy_logprobs).detach().to(torch.float64)
    lr = torch.as_tensor(reference_logprobs).detach().to(torch.float64)
    if lp.shape != lr.shape:
        raise ValueError(
            f"policy_logprobs shape {tuple(lp.shape)} != reference_logprobs shape {tuple(lr.shape)}"
        )
    if lp.numel() == 0:
        raise ValueError("kl_estimate: no samples (empty log-probabilities)")
    if clustered is None:
        clustered = lp.ndim == 2
    if clustered and lp.ndim != 2:
        raise ValueError(f"clustered stderr needs (prompts, samples) input, got {tuple(lp.shape)}")
    lr = lr.to(lp.device)
    _check_finite(lp, "policy_logprobs")
    _check_finite(lr, "reference_logprobs")
    d = lp - lr
    units = d.mean(dim=1) if clustered else d.reshape(-1)
    k = units.numel()
    mean = float(d.mean())
    stderr = float(units.std()) / math.sqrt(k) if k > 1 else math.nan
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * stderr
    return KLEstimate(
        mean=mean,
        stderr=stderr,
        low=mean - half,
        high=mean + half,
        n=int(d.numel()),
        num_clusters=k,
        clustered=bool(clustered),
        confidence=float(confidence),
    )
