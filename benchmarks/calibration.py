"""Calibration throughput: C_hat for 10^6 queries against K=512 reference rewards per prompt.

Claim (spec section 2): one sort of the (P, K) reference rewards at fit time and two batched
``searchsorted`` calls per query make calibration O(log K) a query, far cheaper than the naive
broadcast comparison ``((r[:, :, None] > ref[:, None, :]).sum(-1) + 0.5 * (==).sum(-1)) / K``, which is
O(K) a query and needs a (P, M, K) temporary (so it is timed on a chunk of prompts only).

Printed: fit time, call time and queries/second with one thread and with torch's default thread count,
the naive peer's time per query on a chunk, and the ratio; the two are checked to agree on the chunk.

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/calibration.py``. Timings are not asserted.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform

import torch
from _common import best_time

from infalign.core.calibration import EmpiricalCalibration
from infalign.run.io import git_commit


def naive(ref: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The peer: a (P, M, K) broadcast comparison (ties 1/2), no missing entries."""
    a, b = r[:, :, None], ref[:, None, :]
    return ((a > b).sum(-1) + 0.5 * (a == b).sum(-1)).to(torch.float64) / ref.shape[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--m", type=int, default=1000, help="queries per prompt")
    ap.add_argument("--k", type=int, default=512, help="reference rewards per prompt")
    ap.add_argument("--chunk", type=int, default=50, help="prompts in the naive peer's chunk")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    P, M, K = args.prompts, args.m, args.k
    default_threads = torch.get_num_threads()

    sha = git_commit()
    print(
        f"# benchmarks/calibration.py  commit={sha}  torch={torch.__version__}  "
        f"python={platform.python_version()}"
    )
    print(f"# machine: {machine()}")
    print(f"# P={P} prompts x M={M} queries = {P * M:.2e} queries, K={K} references, {args.dtype}")

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(P, K, generator=gen).to(dtype)
    r = torch.randn(P, M, generator=gen).to(dtype)
    c = args.chunk

    print(
        f"{'threads':>8} {'fit s':>9} {'call s':>9} {'queries/s':>11} "
        f"{'naive s/query':>14} {'fast s/query':>13} {'naive/fast':>10}"
    )
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        t_fit = best_time(lambda: EmpiricalCalibration.fit(ref))
        cal = EmpiricalCalibration.fit(ref)
        t_call = best_time(functools.partial(cal, r))
        t_naive = best_time(lambda: naive(ref[:c], r[:c]), repeat=3)
        fast_q = t_call / (P * M)
        naive_q = t_naive / (c * M)
        print(
            f"{threads:>8d} {t_fit:>9.4f} {t_call:>9.4f} {P * M / t_call:>11.3e} "
            f"{naive_q:>14.3e} {fast_q:>13.3e} {naive_q / fast_q:>10.1f}"
        )
    torch.set_num_threads(default_threads)

    # the two agree exactly (same counts) on the chunk, including ties
    ref_t = torch.randint(-5, 6, (c, K), generator=gen).to(dtype)
    r_t = torch.randint(-6, 7, (c, M), generator=gen).to(dtype)
    for a, b in ((ref[:c], r[:c]), (ref_t, r_t)):
        got = EmpiricalCalibration.fit(a)(b)
        if not torch.equal(got, naive(a, b)):
            raise SystemExit("searchsorted and naive calibration disagree")
    print("# check: searchsorted == naive broadcast on the chunk (continuous and tied rewards)")


if __name__ == "__main__":
    main()
