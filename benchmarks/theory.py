"""Benchmark: calibrated-space frontier time, against scipy adaptive quadrature as the peer.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/theory.py [--procedure bon:4] [--threads 1]

Times ``theory.frontier`` for 5 transforms (identity, log, exp:auto, negexp:auto, optimal) at 40 KL
targets, with the best t found at every point, then recomputes a sample of rows with
``scipy.integrate.quad`` (beta found by ``brentq``) to report the accuracy and the speed ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch
from scipy import integrate, optimize

from infalign import theory
from infalign.core.procedures import parse_procedure
from infalign.core.transforms import parse_transform
from infalign.run.io import git_commit


def _quad_row(spec: str, kl: float, proc, lam_hint: float) -> tuple[float, float]:
    """Peer: win rate of the tilted policy at KL ``kl`` by nested adaptive quadrature
    (brentq for lam = 1/beta, bracketed within a factor 3 of ``lam_hint``)."""
    tf = parse_transform(spec)
    phi = np.vectorize(lambda u: float(tf(u)))

    def stats(lam: float) -> tuple[float, float]:
        m = float(phi(1.0))
        z = integrate.quad(lambda u: math.exp(lam * (phi(u) - m)), 0, 1, limit=200)[0]
        e = integrate.quad(lambda u: phi(u) * math.exp(lam * (phi(u) - m)), 0, 1, limit=200)[0]
        return z, lam * e / z - lam * m - math.log(z)

    lam = optimize.brentq(lambda x: stats(x)[1] - kl, lam_hint / 3, lam_hint * 3, xtol=1e-12)
    z = stats(lam)[0]
    m = float(phi(1.0))

    def F(u: float) -> float:
        return integrate.quad(lambda v: math.exp(lam * (phi(v) - m)) / z, 0, u, limit=200)[0]

    w = 1 - integrate.quad(lambda u: proc.cdf_map(F(u)) * proc.cdf_map_derivative(u), 0, 1)[0]
    return w, 1 / lam


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procedure", default="bon:4")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    proc = parse_procedure(args.procedure)
    print(
        f"# commit={git_commit()} {platform.machine()} {platform.system()} "
        f"python={platform.python_version()} cpus={os.cpu_count()} numpy={np.__version__}"
    )
    transforms = ["identity", "log", "exp:auto", "negexp:auto", "optimal"]
    kls = np.geomspace(0.05, 3.0, 40)

    t0 = time.perf_counter()
    rows = theory.frontier(proc, transforms, kls)
    total = time.perf_counter() - t0
    print(
        f"frontier {proc}: {len(transforms)} transforms x {kls.size} KL values "
        f"({len(rows)} rows) in {total:.2f} s"
    )
    for spec in transforms:
        t0 = time.perf_counter()
        theory.frontier(proc, [spec], kls)
        print(f"  {spec:>12}: {time.perf_counter() - t0:6.2f} s")

    # Peer: the same rows by scipy adaptive quadrature (fixed transforms, a few KL values).
    sample = [r for r in rows if r.transform in ("identity", "log") or r.transform == "exp:auto"]
    sample = [r for r in sample if any(abs(r.kl - k) < 1e-9 for k in kls[::13])]
    t0 = time.perf_counter()
    errs, beta_errs = [], []
    for r in sample:
        w, beta = _quad_row(r.resolved, r.kl, proc, 1 / r.beta)
        errs.append(abs(w - r.win_rate))
        beta_errs.append(abs(beta / r.beta - 1))
    peer = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    for r in sample:
        theory.frontier(proc, [r.resolved], [r.kl])
    ours = (time.perf_counter() - t0) / len(sample)
    print(
        f"peer scipy.quad: {peer * 1e3:.1f} ms per row vs infalign {ours * 1e3:.1f} ms per row "
        f"(ratio {peer / ours:.1f}x); max |win-rate difference| {max(errs):.2e} "
        f"over {len(sample)} rows"
    )


if __name__ == "__main__":
    main()
