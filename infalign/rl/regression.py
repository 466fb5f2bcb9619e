"""CTRL by regression on the exact optimum (spec section 6b): ``rl.algorithm: regression``.

In calibrated space the KL-regularised optimum is known in closed form up to nothing:

    pi*(y|x) = pi_ref(y|x) exp(R(x, y) / beta) / Z,        R = Phi(C_hat(x, y)),
    beta (log pi*(y|x) - log pi_ref(y|x)) = R(x, y) - beta log Z          for every y,

so the policy's sequence log-ratio is regressed on that target with squared error,

    L(theta) = mean_{x, y ~ mu} [ (beta (log pi_theta(y|x) - log pi_ref(y|x)) - (R - beta log Z))^2 ],

whose unique zero is pi* for any mu covering pi*'s support. Here mu is pi_ref: the K reference
samples per prompt that were drawn and scored for calibration, with their stored token ids and
``log pi_ref`` (the reference artifact), so training needs no generation and no reference forward.

**Z.** A reference sample scored against its own prompt's K rewards takes the mid-rank
``u = (i - 1/2) / K`` (ties share theirs), so ``Z`` is the mean of ``exp(R/beta)`` over the prompt's
own K samples: ``log Z_p = logmeanexp_k(R_pk / beta)``. Without ties it equals the spec's
``(1/K) sum_i exp(Phi((i - 1/2)/K) / beta)``, the same for every prompt; with ties it is the exact
normaliser of the empirical reference distribution. The raw-reward baseline (``R = r``) uses the
same per-prompt formula, where Z genuinely differs between prompts.

Adam is invariant to the loss's scale, so the ``beta^2`` between reward units (above) and
log-ratio units changes nothing but the gradient-norm clipping threshold.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from infalign.calibration import EmpiricalCalibration
from infalign.config import RLConfig, SamplingConfig
from infalign.models import derive_seed
from infalign.rl.advantages import ctrl_reward, sequence_logprob
from infalign.rl.trainer import CTRLTrainer, _defer_sigint
from infalign.scoring import token_logprobs
from infalign.transforms import Transform

__all__ = [
    "RegressionTrainer",
    "fit_diagnostics",
    "log_partition",
    "regression_loss",
    "regression_target",
]


def log_partition(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """``log Z_p = log (1/K) sum_k exp(R_pk / beta)``: the partition function of the tilt over each
    prompt's K reference samples. reward: (P, K). Returns (P,) float64."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    r = reward.double() / beta
    return torch.logsumexp(r, dim=1) - math.log(r.shape[1])


def regression_target(
    reward: torch.Tensor, beta: float, log_z: torch.Tensor | float | None = None
) -> torch.Tensor:
    """The optimum's scaled log-ratio ``beta log(pi*/pi_ref) = R - beta log Z`` on the reference
    samples (reward units). reward: (P, K) -> (P, K) float64.

    ``log_z``: (P,) or a scalar when the partition function is known exactly (e.g. a tabular policy
    whose u is the population CDF); default :func:`log_partition` over each prompt's K samples.
    """
    if log_z is None:
        log_z = log_partition(reward, beta)
    lz = torch.as_tensor(log_z, dtype=torch.float64)
    return reward.double() - beta * (lz.unsqueeze(1) if lz.ndim == 1 else lz)


def regression_loss(
    policy_seq_logprob: torch.Tensor,
    ref_seq_logprob: torch.Tensor,
    target: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """``mean_i (beta (log pi(y_i) - log pi_ref(y_i)) - target_i)^2`` (spec 6b), any matching shape.

    ``policy_seq_logprob`` carries the gradient; the reference log-probs and the target are
    constants. Returns a scalar in the policy's dtype.
    """
    if not (policy_seq_logprob.shape == ref_seq_logprob.shape == target.shape):
        raise ValueError(
            f"policy {tuple(policy_seq_logprob.shape)}, reference {tuple(ref_seq_logprob.shape)} "
            f"and target {tuple(target.shape)} log-probs must have the same shape"
        )
    dt = policy_seq_logprob.dtype
    fit = beta * (policy_seq_logprob - ref_seq_logprob.detach().to(dt))
    return ((fit - target.detach().to(dt)) ** 2).mean()


def fit_diagnostics(logratio: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How much of the intended tilt a policy realises: ``logratio`` = log pi - log pi_ref and
    ``target`` = (R - beta log Z) / beta on the same samples (any equal shapes, flattened).

    Returns ``slope`` (OLS of logratio on target; 1 is the optimum, 0 is pi_ref), ``corr``
    (Pearson) and ``rmse`` (nats) of logratio - target.
    """
    x, y = target.double().flatten(), logratio.double().flatten()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"need two equal-length vectors, got {tuple(x.shape)}, {tuple(y.shape)}")
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (xc * xc).sum(), (yc * yc).sum(), (xc * yc).sum()
    slope = float(sxy / sxx) if sxx > 0 else float("nan")
    corr = float(sxy / (sxx * syy).sqrt()) if sxx > 0 and syy > 0 else float("nan")
    return {"slope": slope, "corr": corr, "rmse": float(((y - x) ** 2).mean().sqrt())}


def snis_kl(logratio: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance estimate of ``KL(pi || pi_ref)`` per prompt from samples of
    pi_ref: ``sum_k w_k logratio_k`` with ``w = softmax_k(logratio)``. (P, k) -> (P,). Biased for
    small k (a monitor, not the evaluation's estimate)."""
    lr = logratio.double()
    return (torch.softmax(lr, dim=1) * lr).sum(dim=1)


class RegressionTrainer(CTRLTrainer):
    """Regression on the exact optimum over the cached reference samples (module docstring).

    Shares :class:`~infalign.rl.trainer.CTRLTrainer`'s accelerate setup, optimizer and warm-up,
    checkpoints and exact resume, signal handling, metrics file and loop; only the step differs.
    Per step: ``rl.prompts_per_step`` prompts (the same seeded permutation as RLOO), and for each
    ``rl.samples_per_prompt`` of its K reference samples, drawn without replacement with a seed
    derived from ``(rl.seed, step)``; one policy forward/backward per micro-batch; no generation, no
    reward call, no reference forward.

    Args:
        reference_set: the :class:`~infalign.reference.ReferenceSet` of the training prompts
            (format 2: token ids and ``log pi_ref``), index-aligned with ``calibration``.
        other arguments: as for ``CTRLTrainer`` (``reward_fn`` is unused and may be None).

    Metrics (``metrics.jsonl``): ``rl/step``, ``rl/loss``, ``rl/reward_transformed`` (mean R of the
    step's samples), ``rl/kl_seq`` (self-normalised importance estimate of KL(pi || pi_ref) from the
    step's reference samples), ``rl/logratio`` (mean log pi - log pi_ref on them, an estimate of
    -KL(pi_ref || pi)), ``rl/fit_slope``, ``rl/fit_corr``, ``rl/fit_rmse`` (before the update, see
    :func:`fit_diagnostics`), ``rl/grad_norm``, ``rl/lr``, ``rl/completion_length`` and
    ``rl/time/forward_backward``, ``rl/time/step``.
    """

    def __init__(
        self,
        policy: Any,
        reference: Any | None,
        tokenizer: Any,
        reference_set: Any,
        calibration: EmpiricalCalibration | None,
        transform: Transform | str | None,
        rl: RLConfig,
        sampling: SamplingConfig,
        out_dir: Any,
        resume: bool = False,
        accelerator: Any | None = None,
        progress: bool = True,
        reward_fn: Any | None = None,
    ) -> None:
        tids = getattr(reference_set, "token_ids", None)
        if tids is None or getattr(reference_set, "logprobs", None) is None:
            raise ValueError(
                "rl.algorithm=regression needs a reference set with token_ids and logprobs "
                "(reference artifact format 2)"
            )
        K = reference_set.num_samples
        if rl.samples_per_prompt > K:
            raise ValueError(
                f"rl.samples_per_prompt={rl.samples_per_prompt} exceeds the K={K} reference "
                "samples per prompt that regression draws from"
            )
        super().__init__(
            policy,
            reference,
            tokenizer,
            reference_set.prompts,
            reward_fn if reward_fn is not None else _unused_reward,
            calibration,
            transform,
            rl,
            sampling,
            out_dir,
            resume=resume,
            accelerator=accelerator,
            progress=progress,
        )
        self.reference_set = reference_set
        raw = reference_set.rewards.double()
        self.reward_table = ctrl_reward(raw, calibration, self.transform).double()  # (P, K)
        self.target_table = regression_target(self.reward_table, rl.beta)  # (P, K)
        self.ref_table = reference_set.logprobs.double()  # (P, K)

    def _samples(self, idx: list[int]) -> torch.Tensor:
        """(len(idx), M) sample indices, without replacement, seeded by (rl.seed, step)."""
        g = torch.Generator().manual_seed(derive_seed(self.rl.seed, 0x5A3, self.step))
        K = self.reference_set.num_samples
        keys = torch.rand(len(self.prompts), K, generator=g)[idx]  # same draw on every rank
        return keys.argsort(dim=1)[:, : self.rl.samples_per_prompt]

    def _train_step(self) -> dict[str, float]:
        acc, rl = self.accelerator, self.rl
        t0 = time.perf_counter()
        W, G = acc.num_processes, rl.grad_accum
        idx = self.step_prompt_indices(self.step)[acc.process_index :: W]
        sidx = self._samples(idx)
        rows = torch.tensor(idx).unsqueeze(1)
        target, ref, reward = (
            t[rows, sidx] for t in (self.target_table, self.ref_table, self.reward_table)
        )
        gen = self.reference_set.generation(self.tokenizer, idx, sidx)
        chunks = [c.tolist() for c in torch.arange(len(idx)).tensor_split(G)]
        weight = G * W / rl.prompts_per_step  # chunk losses are means over its prompts' samples
        lr_now = float(self.scheduler.get_last_lr()[0])
        logratios: list[torch.Tensor] = []
        losses, grad_norm = [], float("nan")
        acc.step = 0
        with _defer_sigint():
            for chunk in chunks:
                with acc.accumulate(self.model), acc.autocast():
                    sub = gen.select_prompts(chunk)
                    mask = sub.completion_mask.to(acc.device)
                    lp = token_logprobs(
                        self.model, sub, temperature=self.sampling.temperature, grad=True
                    )
                    assert isinstance(lp, torch.Tensor)
                    seq = sequence_logprob(lp, mask).view(len(chunk), -1)
                    loss = regression_loss(
                        seq, ref[chunk].to(seq.device), target[chunk].to(seq.device), rl.beta
                    )
                    acc.backward(loss * (len(chunk) * weight))
                    logratios.append(seq.detach().double().cpu() - ref[chunk])
                    losses.append(loss.item() * len(chunk))
                    if acc.sync_gradients:
                        max_norm = rl.max_grad_norm if rl.max_grad_norm > 0 else float("inf")
                        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), max_norm))
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            t1 = time.perf_counter()
            lr_seq = torch.cat(logratios)
            fit = fit_diagnostics(lr_seq, target / rl.beta)
            local = {
                "loss": (sum(losses), float(len(idx))),
                "reward_transformed": (float(reward.sum()), float(reward.numel())),
                "kl_seq": (float(snis_kl(lr_seq).sum()), float(len(idx))),
                "logratio": (float(lr_seq.sum()), float(lr_seq.numel())),
                "completion_length": (float(gen.completion_mask.sum()), float(lr_seq.numel())),
            }
            metrics = {"rl/step": self.step - 1, **self._reduce_means(local)}
            metrics.update(
                {
                    "rl/fit_slope": fit["slope"],
                    "rl/fit_corr": fit["corr"],
                    "rl/fit_rmse": fit["rmse"],
                    "rl/grad_norm": grad_norm,
                    "rl/lr": lr_now,
                    "rl/time/forward_backward": t1 - t0,
                    "rl/time/step": time.perf_counter() - t0,
                }
            )
            self._log(metrics)
        return metrics

    def _reduce_means(self, local: dict[str, tuple[float, float]]) -> dict[str, float]:
        """``rl/<key>``: sum / count over all processes (one all-reduce)."""
        acc = self.accelerator
        keys = sorted(local)
        vec = torch.tensor(
            [v for k in keys for v in local[k]], dtype=torch.float64, device=acc.device
        )
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        return {f"rl/{k}": (vec[2 * i] / vec[2 * i + 1]).item() for i, k in enumerate(keys)}


def _unused_reward(prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
    raise RuntimeError("the regression trainer scores no samples")
