"""What PPO epochs do to RLOO's fixed point, measured on the convergence tests' tabular policy.

A per-prompt softmax over 64 candidates (``tests/rl/test_convergence.py``) trained by the trainer's own
loss path at the beta that puts the identity tilt at KL 0.5; each batch is reused for ``epochs``
optimizer steps (epochs 2.. with the clipped ratio against the sampling policy). Prints the exact KL
of the policy, averaged over the last 200 of 800 steps, next to the optimum's.

    python benchmarks/ppo_epochs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_convergence import exact_kl

from infalign import theory
from infalign.rl.advantages import kl_penalized_reward, rloo_advantages
from infalign.rl.losses import policy_gradient_loss
from infalign.rl.optim import make_optimizer
from infalign.run.config import RLConfig


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logp_ref = torch.log_softmax(torch.randn(4, 64, generator=g, dtype=torch.float64) * 0.5, 1)
    r = torch.randn(4, 64, generator=g, dtype=torch.float64)
    p = logp_ref.exp()
    u = ((r.unsqueeze(2) > r.unsqueeze(1)).double() * p.unsqueeze(1)).sum(-1) + 0.5 * p
    return logp_ref, u


def run(logp_ref, R, beta, epochs: int, lr: float, M: int, steps: int = 800) -> float:
    theta = logp_ref.clone().float().requires_grad_(True)
    opt, sched = make_optimizer([theta], RLConfig(lr=lr, beta=beta))
    g = torch.Generator().manual_seed(1)
    P, kls = theta.shape[0], []
    for s in range(steps):
        logq = torch.log_softmax(theta, 1)
        idx = torch.multinomial(logq.detach().exp(), M, replacement=True, generator=g)
        lp = logq.gather(1, idx)
        old = lp.detach()
        r_pen = kl_penalized_reward(R.gather(1, idx), old.double(), logp_ref.gather(1, idx), beta)
        adv = rloo_advantages(r_pen).flatten().float()
        for e in range(epochs):
            if e > 0:
                lp = torch.log_softmax(theta, 1).gather(1, idx)
            ref = None if e == 0 else old.reshape(-1, 1)
            loss, _ = policy_gradient_loss(lp.reshape(-1, 1), ref, adv, torch.ones(P * M, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if s >= steps - 200:
            kls.append(exact_kl(torch.log_softmax(theta.detach().double(), 1), logp_ref))
    return sum(kls) / len(kls)


def main() -> None:
    torch.set_num_threads(1)
    logp_ref, u = problem()
    beta = theory.beta_for_kl("identity", 0.5)
    star = torch.log_softmax(logp_ref + u / beta, 1)
    print(f"optimum KL {exact_kl(star, logp_ref):.4f} (identity, beta {beta:.4f})")
    for lr in (0.01, 0.05):
        for M in (16, 256):
            cells = [f"epochs {e}: KL {run(logp_ref, u, beta, e, lr, M):.4f}" for e in (1, 4)]
            print(f"lr {lr:g}, M {M:>3}: " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
