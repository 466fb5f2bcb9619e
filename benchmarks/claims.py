"""The paper's claims on the offline testbed: CTRL sweeps over methods x KL budgets x seeds.

Per task (``helpful``: best-of-4 is deployed; ``harmless``: worst-of-4 is the threat), on the shipped
reference LM and ``recipes/claims.yaml``, it trains and evaluates five methods at four KL budgets,
three seeds each:

    raw       raw-reward RLHF, beta = identity's beta x s (s: the reward's within-prompt std / std U)
    identity  calibrated identity, Phi(u) = u
    log       Phi(u) = log max(u, 0.01) (the BoN-style tilt; eps ~ 1/K keeps u = 0 finite)
    exp       exp:auto@KL (helpful) or negexp:auto@KL (harmless): t from the theory at each budget
    optimal   optimal@KL: the tabulated fixed-point Phi at each budget

At each target KL k in ``--kls`` the beta is the calibrated-space beta reaching k
(``theory.beta_for_kl``), so the targets span the measured KL range; the *measured* KL is what counts.
Seed s sets ``rl.seed`` and ``evaluate.seed``; the reference artifacts (``seed: 0``) are computed once
and copied to every seed's run directory. Work runs in ``--jobs`` single-threaded processes.

    python benchmarks/claims.py run --task helpful          # 63 train+eval units, ~48 min on 2 cores
    python benchmarks/claims.py run --task harmless
    python benchmarks/claims.py ablate-k --task helpful     # K = 16, 256 (K = 64 is the sweep's)
    python benchmarks/claims.py summarize                   # tables + figures into docs/results/

``summarize`` reads whatever has finished: per seed, each method's win rate is interpolated linearly in
log KL at KL 0.25, 0.5 and 1 (only inside the measured range); across seeds it reports the mean and a
95% t-interval (S - 1 degrees of freedom), and paired per-seed differences between methods.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "claims.yaml"
RESULTS = ROOT / "docs" / "results"
KLS = (0.1, 0.3, 0.8, 2.0)
FAMILIES = ("raw", "identity", "log", "exp", "optimal")
TASK_PROC = {"helpful": ("bon:4", "exp"), "harmless": ("won:4", "negexp")}
LOG_SPEC = "log:0.01"


def _kl_tag(k: float) -> str:
    return f"kl{k:g}"


def run_dir(out: Path, task: str, seed: int, k: int | None = None) -> Path:
    return out / (task if k is None else f"{task}-K{k}") / f"seed{seed}"


def _overrides(task: str, out: Path, seed: int, k: int | None) -> dict[str, Any]:
    proc = TASK_PROC[task][0]
    ov: dict[str, Any] = {
        "task": task,
        "out": str(run_dir(out, task, seed, k)),
        "rl.seed": seed,
        "evaluate.seed": seed,
        "evaluate.procedures": ["sample", proc],
        "report.procedure": proc,
        "report.title": f"claims sweep, {task}, {proc}, seed {seed}"
        + ("" if k is None else f", K={k}"),
    }
    if k is not None:
        ov["reference.num_samples"] = k
    return ov


def methods(task: str, kls: tuple[float, ...], raw_scale: float) -> list[dict[str, Any]]:
    """The sweep's method list: one method per fixed transform (betas for each KL target), one method
    per KL target for the KL-dependent transforms (exp:auto@k, optimal@k)."""
    from infalign import theory

    proc, fam = TASK_PROC[task]

    def beta(spec: str, k: float) -> float:
        tf = theory.resolve_transform(spec, proc, kl=k)
        return float(f"{theory.beta_for_kl(tf, k):.4g}")

    ident = [beta("identity", k) for k in kls]
    out = [
        {
            "name": "raw",
            "transform": "raw",
            "betas": [float(f"{b * raw_scale:.4g}") for b in ident],
        },
        {"name": "identity", "transform": "identity", "betas": ident},
        {"name": "log", "transform": LOG_SPEC, "betas": [beta(LOG_SPEC, k) for k in kls]},
    ]
    for spec, name in ((f"{fam}:auto", "exp"), ("optimal", "optimal")):
        for k in kls:
            s = f"{spec}@{k:g}"
            out.append({"name": f"{name}-{_kl_tag(k)}", "transform": s, "betas": [beta(s, k)]})
    return out


def raw_scale(ref_dir: Path) -> float:
    """Mean within-prompt std of the raw reference rewards over the std of U[0, 1] (1 / sqrt 12):
    the factor that puts raw-reward betas on the calibrated scale."""
    from infalign.reference import ReferenceSet

    r = ReferenceSet.load(ref_dir).rewards.double()
    return float(r.std(dim=1).mean() * math.sqrt(12))


def _load(
    task: str,
    out: Path,
    seed: int,
    k: int | None,
    meths: list[dict[str, Any]],
    tag: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The RunConfig of one seed's run directory (``out/<tag>/seed<s>`` when ``tag`` is given)."""
    from infalign.config import load_config

    ov = {**_overrides(task, out, seed, k), "methods": meths, **(extra or {})}
    if tag is not None:
        ov["out"] = str(out / tag / f"seed{seed}")
    return load_config(RECIPE, ov)


def _work(
    task: str,
    out: str,
    seed: int,
    k: int | None,
    meths: list[dict[str, Any]],
    job: Any,
    tag: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """One unit in a worker process: train + evaluate one method at one beta (or evaluate pi_ref)."""
    import torch

    from infalign import pipeline

    torch.set_num_threads(1)
    cfg = _load(task, Path(out), seed, k, meths, tag, extra)
    t0 = time.perf_counter()
    if job is None:
        pipeline.run_evaluate(cfg, None)
        return f"seed {seed} K={k}: reference evaluated in {time.perf_counter() - t0:.0f} s"
    name, b = job
    pipeline.run_train(cfg, name, b)
    pipeline.run_evaluate(cfg, name, b)
    return f"seed {seed} K={k}: {name} beta={b:g} in {time.perf_counter() - t0:.0f} s"


def _references(task: str, out: Path, seeds: list[int], k: int | None) -> float:
    """Reference artifacts once (seed 0 of the run tree), copied to the other seeds; raw scale."""
    from infalign import pipeline

    first = _load(task, out, seeds[0], k, methods(task, KLS, 1.0))
    for split in ("train", "test"):
        pipeline.run_reference(first, split)
    src = Path(first.out) / "reference"
    for s in seeds[1:]:
        dst = run_dir(out, task, s, k) / "reference"
        if not dst.is_dir():
            shutil.copytree(src, dst)
    return raw_scale(src / "train")


def _run_units(units: list[tuple[Any, ...]], jobs: int) -> None:
    import multiprocessing as mp

    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_work, *u) for u in units]
        for i, f in enumerate(as_completed(futures), 1):
            print(f"[{i}/{len(units)} {time.perf_counter() - t0:.0f} s] {f.result()}", flush=True)


def cmd_run(a: argparse.Namespace) -> None:
    out, seeds = Path(a.out), list(a.seeds)
    scale = _references(a.task, out, seeds, None)
    meths = methods(a.task, tuple(a.kls), scale)
    print(f"{a.task}: raw-reward scale {scale:.3f}; methods:", flush=True)
    for m in meths:
        print(f"  {m['name']:<16} {m['transform']:<18} betas {m['betas']}", flush=True)
    units: list[tuple[Any, ...]] = []
    for s in seeds:
        units.append((a.task, str(out), s, None, meths, None))
        units += [
            (a.task, str(out), s, None, meths, (m["name"], b)) for m in meths for b in m["betas"]
        ]
    _run_units(units, a.jobs)
    _write_results(a.task, out, seeds, None, meths)


def cmd_ablate_k(a: argparse.Namespace) -> None:
    """The sweep's exp method at the ``--kl`` budget, with K = ``--ks`` reference samples."""
    out, seeds = Path(a.out), list(a.seeds)
    name = f"exp-{_kl_tag(a.kl)}"
    meths = [m for m in methods(a.task, (a.kl,), 1.0) if m["name"] == name]
    units: list[tuple[Any, ...]] = []
    for k in a.ks:
        _references(a.task, out, seeds, k)
        units += [(a.task, str(out), s, k, meths, (name, meths[0]["betas"][0])) for s in seeds]
        units += [(a.task, str(out), s, k, meths, None) for s in seeds]
    _run_units(units, a.jobs)
    for k in a.ks:
        _write_results(a.task, out, seeds, k, meths)


def steps_tag(task: str, steps: int, lr: float) -> str:
    return f"{task}-steps{steps}-lr{lr:g}"


def cmd_ablate_steps(a: argparse.Namespace) -> None:
    """The same KL-regularised objective with a 4x smaller learning rate for 4x the steps (same
    samples per step): does the measured point move toward the calibrated-space optimum?"""
    out, seeds = Path(a.out), list(a.seeds)
    scale = _references(a.task, out, seeds, None)
    keep = ("identity", f"exp-{_kl_tag(a.kl)}")
    meths = [m for m in methods(a.task, (a.kl,), scale) if m["name"] in keep]
    tag = steps_tag(a.task, a.steps, a.lr)
    extra = {"rl.steps": a.steps, "rl.lr": a.lr, "rl.save_every": a.steps}
    units: list[tuple[Any, ...]] = []
    for s in seeds:
        dst = out / tag / f"seed{s}" / "reference"
        if not dst.is_dir():
            shutil.copytree(run_dir(out, a.task, s) / "reference", dst)
        for m in meths:
            units.append((a.task, str(out), s, None, meths, (m["name"], m["betas"][0]), tag, extra))
    _run_units(units, a.jobs)


def _write_results(task: str, out: Path, seeds: list[int], k: int | None, meths: Any) -> None:
    from infalign import pipeline

    for s in seeds:
        pipeline.write_results(_load(task, out, s, k, meths))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "ablate-k", "ablate-steps", "summarize"):
        q = sub.add_parser(name)
        q.add_argument("--out", default=str(ROOT / "runs" / "claims"))
        if name != "summarize":
            q.add_argument("--task", choices=sorted(TASK_PROC), default="helpful")
            q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            q.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
        if name == "run":
            q.add_argument("--kls", type=float, nargs="+", default=list(KLS))
        if name == "ablate-steps":
            q.add_argument("--steps", type=int, default=120)
            q.add_argument("--lr", type=float, default=2.5e-5)
            q.add_argument("--kl", type=float, default=0.8)
        if name == "ablate-k":
            q.add_argument("--ks", type=int, nargs="+", default=[16, 256])
            q.add_argument("--kl", type=float, default=0.8)
    a = p.parse_args(argv)
    if a.cmd == "summarize":
        from claims_report import cmd_summarize

        return cmd_summarize(a)
    {"run": cmd_run, "ablate-k": cmd_ablate_k, "ablate-steps": cmd_ablate_steps}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
