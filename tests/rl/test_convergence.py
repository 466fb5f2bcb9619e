"""Every optimiser reaches the closed-form tilted optimum on a policy that is trivial to represent.

The policy is a per-prompt softmax over C fixed candidate completions with continuous rewards; u is
the exact calibrated reward (the pi_ref-CDF of the reward, ties impossible), so the KL-regularised
optimum is ``pi* = softmax(log pi_ref + Phi(u) / beta)`` exactly. Each optimiser trains through the
LM trainer's own code path (``make_optimizer``; RLOO: ``kl_penalized_reward`` ->
``rloo_advantages`` -> ``policy_gradient_loss``; regression: ``regression_target`` ->
``regression_loss``) with a candidate as a one-token "sequence", and must land within 10 % of pi*'s
KL and within 0.02 of its inference-time win rate, computed exactly on the discrete distributions.
A run with a wrong KL coefficient must miss, so the criterion can fail.

``python tests/rl/test_convergence.py`` prints the KL and win rate each optimiser reaches (the table in
docs/results.md).
"""

import pytest
import torch

from infalign import theory
from infalign.core.procedures import parse_procedure
from infalign.core.transforms import parse_transform
from infalign.rl.advantages import kl_penalized_reward, rloo_advantages
from infalign.rl.algorithms.regression import log_partition, regression_loss, regression_target
from infalign.rl.losses import policy_gradient_loss
from infalign.rl.optim import make_optimizer
from infalign.run.config import RLConfig

CASES = [("identity", "bon:4"), ("exp:auto", "bon:4"), ("negexp:auto", "won:4")]
KL_BUDGET = 0.5


@pytest.fixture(scope="module")
def problem():
    """P = 4 prompts x C = 64 candidates: (log pi_ref (P, C), exact u (P, C))."""
    g = torch.Generator().manual_seed(0)
    logp_ref = torch.log_softmax(torch.randn(4, 64, generator=g, dtype=torch.float64) * 0.5, 1)
    r = torch.randn(4, 64, generator=g, dtype=torch.float64)
    p = logp_ref.exp()
    below = (r.unsqueeze(2) > r.unsqueeze(1)).double()  # [p, c, c']: r_c > r_c'
    u = (below * p.unsqueeze(1)).sum(-1) + 0.5 * p  # P_ref(r < r_c) + P_ref(r = r_c) / 2
    return logp_ref, u


def exact_win_rate(logq, logp_ref, u, procedure):
    """P(T(pi) beats T(pi_ref)) + P(tie) / 2 on the discrete distributions over the candidates,
    T the procedure: its output CDF is G(F) at each atom (atoms sorted by u)."""
    G = parse_procedure(procedure).cdf_map
    order = u.argsort(1)
    Fq = logq.exp().gather(1, order).cumsum(1).clamp(max=1.0)
    Fr = logp_ref.exp().gather(1, order).cumsum(1).clamp(max=1.0)
    Gq, Gr = G(Fq), G(Fr)
    a = torch.diff(Gq, dim=1, prepend=torch.zeros_like(Gq[:, :1]))
    b = torch.diff(Gr, dim=1, prepend=torch.zeros_like(Gr[:, :1]))
    return float((a * (Gr - b + 0.5 * b)).sum(1).mean())


def exact_kl(logq, logp_ref):
    return float((logq.exp() * (logq - logp_ref)).sum(1).mean())


def train_rloo(logp_ref, R, beta, steps=600, M=128, lr=0.05, seed=0):
    """RLOO with the KL in the reward: M samples per prompt per step from the current softmax."""
    theta = logp_ref.clone().float().requires_grad_(True)
    opt, sched = make_optimizer([theta], RLConfig(lr=lr, beta=beta))
    g = torch.Generator().manual_seed(seed)
    P = theta.shape[0]
    for _ in range(steps):
        logq = torch.log_softmax(theta, 1)
        idx = torch.multinomial(logq.detach().exp(), M, replacement=True, generator=g)
        lp = logq.gather(1, idx)  # (P, M) "sequence" log-probs, one token each
        r_pen = kl_penalized_reward(
            R.gather(1, idx), lp.detach().double(), logp_ref.gather(1, idx), beta
        )
        adv = rloo_advantages(r_pen).flatten().float()
        loss, _ = policy_gradient_loss(lp.reshape(-1, 1), None, adv, torch.ones(P * M, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.log_softmax(theta.detach().double(), 1)


def train_regression(logp_ref, R, beta, steps=3000, K=512, lr=0.1, seed=0, log_z=None):
    """Regression on a fixed set of K pi_ref draws per prompt (the cached reference samples)."""
    theta = logp_ref.clone().float().requires_grad_(True)
    opt, sched = make_optimizer([theta], RLConfig(lr=lr, beta=beta))
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(logp_ref.exp(), K, replacement=True, generator=g)
    target = regression_target(R.gather(1, idx), beta, log_z)
    ref = logp_ref.gather(1, idx)
    for _ in range(steps):
        lp = torch.log_softmax(theta, 1).gather(1, idx)
        loss = regression_loss(lp, ref, target, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.log_softmax(theta.detach().double(), 1)


def _setting(problem, spec, procedure):
    logp_ref, u = problem
    tf = theory.resolve_transform(spec, procedure, kl=KL_BUDGET)
    beta = theory.beta_for_kl(tf, KL_BUDGET)
    R = parse_transform(str(tf))(u)
    star = torch.log_softmax(logp_ref + R / beta, 1)
    # the exact partition function of the population tilt: Z = E_ref[exp(R / beta)]
    log_z = torch.logsumexp(logp_ref + R / beta, 1)
    return logp_ref, u, R, beta, star, log_z


def _close(q, star, logp_ref, u, procedure):
    kl_q, kl_star = exact_kl(q, logp_ref), exact_kl(star, logp_ref)
    w_q = exact_win_rate(q, logp_ref, u, procedure)
    w_star = exact_win_rate(star, logp_ref, u, procedure)
    return abs(kl_q / kl_star - 1) <= 0.10 and abs(w_q - w_star) <= 0.02, (
        kl_q,
        kl_star,
        w_q,
        w_star,
    )


def test_exact_win_rate_of_reference_is_half(problem):
    logp_ref, u = problem
    for proc in ("sample", "bon:4", "won:4"):
        assert exact_win_rate(logp_ref, logp_ref, u, proc) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("spec,procedure", CASES)
def test_rloo_reaches_tilted_optimum(problem, spec, procedure):
    logp_ref, u, R, beta, star, _ = _setting(problem, spec, procedure)
    ok, got = _close(train_rloo(logp_ref, R, beta), star, logp_ref, u, procedure)
    assert ok, f"{spec}: KL {got[0]:.4f} vs {got[1]:.4f}, win {got[2]:.4f} vs {got[3]:.4f}"


@pytest.mark.parametrize("spec,procedure", CASES)
def test_regression_reaches_tilted_optimum(problem, spec, procedure):
    logp_ref, u, R, beta, star, log_z = _setting(problem, spec, procedure)
    ok, got = _close(train_regression(logp_ref, R, beta, log_z=log_z), star, logp_ref, u, procedure)
    assert ok, f"{spec}: KL {got[0]:.4f} vs {got[1]:.4f}, win {got[2]:.4f} vs {got[3]:.4f}"


@pytest.mark.parametrize("optimiser", ["rloo", "regression"])
def test_wrong_kl_coefficient_misses(problem, optimiser):
    """The control: training with 2 x beta (a wrong KL coefficient) must fail the criterion."""
    logp_ref, u, R, beta, star, _ = _setting(problem, "identity", "bon:4")
    if optimiser == "rloo":
        q = train_rloo(logp_ref, R, 2 * beta)
    else:
        q = train_regression(
            logp_ref, R, 2 * beta, log_z=torch.logsumexp(logp_ref + R / (2 * beta), 1)
        )
    ok, got = _close(q, star, logp_ref, u, "bon:4")
    assert not ok, f"a wrong beta passed: KL {got[0]:.4f} vs {got[1]:.4f}"


def test_log_partition_is_the_spec_formula_without_ties():
    """On a prompt's own K samples u takes (i - 1/2)/K, so log Z_p is (1/K) sum_i exp(Phi/beta)."""
    K, beta = 64, 0.2
    phi = parse_transform("exp:8")
    u = (torch.randperm(K).double() + 0.5) / K
    want = torch.log(
        torch.mean(torch.exp(phi((torch.arange(K, dtype=torch.float64) + 0.5) / K) / beta))
    )
    got = log_partition(phi(u).unsqueeze(0), beta)
    assert float(got[0]) == pytest.approx(float(want), rel=1e-12)
    t = regression_target(phi(u).unsqueeze(0), beta)
    # the target's tilt is normalised over the samples: mean_k exp(target / beta) = 1
    assert float(torch.exp(t / beta).mean()) == pytest.approx(1.0, rel=1e-12)


if __name__ == "__main__":
    torch.set_num_threads(1)
    prob = problem.__wrapped__()
    for spec, proc in CASES:
        logp_ref, u, R, beta, star, log_z = _setting(prob, spec, proc)
        for name, q in (
            ("optimum", star),
            ("rloo", train_rloo(logp_ref, R, beta)),
            ("regression", train_regression(logp_ref, R, beta, log_z=log_z)),
        ):
            kl, win = exact_kl(q, logp_ref), exact_win_rate(q, logp_ref, u, proc)
            print(f"{spec:<12} {proc:<6} {name:<11} KL {kl:.4f}  win rate {win:.4f}")
    logp_ref, u, R, beta, star, _ = _setting(prob, "identity", "bon:4")
    q = train_rloo(logp_ref, R, 2 * beta)
    print(f"identity bon:4 rloo at 2 x beta: KL {exact_kl(q, logp_ref):.4f} (a wrong beta)")
