"""Policy-gradient losses for CTRL (spec section 6); pure tensors.

Sequences are rows (B), completion tokens are columns (T); ``mask`` is 1 on completion tokens.
The advantage is one number per sequence (RLOO over the sequence-level reward, KL inside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PGDiagnostics", "policy_gradient_loss"]


@dataclass(frozen=True)
class PGDiagnostics:
    """Detached scalars describing one loss evaluation.

    clip_frac: fraction of completion tokens whose ratio lies outside ``[1-eps, 1+eps]`` (0 for REINFORCE).
    approx_kl: mean over completion tokens of ``(ratio - 1) - log ratio`` (the non-negative "k3" estimate
        of ``KL(pi_old || pi)`` per token; 0 for REINFORCE and at ratio 1).
    """

    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, PGDiagnostics]:
    """REINFORCE (first pass) or the PPO-style clipped surrogate (later epochs on the same batch).

    With ``old_logprobs is None`` (REINFORCE)::

        loss = -(1/B) sum_i A_i * sum_t mask_it * log pi(y_it)

    otherwise, with the per-token ratio ``rho_it = exp(log pi(y_it) - log pi_old(y_it))`` and the sequence
    advantage broadcast to every token::

        loss = -(1/B) sum_i sum_t mask_it * min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)

    Tokens are summed per sequence (not averaged) so that at ``rho = 1`` (``old = logprobs.detach()``)
    the gradient is exactly REINFORCE's: ``grad rho_it = grad log pi(y_it)`` there.

    Args:
        logprobs: (B, T) log-probs of the sampled completion tokens under the current policy (with grad).
        old_logprobs: (B, T) log-probs under the policy that sampled them (no grad), or None.
        advantages: (B,) one advantage per sequence (treated as a constant).
        mask: (B, T) 1 on completion tokens, 0 on padding.
        clip_eps: PPO clip range eps in (0, 1).

    Returns:
        (loss scalar, PGDiagnostics).
    """
    if logprobs.ndim != 2 or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must both be (B, T)"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}"
        )
    if old_logprobs is not None and old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}"
        )
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    m = mask.to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)  # (B, 1)
    zero = logprobs.new_zeros(())
    if old_logprobs is None:
        per_seq = (adv * logprobs * m).sum(dim=1)
        return -per_seq.mean(), PGDiagnostics(clip_frac=zero, approx_kl=zero)

    log_ratio = (logprobs - old_logprobs.detach().to(logprobs.dtype)) * m
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    # min(.) written as a select: equal branches (ratio inside the clip range) keep the unclipped
    # gradient in full, rather than relying on how min() splits the gradient of a tie.
    surrogate = torch.where(clipped < unclipped, clipped, unclipped)
    loss = -(surrogate * m).sum(dim=1).mean()
    with torch.no_grad():
        n_tok = m.sum().clamp(min=1.0)
        outside = ((ratio - 1.0).abs() > clip_eps).to(m.dtype) * m
        k3 = ((ratio - 1.0) - log_ratio) * m
        diag = PGDiagnostics(clip_frac=outside.sum() / n_tok, approx_kl=k3.sum() / n_tok)
    return loss, diag
