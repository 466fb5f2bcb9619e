"""CTRL RL (spec section 6): advantages, losses, the trainer base (:mod:`infalign.rl.base`) and one
module per algorithm (:mod:`infalign.rl.algorithms`: ``rloo``, ``regression``)."""

from infalign.rl.advantages import (
    ctrl_reward,
    kl_penalized_reward,
    rloo_advantages,
    sequence_logprob,
)
from infalign.rl.losses import PGDiagnostics, policy_gradient_loss

__all__ = [
    "PGDiagnostics",
    "ctrl_reward",
    "kl_penalized_reward",
    "policy_gradient_loss",
    "rloo_advantages",
    "sequence_logprob",
]
