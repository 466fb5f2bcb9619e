"""Calibrated reward: the quantile of a reward among the reference policy's rewards for the same prompt.

Spec section 2. With K reference rewards ``s_1..s_K`` for prompt ``x``::

    C_hat(x, y) = (1/K) * sum_k [ 1{r(x,y) > s_k} + 1/2 * 1{r(x,y) = s_k} ]
                = (#{s_k < r} + #{s_k <= r}) / (2K)

computed for a whole (P, M) batch with one sort of the (P, K) reference rewards (at fit time) and two
batched ``searchsorted`` calls (left and right) per query: O(log K) a query.

The smoothed (mid-rank) variant ``(rank + 1/2) / (K + 1)`` with ``rank = K * C_hat`` treats the query as
one more exchangeable sample: it lies in ``[1/(2(K+1)), 1 - 1/(2(K+1))]`` and never returns exactly 0 or 1
(useful for the Log transform).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["EmpiricalCalibration"]


def _as_2d_float(x: torch.Tensor, name: str) -> torch.Tensor:
    # Python floats are doubles: plain torch.as_tensor would round nested lists to float32,
    # merging distinct rewards into ties and mis-ordering them against float64 queries.
    t = (
        torch.as_tensor(x, dtype=torch.float64)
        if isinstance(x, (list, tuple))
        else torch.as_tensor(x)
    )
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (prompts, samples) tensor, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


@dataclass(frozen=True, eq=False)
class EmpiricalCalibration:
    """Per-prompt empirical CDF of reference rewards, fitted once and applied to many queries.

    Attributes:
        sorted_rewards: (P, K) reference rewards sorted ascending; missing entries (NaN at fit time)
            are stored as +inf at the end of each row so they never count as "less or equal".
        counts: (P,) number of finite reference rewards per prompt (K_p >= 2).
        smoothed: use the mid-rank form ``(K_p * C_hat + 1/2) / (K_p + 1)``.
    """

    sorted_rewards: torch.Tensor
    counts: torch.Tensor
    smoothed: bool = field(default=False)

    @classmethod
    def fit(cls, reference_rewards: torch.Tensor, smoothed: bool = False) -> EmpiricalCalibration:
        """Fit from a (P, K) tensor of reference rewards; NaN marks a missing entry.

        Raises ValueError naming the prompt index for +-inf rewards or fewer than 2 finite rewards.
        """
        ref = _as_2d_float(reference_rewards, "reference_rewards")
        if ref.shape[0] == 0:
            raise ValueError(f"reference_rewards has no prompts (shape {tuple(ref.shape)})")
        nan = torch.isnan(ref)
        inf = torch.isinf(ref)
        if inf.any():
            p, k = (int(i) for i in torch.nonzero(inf)[0])
            raise ValueError(
                f"reference_rewards[{p}, {k}] = {ref[p, k].item()} is infinite (prompt {p}); "
                "use NaN to mark a missing reference reward"
            )
        counts = (~nan).sum(dim=1)
        few = torch.nonzero(counts < 2).flatten()
        if few.numel():
            p = int(few[0])
            raise ValueError(
                f"prompt {p} has {int(counts[p])} finite reference rewards; calibration needs at least 2 "
                f"({few.numel()} prompt(s) affected)"
            )
        filled = torch.where(nan, torch.full_like(ref, float("inf")), ref)
        sorted_rewards, _ = torch.sort(filled, dim=1)
        return cls(sorted_rewards=sorted_rewards.contiguous(), counts=counts, smoothed=smoothed)

    @property
    def num_prompts(self) -> int:
        return int(self.sorted_rewards.shape[0])

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        """Calibrate a (P, M) tensor of rewards: returns C_hat in [0, 1] of the same shape (float64).

        Entry (p, m) is the tie-aware quantile of ``rewards[p, m]`` among prompt p's reference rewards.
        """
        r = _as_2d_float(rewards, "rewards")
        if r.shape[0] != self.num_prompts:
            raise ValueError(
                f"rewards has {r.shape[0]} prompts (shape {tuple(r.shape)}) but the calibration was "
                f"fitted on {self.num_prompts}"
            )
        bad = ~torch.isfinite(r)
        if bad.any():
            p, m = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"rewards[{p}, {m}] = {r[p, m].item()} is not finite (prompt {p})")
        ref = self.sorted_rewards
        if r.dtype != ref.dtype:
            common = torch.promote_types(r.dtype, ref.dtype)
            r, ref = r.to(common), ref.to(common)
        r = r.contiguous()
        less = torch.searchsorted(ref, r, side="left")  # #{s_k < r}
        less_eq = torch.searchsorted(ref, r, side="right")  # #{s_k <= r}
        k = self.counts.to(torch.float64).unsqueeze(1)
        rank = (less + less_eq).to(torch.float64) / 2.0  # K * C_hat
        if self.smoothed:
            return (rank + 0.5) / (k + 1.0)
        return rank / k
