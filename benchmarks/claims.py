"""The paper's claims on the offline testbed: CTRL sweeps over methods x KL budgets x seeds.

Per task (``helpful``: best-of-4 is deployed; ``harmless``: worst-of-4 is the threat), on the shipped
reference LM and ``recipes/claims.yaml``, it trains and evaluates five methods at four KL budgets:

    raw       raw-reward RLHF, beta = identity's beta x s (s: the reward's within-prompt std / std U)
    identity  calibrated identity, Phi(u) = u
    log       Phi(u) = log max(u, 0.01) (the BoN-style tilt; eps ~ 1/K keeps u = 0 finite)
    exp       exp:auto@KL (helpful) or negexp:auto@KL (harmless): t from the theory at each budget
    optimal   optimal@KL: the tabulated fixed-point Phi at each budget

with one optimiser (``--algorithm``: ``regression``, the default, or ``rloo``; ``ALGORITHMS`` holds
each one's settings). At each target KL k in ``--kls`` the beta is the calibrated-space beta reaching k
(``theory.beta_for_kl``); the budgets only place the betas, the *measured* KL is what counts. Seed s
sets ``rl.seed`` and ``evaluate.seed``; the reference artifacts (``seed: 0``) are computed once and
copied to every seed's run directory. Work runs in ``--jobs`` single-threaded processes.

**Resumable across sessions and machines.** Each finished unit (one trained + evaluated policy, or
pi_ref's row) writes its summary to ``docs/results/claims/<task>/<algorithm>/seed<s>/<unit>.json``
(the results row, the last training steps' metrics, wall time); commit them. A rerun skips every unit
whose summary exists, even where ``runs/`` is gone, and ``--max-minutes`` stops handing out new units
after that long, so a sweep can be spread over several sessions. Units run seed by seed. Each
method's resolved t and betas are fixed the first time it runs, in ``methods.json`` beside the
summaries (:func:`pinned`), so every seed and machine trains the same units.

    python benchmarks/claims.py run --task helpful          # 5 seeds x 20 trained policies + pi_ref
    python benchmarks/claims.py run --task harmless
    python benchmarks/claims.py ablate-t --task helpful     # exp:t, t in {2, 4, 8} next to identity
    python benchmarks/claims.py summarize                   # tables + figures into docs/results/

``summarize`` reads whatever has finished: per seed, each method's win rate is interpolated linearly
in log KL at KL 0.12, 0.18, 0.25, 0.5 and 1 (only inside the measured range); across seeds it reports the mean and
a 95% t-interval (S - 1 degrees of freedom) with the number of seeds, and paired per-seed differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "claims.yaml"
RESULTS = ROOT / "docs" / "results"
UNITS = RESULTS / "claims"
KLS = (0.1, 0.3, 0.8, 2.0)
# KL budgets that place the betas, per algorithm: regression realises less KL than its beta's
# calibrated-space budget (the tilt it learns transfers only in part), so its budgets sit higher
ALGORITHM_KLS = {"regression": (0.2, 0.5, 1.0, 2.0)}
# units of a seed run in this order, so a partial sweep has the main comparisons first
PRIORITY = ("identity", "exp", "raw", "optimal", "log")
SEEDS = (0, 1, 2, 3, 4)
# each optimiser's settings over recipes/claims.yaml (which holds the shared ones)
ALGORITHMS: dict[str, dict[str, Any]] = {
    # regression on the exact optimum with on-policy refresh (docs/results.md, "Reaching the
    # frontier"): per step 8 prompts x (4 cached reference samples + 8 fresh policy samples)
    "regression": {
        "rl.algorithm": "regression",
        "prompts.train.limit": None,  # all 256 shipped training prompts
        "rl.steps": 256,
        "rl.samples_per_prompt": 4,
        "rl.onpolicy_samples": 8,
        "rl.lr": 3.0e-5,
        "rl.warmup_steps": 16,
        "rl.save_every": 32,
    },
    # RLOO without the KL floor of the first sweep (30 steps at lr 1e-4 left >= 0.3 nats of noise):
    # a 4x smaller learning rate for 4x the steps, 8 prompts x 4 samples per step
    "rloo": {
        "rl.algorithm": "rloo",
        "prompts.train.limit": None,  # the regression sweep's prompts and reference artifacts
        "rl.steps": 120,
        "rl.lr": 2.5e-5,
        "rl.save_every": 120,
    },
    # the first sweep (and its K / steps ablations): the offline default's 30 steps at lr 1e-4
    "rloo30": {"rl.algorithm": "rloo"},
}
FAMILIES = ("raw", "identity", "log", "exp", "optimal")
TASK_PROC = {"helpful": ("bon:4", "exp"), "harmless": ("won:4", "negexp")}
LOG_SPEC = "log:0.01"


def _kl_tag(k: float) -> str:
    return f"kl{k:g}"


def _kl_of(name: str) -> float | None:
    """The KL budget in a per-budget method's name (``exp-kl0.5`` -> 0.5), None for other methods."""
    return float(name.split("-kl")[1]) if "-kl" in name else None


def run_dir(
    out: Path, task: str, seed: int, k: int | None = None, algorithm: str = "rloo30"
) -> Path:
    """``out/<task>[-K<k>][-<algorithm>]/seed<s>`` (the first RLOO sweep keeps its layout)."""
    name = task if k is None else f"{task}-K{k}"
    return out / (name if algorithm == "rloo30" else f"{name}-{algorithm}") / f"seed{seed}"


def unit_file(task: str, algorithm: str, seed: int, job: Any) -> Path:
    """The committed summary of one unit: ``<method>@beta=<b>.json`` or ``reference.json``."""
    name = "reference" if job is None else f"{job[0]}@beta={float(job[1])!r}"
    return UNITS / task / algorithm / f"seed{seed}" / f"{name}.json"


def _overrides(
    task: str, out: Path, seed: int, k: int | None, algorithm: str = "rloo30"
) -> dict[str, Any]:
    proc = TASK_PROC[task][0]
    ov: dict[str, Any] = {
        **ALGORITHMS[algorithm],
        "task": task,
        "out": str(run_dir(out, task, seed, k, algorithm)),
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
    from infalign.run.reference import ReferenceSet

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
    algorithm: str = "rloo30",
) -> Any:
    """The RunConfig of one seed's run directory (``out/<tag>/seed<s>`` when ``tag`` is given)."""
    from infalign.run.recipe import load_config

    ov = {**_overrides(task, out, seed, k, algorithm), "methods": meths, **(extra or {})}
    if tag is not None:
        ov["out"] = str(out / tag / f"seed{seed}")
    return load_config(RECIPE, ov)


def _tail(train_dir: Path, last: int = 5) -> dict[str, float]:
    """Mean of every numeric metric over the last ``last`` training steps."""
    lines = (train_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines if x.strip()][-last:]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    return {k: float(sum(r[k] for r in rows if k in r) / len(rows)) for k in keys}


def _work(*unit: Any) -> str:
    """One unit (the arguments of :func:`_unit`) in a worker process, on one thread; SIGTERM
    raises inside it like Ctrl-C, so a trainer saves its checkpoint before the worker stops."""
    import torch

    from infalign.rl.signals import sigterm_raises

    torch.set_num_threads(1)
    with sigterm_raises(replace=True):
        return _unit(*unit)


def _unit(
    task: str,
    out: str,
    seed: int,
    k: int | None,
    meths: list[dict[str, Any]],
    job: Any,
    tag: str | None,
    extra: dict[str, Any] | None,
    algorithm: str,
    summary: str | None,
) -> str:
    """Train + evaluate one method at one beta (or evaluate pi_ref, ``job`` None); with
    ``summary``, write the unit's results row, training tail and wall time there."""
    from infalign.run import pipeline
    from infalign.run.io import atomic_write_json
    from infalign.run.runs import RunEnv

    cfg = _load(task, Path(out), seed, k, meths, tag, extra, algorithm)
    t0 = time.perf_counter()
    if job is None:
        pipeline.run_evaluate(cfg, None)
        m, b, t_train = None, None, 0.0
    else:
        name, b = job
        pipeline.run_train(cfg, name, b)
        t_train = time.perf_counter() - t0
        pipeline.run_evaluate(cfg, name, b)
        m = pipeline.get_method(cfg, name)
    wall = time.perf_counter() - t0
    if summary is not None:
        row = pipeline.results_row(RunEnv(cfg), m, b)
        train = None
        if m is not None and b is not None:
            train = {"seconds": t_train, "tail": _tail(pipeline.train_dir(cfg, m.name, b))}
        unit = {"task": task, "algorithm": algorithm, "seed": seed, "job": job}
        atomic_write_json(
            summary, {"unit": unit, "row": row, "train": train, "seconds": wall, "settings": extra}
        )
    what = "reference evaluated" if job is None else f"{job[0]} beta={job[1]:g}"
    return f"{task} {algorithm} seed {seed} K={k}: {what} in {wall:.0f} s"


def _references(
    task: str, out: Path, seeds: list[int], k: int | None, algorithm: str = "rloo30"
) -> float:
    """Reference artifacts once (seed 0 of the run tree), copied to the other seeds; raw scale."""
    from infalign.run import pipeline

    first = _load(task, out, seeds[0], k, methods(task, KLS, 1.0), algorithm=algorithm)
    for split in ("train", "test"):
        pipeline.run_reference(first, split)
    src = Path(first.out) / "reference"
    for s in seeds[1:]:
        dst = run_dir(out, task, s, k, algorithm) / "reference"
        if not dst.is_dir():
            shutil.copytree(src, dst)
    return raw_scale(src / "train")


def _run_units(
    units: list[tuple[Any, ...]],
    jobs: int,
    max_minutes: float | None = None,
    work: Callable[..., str] | None = None,
) -> int:
    """Run the units on ``jobs`` processes, in order (``work``, default :func:`_work`, takes a
    unit's arguments); after ``max_minutes`` no new unit starts (running ones finish). A unit that
    raises is reported and the others go on (it writes no summary, so a rerun retries it); then
    SystemExit names the failed ones. Ctrl-C or SIGTERM stops the workers too (each saves its
    checkpoint), so a rerun resumes where they were. Returns the number of units that ran."""
    from concurrent.futures import FIRST_COMPLETED, Future, wait
    from concurrent.futures.process import BrokenProcessPool

    from infalign.run.parallel import worker_pool

    t0 = time.perf_counter()
    todo, done, failed = list(units), 0, []
    running: dict[Future[str], tuple[Any, ...]] = {}
    deadline = None if max_minutes is None else t0 + 60 * max_minutes
    with worker_pool(jobs) as pool:
        while todo or running:
            while (
                todo
                and len(running) < jobs
                and (deadline is None or time.perf_counter() < deadline)
            ):
                unit = todo.pop(0)
                running[pool.submit(work or _work, *unit)] = unit
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                task, _out, seed, _k, _m, job, *_ = running.pop(f)
                done += 1
                try:
                    msg = f.result()
                except BrokenProcessPool:
                    raise
                except Exception as err:
                    msg = (
                        f"FAILED {task} seed {seed} {job or 'pi_ref'}: {type(err).__name__}: {err}"
                    )
                    failed.append(msg)
                print(f"[{done}/{len(units)} {time.perf_counter() - t0:.0f} s] {msg}", flush=True)
    if todo:
        print(
            f"--max-minutes {max_minutes:g} reached: {len(todo)} units left for a rerun", flush=True
        )
    if failed:
        raise SystemExit(
            f"{len(failed)} unit(s) failed (no summary written; a rerun retries them):\n"
            + "\n".join(failed)
        )
    return done


def _scale_file(task: str, algorithm: str) -> Path:
    return UNITS / task / algorithm / "raw_scale.json"


def _raw_scale(task: str, out: Path, seeds: list[int], algorithm: str) -> float:
    """The raw-reward beta scale, computed once from the reference artifact and committed beside
    the unit summaries (so a rerun on a fresh machine places the same betas)."""
    f = _scale_file(task, algorithm)
    if f.is_file():
        return float(json.loads(f.read_text())["raw_scale"])
    scale = _references(task, out, seeds, None, algorithm)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"raw_scale": scale}) + "\n")
    return scale


def _methods_file(task: str, algorithm: str) -> Path:
    return UNITS / task / algorithm / "methods.json"


def pinned(task: str, algorithm: str, meths: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``meths`` with each method's resolved transform and betas as the first seed that ran it
    chose them, committed in ``methods.json`` beside the unit summaries; new methods are added.
    The auto-t search and the beta root-finding are flat near their answer at large KL: between
    two sessions' code, harmless ``negexp:auto@2`` moved from t 17.69, beta 1.042e-07 to t 18.17,
    beta 6.979e-08, which would have made seeds 2-4 run another unit than seeds 0-1."""
    from infalign import theory

    proc = TASK_PROC[task][0]
    f = _methods_file(task, algorithm)
    pins = json.loads(f.read_text())["methods"] if f.is_file() else {}
    new = [m for m in meths if m["name"] not in pins]
    for m in new:
        spec = m["transform"]
        base, kl = theory.split_target(spec)
        if kl is not None and base != "optimal":  # pin exp|negexp:auto's t; optimal is a table
            spec = str(theory.resolve_transform(spec, proc, kl=kl))
        pins[m["name"]] = {"transform": spec, "betas": m["betas"]}
    if new:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"methods": pins}, indent=1) + "\n")
    return [{"name": m["name"], **pins[m["name"]]} for m in meths]


def _sweep(
    task: str,
    out: Path,
    seeds: list[int],
    algorithm: str,
    meths: list[dict[str, Any]],
    jobs: int,
    max_minutes: float | None,
) -> None:
    """Every (seed, method, beta) unit and pi_ref per seed, seed by seed, skipping finished ones."""
    units: list[tuple[Any, ...]] = []
    extra = ALGORITHMS[algorithm]

    def rank(m: dict[str, Any]) -> int:
        fam = m["name"].split("-kl")[0]
        return PRIORITY.index(fam) if fam in PRIORITY else len(PRIORITY)

    ordered = sorted(meths, key=rank)
    for s in seeds:
        for job in [None, *((m["name"], b) for m in ordered for b in m["betas"])]:
            f = unit_file(task, algorithm, s, job)
            if not f.is_file():
                f.parent.mkdir(parents=True, exist_ok=True)
                units.append((task, str(out), s, None, meths, job, None, extra, algorithm, str(f)))
    n_all = len(seeds) * (1 + sum(len(m["betas"]) for m in meths))
    print(f"{task} / {algorithm}: {n_all - len(units)} of {n_all} units done already", flush=True)
    if units:
        _references(task, out, seeds, None, algorithm)
        _run_units(units, jobs, max_minutes)


def cmd_run(a: argparse.Namespace) -> None:
    out, seeds = Path(a.out), list(a.seeds)
    scale = _raw_scale(a.task, out, seeds, a.algorithm)
    meths = pinned(a.task, a.algorithm, methods(a.task, tuple(a.kls), scale))
    print(f"{a.task}: raw-reward scale {scale:.3f}; methods:", flush=True)
    for m in meths:
        print(f"  {m['name']:<16} {m['transform']:<18} betas {m['betas']}", flush=True)
    _sweep(a.task, out, seeds, a.algorithm, meths, a.jobs, a.max_minutes)


def t_methods(task: str, kls: tuple[float, ...], ts: tuple[float, ...]) -> list[dict[str, Any]]:
    """The transform under an imperfect optimiser: exp:t (negexp:t for worst-of-n) for fixed t at
    the betas reaching each KL budget, next to the sweep's own methods (which hold the theory's t)."""
    from infalign import theory

    fam = TASK_PROC[task][1]
    out = []
    for t in ts:
        spec = f"{fam}:{t:g}"
        betas = [float(f"{theory.beta_for_kl(spec, k):.4g}") for k in kls]
        out.append({"name": f"{fam}{t:g}", "transform": spec, "betas": betas})
    return out


def cmd_ablate_t(a: argparse.Namespace) -> None:
    out, seeds = Path(a.out), list(a.seeds)
    meths = pinned(a.task, a.algorithm, t_methods(a.task, tuple(a.kls), tuple(a.ts)))
    for m in meths:
        print(f"  {m['name']:<16} {m['transform']:<18} betas {m['betas']}", flush=True)
    _sweep(a.task, out, seeds, a.algorithm, meths, a.jobs, a.max_minutes)


def cmd_eval_train(a: argparse.Namespace) -> None:
    """The finished units of the given seeds re-evaluated on the first ``--prompts`` *training*
    prompts against a fresh pi_ref pool of the held-out pool's size (the gap on the training
    prompts). The run tree ``<task>-<algorithm>-trainprompts`` links the trained policies
    (``train/``); summaries go to ``docs/results/claims/<task>/<algorithm>/seed<s>/trainprompts/``."""
    from infalign.lm.tasks import TASKS

    out = Path(a.out)
    tag = f"{run_dir(out, a.task, 0, None, a.algorithm).parent.name}-trainprompts"
    extra = {
        **ALGORITHMS[a.algorithm],
        "prompts.test.source": TASKS[a.task].train_prompts,
        "prompts.test.limit": a.prompts,
    }
    units: list[tuple[Any, ...]] = []
    for s in a.seeds:
        src = run_dir(out, a.task, s, None, a.algorithm)
        dst = out / tag / f"seed{s}"
        dst.mkdir(parents=True, exist_ok=True)
        if (src / "train").is_dir() and not (dst / "train").exists():
            (dst / "train").symlink_to((src / "train").resolve(), target_is_directory=True)
        for f in sorted(unit_file(a.task, a.algorithm, s, None).parent.glob("*.json")):
            unit = json.loads(f.read_text())
            job, row = unit["unit"]["job"], unit["row"]
            summary = f.parent / "trainprompts" / f.name
            if summary.is_file() or (job is not None and not (dst / "train").exists()):
                continue
            meths = (
                [{"name": job[0], "transform": row["transform"], "betas": [job[1]]}] if job else []
            )
            summary.parent.mkdir(parents=True, exist_ok=True)
            units.append(
                (a.task, str(out), s, None, meths, job, tag, extra, a.algorithm, str(summary))
            )
    print(
        f"{a.task} / {a.algorithm}: {len(units)} units to evaluate on training prompts", flush=True
    )
    _run_units(units, a.jobs, a.max_minutes)


def cmd_ablate_k(a: argparse.Namespace) -> None:
    """The RLOO sweep's exp method at the ``--kl`` budget, with K = ``--ks`` reference samples."""
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
    """RLOO with a 4x smaller learning rate for 4x the steps (same samples per step): does the
    measured point move toward the calibrated-space optimum?"""
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


def cmd_tilt(a: argparse.Namespace) -> None:
    """Every committed unit's tilt span ``(Phi(1) - Phi(0)) / beta`` (``train.tilt_span``) against
    how far its measured KL overshot the budget that placed its beta: the basis of
    ``train.TILT_WARN_NATS`` (docs/results.md). Raw and optimal (no closed-form Phi) are left out."""
    from infalign.core.transforms import parse_transform
    from infalign.run.train import tilt_span

    rows = []
    for task in sorted(TASK_PROC):
        f = _methods_file(task, a.algorithm)
        if not f.is_file():
            continue
        pins = json.loads(f.read_text())["methods"]
        for u in sorted((UNITS / task / a.algorithm).glob("seed*/*@*.json")):
            r = json.loads(u.read_text())["row"]
            pin = pins.get(r["method"])
            if pin is None or pin["transform"] == "raw" or pin["transform"].startswith("optimal"):
                continue
            name = r["method"]
            k = _kl_of(name)
            if k is None:  # a fixed transform: its betas are listed in budget order
                k = a.kls[pin["betas"].index(r["beta"])]
            span = tilt_span(parse_transform(pin["transform"]), r["beta"])
            rows.append((span, task, u.parent.name, name, r["beta"], k, r["kl"]["mean"]))
    print(
        "| tilt span (nats) | task | seed | method | beta | KL budget | measured KL | overshoot |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for span, task, seed, name, beta, k, kl in sorted(rows):
        print(
            f"| {span:.3g} | {task} | {seed} | {name} | {beta:g} | {k:g} | {kl:.3g} | {kl / k:.2f}x |"
        )


def _write_results(task: str, out: Path, seeds: list[int], k: int | None, meths: Any) -> None:
    from infalign.run import pipeline

    for s in seeds:
        pipeline.write_results(_load(task, out, s, k, meths))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "ablate-t", "eval-train", "ablate-k", "ablate-steps", "summarize", "tilt"):
        q = sub.add_parser(name)
        q.add_argument("--out", default=str(ROOT / "runs" / "claims"))
        if name in ("run", "ablate-t", "eval-train", "tilt"):
            q.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="regression")
            q.add_argument("--kls", type=float, nargs="+", default=None)
        if name in ("run", "ablate-t", "eval-train"):
            q.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
            q.add_argument("--max-minutes", type=float, default=None)
        elif name not in ("summarize", "tilt"):
            q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        if name not in ("summarize", "tilt"):
            q.add_argument("--task", choices=sorted(TASK_PROC), default="helpful")
            q.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
        if name == "ablate-t":
            q.add_argument("--ts", type=float, nargs="+", default=[2.0, 4.0, 8.0])
        if name == "eval-train":
            q.add_argument("--prompts", type=int, default=64)
        if name == "ablate-steps":
            q.add_argument("--steps", type=int, default=120)
            q.add_argument("--lr", type=float, default=2.5e-5)
            q.add_argument("--kl", type=float, default=0.8)
        if name == "ablate-k":
            q.add_argument("--ks", type=int, nargs="+", default=[16, 256])
            q.add_argument("--kl", type=float, default=0.8)
    a = p.parse_args(argv)
    if getattr(a, "kls", "") is None:
        a.kls = list(ALGORITHM_KLS.get(a.algorithm, KLS))
    if a.cmd == "summarize":
        from claims_report import cmd_summarize

        return cmd_summarize(a)
    commands = {
        "run": cmd_run,
        "ablate-t": cmd_ablate_t,
        "eval-train": cmd_eval_train,
        "ablate-k": cmd_ablate_k,
        "ablate-steps": cmd_ablate_steps,
        "tilt": cmd_tilt,
    }
    from infalign.rl.signals import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM stops the workers like Ctrl-C (they save checkpoints)
            commands[a.cmd](a)
    except Terminated:
        print("terminated: rerun the same command to resume", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    main()
