"""CTRL trainer (spec section 6): RLOO advantages with the KL in the reward, losses, the loop."""

from infalign.rl.advantages import (
    ctrl_reward,
    kl_penalized_reward,
    rloo_advantages,
    sequence_logprob,
)
from infalign.rl.losses import PGDiagnostics, policy_gradient_loss

__all__ = [
    "CTRLTrainer",
    "PGDiagnostics",
    "ctrl_reward",
    "kl_penalized_reward",
    "policy_gradient_loss",
    "rloo_advantages",
    "sequence_logprob",
]


def __getattr__(name: str):  # the trainer imports transformers-facing code: load it on demand
    if name == "CTRLTrainer":
        from infalign.rl.trainer import CTRLTrainer

        return CTRLTrainer
    raise AttributeError(f"module 'infalign.rl' has no attribute {name!r}")
