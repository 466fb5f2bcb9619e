"""Rewards and advantages for CTRL (spec section 6); pure tensors, prompts first: shapes are (P, M).

The estimator optimises ``E[R] - beta * KL(pi || pi_ref)`` exactly: REINFORCE with a leave-one-out
baseline (RLOO) over the M samples of each prompt, with the sequence-level KL penalty inside the
reward::

    R(x, y)   = Phi(C_hat(x, y))                                     (ctrl_reward; raw r for the baseline)
    R'_i      = R_i - beta * sum_t [log pi(y_i,t) - log pi_ref(y_i,t)]  (kl_penalized_reward)
    A_i       = R'_i - mean_{j != i} R'_j                             (rloo_advantages)
"""

from __future__ import annotations

import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import Transform, is_raw, parse_transform

__all__ = [
    "adaptive_beta",
    "ctrl_reward",
    "kl_penalized_reward",
    "rloo_advantages",
    "sequence_logprob",
]


def _check_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D (prompts, samples) tensor, got {shape}")
    return x


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-probability ``log pi(y) = sum_t mask_t * log pi(y_t | x, y_<t)``.

    Args:
        token_logprobs: (B, T) per-token log-probs of the completion tokens.
        mask: (B, T) 1 on completion tokens, 0 on padding (bool or float).

    Returns:
        (B,) summed log-probs; padding contributes nothing even if ``token_logprobs`` is non-zero there.
    """
    if token_logprobs.shape != mask.shape:
        raise ValueError(
            f"token_logprobs shape {tuple(token_logprobs.shape)} != mask shape {tuple(mask.shape)}"
        )
    return (token_logprobs * mask.to(token_logprobs.dtype)).sum(dim=-1)


def kl_penalized_reward(
    reward: torch.Tensor,
    policy_seq_logprob: torch.Tensor,
    ref_seq_logprob: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """KL inside the reward: ``R'_i = R_i - beta * (log pi(y_i) - log pi_ref(y_i))``.

    The log-ratio is the single-sample Monte-Carlo estimate of the sequence-level
    ``KL(pi(.|x) || pi_ref(.|x))`` (nats), so ``E[R'] = E[R] - beta * KL``: the RL objective of spec
    section 6. The log-probs are treated as constants (detached): the KL enters through the reward
    (score-function gradient), not by differentiating the penalty.

    Args:
        reward: (P, M) reward R (transformed calibrated reward, or the raw reward).
        policy_seq_logprob: (P, M) ``log pi(y)`` summed over completion tokens.
        ref_seq_logprob: (P, M) ``log pi_ref(y)`` summed over the same tokens.
        beta: KL coefficient, > 0.

    Returns:
        (P, M) penalised reward R', in the promoted dtype of the inputs.
    """
    _check_2d(reward, "reward")
    if policy_seq_logprob.shape != reward.shape or ref_seq_logprob.shape != reward.shape:
        raise ValueError(
            f"reward {tuple(reward.shape)}, policy_seq_logprob {tuple(policy_seq_logprob.shape)} and "
            f"ref_seq_logprob {tuple(ref_seq_logprob.shape)} must have the same (P, M) shape"
        )
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    logratio = policy_seq_logprob.detach() - ref_seq_logprob.detach()
    return reward - beta * logratio


def rloo_advantages(
    r: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """RLOO advantages: ``A_i = R'_i - mean_{j != i} R'_j = M/(M-1) * (R'_i - mean_j R'_j)``.

    The leave-one-out baseline does not depend on sample i, so ``E[A_i grad log pi(y_i)]`` is the
    unbiased policy gradient of ``E[R']``; per prompt the advantages sum to 0.

    ``normalize_std=True`` divides each prompt's advantages by that prompt's std of R' (unbiased,
    plus ``eps``), as GRPO does. It is **off by default**: it multiplies the effective learning rate
    of each prompt by ``1/std``, i.e. rescales beta per prompt, so the run no longer optimises
    ``E[R] - beta KL`` (spec section 6). Prompts whose M rewards are all equal get advantage 0 either way.

    Args:
        r: (P, M) penalised rewards R', M >= 2.
        normalize_std: divide by the per-prompt std.
        eps: added to the std.

    Returns:
        (P, M) advantages, same dtype as ``r``.
    """
    _check_2d(r, "r")
    m = r.shape[1]
    if m < 2:
        raise ValueError(f"rloo_advantages needs M >= 2 samples per prompt, got M={m}")
    centered = r - r.mean(dim=1, keepdim=True)
    adv = centered * (m / (m - 1))
    if normalize_std:
        adv = adv / (adv.std(dim=1, keepdim=True) + eps)
    return adv


def ctrl_reward(
    rewards: torch.Tensor,
    calibration: EmpiricalCalibration | None,
    transform: Transform | str | None,
) -> torch.Tensor:
    """The CTRL training reward ``R = Phi(C_hat(x, y))``, or the raw reward for the baseline.

    Args:
        rewards: (P, M) raw rewards ``r(x, y)`` of policy samples; row p belongs to prompt p of the
            calibration (index-aligned).
        calibration: fitted on the reference rewards of the same P prompts; unused for the raw
            baseline (may be None there).
        transform: a Transform, a spec string (``"identity"``, ``"exp:12"``...), or None / ``"raw"``
            for raw-reward RLHF.

    Returns:
        (P, M) float64 (calibrated) or the rewards' floating dtype (raw).
    """
    _check_2d(rewards, "rewards")
    if is_raw(transform):
        return rewards if rewards.is_floating_point() else rewards.to(torch.float64)
    phi = parse_transform(transform)
    if calibration is None:
        raise ValueError(f"transform {str(phi)!r} needs a fitted calibration, got None")
    return phi(calibration(rewards))


def adaptive_beta(beta: float, kl: float, target: float, horizon: int) -> float:
    """One step of the proportional KL controller (Ziegler et al. 2019):
    ``beta * (1 + clip(kl / target - 1, -0.2, 0.2) / horizon)``.

    It moves beta so that the measured KL approaches ``target``; the run then no longer optimises
    ``E[R] - beta KL`` for one beta (the fixed-beta default does), so use it to hit a KL budget and
    report the final beta. A non-finite ``kl`` leaves beta unchanged.
    """
    if not (target > 0 and horizon >= 1 and beta > 0):
        raise ValueError(
            f"need beta > 0, target > 0, horizon >= 1; got {beta}, {target}, {horizon}"
        )
    if not kl == kl or kl in (float("inf"), float("-inf")):
        return beta
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + err / horizon)
