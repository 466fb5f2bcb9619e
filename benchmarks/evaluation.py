"""Evaluation efficiency: the all-subsets win-rate estimator vs fresh disjoint groups.

Claim (spec section 7): averaging over all n-subsets of M samples per side is unbiased and has far lower
variance than the naive estimator that splits the M samples of each side into M/n disjoint groups of n,
serves one response per group and compares the groups pairwise, at the same M samples per prompt.

Setup: calibrated rewards, policy ~ Beta(alpha, 1) (F(u) = u^alpha), reference ~ Uniform(0, 1), so the
truth is ``W_T = 1 - int_0^1 G(u^alpha) G'(u) du`` (BoN_n: alpha / (1 + alpha) for every n).
Printed per procedure: the truth, each estimator's mean and per-prompt standard deviation over many
independent prompts (the standard error of a one-prompt estimate), their ratio and the implied
sample-size factor (variance ratio); then the 95% bootstrap interval width over P prompts for each,
and the time per call at P=1000, M=64 against the naive estimator and an O(M M') pairwise peer.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/evaluation.py``. Timings are not asserted.
"""

from __future__ import annotations

import argparse
import platform

import torch
from _common import best_time
from scipy import integrate

from infalign.core.evaluation import (
    all_subsets_win,
    bootstrap_interval,
    inference_win_rate,
    subset_weights,
)
from infalign.core.procedures import Procedure, parse_procedure
from infalign.run.io import git_commit


def truth(proc: Procedure, alpha: float) -> float:
    """W_T of Beta(alpha, 1) vs Uniform: 1 - int_0^1 G(u^alpha) G'(u) du."""
    val, _ = integrate.quad(
        lambda u: proc.cdf_map(u**alpha) * proc.cdf_map_derivative(u), 0, 1, limit=200
    )
    return 1.0 - val


def draw(P: int, M: int, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.rand(P, M, generator=gen, dtype=torch.float64) ** (1 / alpha)
    b = torch.rand(P, M, generator=gen, dtype=torch.float64)
    return a, b


def naive_win(a: torch.Tensor, b: torch.Tensor, proc: Procedure) -> torch.Tensor:
    """(P,) mean over g of 1{a_served,g > b_served,g} + 1/2 1{=}, groups [g n, (g+1) n) of each side."""
    sa = a.gather(1, proc.select(a, generator=0))
    sb = b.gather(1, proc.select(b, generator=1))
    return ((sa > sb).double() + 0.5 * (sa == sb).double()).mean(dim=1)


def pairwise_win(a: torch.Tensor, b: torch.Tensor, proc: Procedure) -> torch.Tensor:
    """O(M M') peer: sum_i sum_k w_i w'_k (1{a_i > b_k} + 1/2 1{=}) with a (P, M, M') comparison."""
    a, b = a.sort(1).values, b.sort(1).values
    w = subset_weights(a.shape[1], proc.n, proc.rank)
    wr = subset_weights(b.shape[1], proc.n, proc.rank)
    cmp = (a[:, :, None] > b[:, None, :]).double() + 0.5 * (a[:, :, None] == b[:, None, :]).double()
    return torch.einsum("i,pik,k->p", w, cmp, wr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alpha", type=float, default=2.0)
    ap.add_argument("--m", type=int, default=64, help="samples per prompt per side")
    ap.add_argument("--prompts", type=int, default=20000, help="independent prompts for the std")
    ap.add_argument("--ci-prompts", type=int, default=100, help="prompts per evaluation (CI width)")
    ap.add_argument("--ci-reps", type=int, default=200, help="evaluations for the CI width")
    ap.add_argument("--procedures", default="sample,bon:4,bon:16,won:4,kth:2:4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    print(
        f"# benchmarks/evaluation.py  commit={git_commit()}  torch={torch.__version__}  "
        f"{platform.machine()} {platform.processor() or platform.system()}  threads=1"
    )
    print(
        f"# policy Beta({args.alpha}, 1) vs reference U(0, 1), M = M' = {args.m} samples per side, "
        f"{args.prompts} prompts for the std, seed {args.seed}"
    )
    print()
    print("## Standard error of a one-prompt estimate (std over independent prompts)")
    header = (
        f"{'procedure':>9} {'truth':>7} {'subsets':>8} {'naive':>8} {'se_subsets':>10} "
        f"{'se_naive':>9} {'se_ratio':>8} {'var_ratio':>9}"
    )
    print(header)
    M = args.m
    gen = torch.Generator().manual_seed(args.seed)
    procs = [parse_procedure(s) for s in args.procedures.split(",")]
    for proc in procs:
        t = truth(proc, args.alpha)
        a, b = draw(args.prompts, M, args.alpha, gen)
        sub = all_subsets_win(a, b, proc.n, proc.rank)
        nav = naive_win(a, b, proc)
        s_sub, s_nav = float(sub.std()), float(nav.std())
        print(
            f"{proc.spec():>9} {t:7.4f} {float(sub.mean()):8.4f} {float(nav.mean()):8.4f} "
            f"{s_sub:10.4f} {s_nav:9.4f} {s_nav / s_sub:8.2f} {(s_nav / s_sub) ** 2:9.1f}"
        )

    P, R = args.ci_prompts, args.ci_reps
    print()
    print(
        f"## 95% bootstrap CI over P={P} prompts, {R} evaluations (width mean, coverage of truth)"
    )
    print(
        f"{'procedure':>9} {'width_subsets':>13} {'width_naive':>11} {'ratio':>6} "
        f"{'cover_subsets':>13} {'cover_naive':>11}"
    )
    for proc in procs:
        t = truth(proc, args.alpha)
        w_s, w_n, c_s, c_n = [], [], 0, 0
        for r in range(R):
            a, b = draw(P, M, args.alpha, gen)
            res = inference_win_rate(a, b, proc, bootstrap=1000, seed=r)
            lo, hi = bootstrap_interval(naive_win(a, b, proc), 0.95, 1000, seed=r)
            w_s.append(res.high - res.low)
            w_n.append(hi - lo)
            c_s += res.low <= t <= res.high
            c_n += lo <= t <= hi
        ws, wn = sum(w_s) / R, sum(w_n) / R
        print(
            f"{proc.spec():>9} {ws:13.4f} {wn:11.4f} {wn / ws:6.2f} {c_s / R:13.3f} {c_n / R:11.3f}"
        )

    print()
    P = 1000
    proc = parse_procedure("bon:4")
    a, b = draw(P, M, args.alpha, gen)
    print(f"## Time per call, P={P}, M=M'={M}, bon:4 (best of 7, 1 thread)")
    rows = [
        ("inference_win_rate (bootstrap=1000)", lambda: inference_win_rate(a, b, proc)),
        ("inference_win_rate (bootstrap=0)", lambda: inference_win_rate(a, b, proc, bootstrap=0)),
        ("all_subsets_win (core, sort+searchsorted)", lambda: all_subsets_win(a, b, 4, 3)),
        ("pairwise O(M M') peer", lambda: pairwise_win(a, b, proc)),
        ("naive disjoint groups (select)", lambda: naive_win(a, b, proc)),
    ]
    times = [(name, best_time(fn, repeat=7)) for name, fn in rows]
    core = times[2][1]
    for name, sec in times:
        print(f"{name:>42}: {sec * 1e3:8.2f} ms  ({sec / core:5.2f} x core)")


if __name__ == "__main__":
    main()
