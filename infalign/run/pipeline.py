"""The end-to-end pipeline over a validated :class:`~infalign.run.config.RunConfig`:
reference (train, test) -> for each method x beta: train, evaluate -> evaluate pi_ref -> results -> report.

Layout under ``cfg.out`` (every file written atomically; ``docs/metrics.md`` lists every key):

    config.yaml, manifest.json          the config of the latest command, what ran it
    reference/train/                    K = reference.num_samples samples per training prompt (calibration)
    reference/test/                     M' = evaluate.reference_samples per test prompt (evaluation's pi_ref side)
    train/<method>/beta=<b>/            metrics.jsonl, checkpoint/, transform.json, manifest.json
    eval/<method>/beta=<b>/             eval.json, samples.jsonl, manifest.json
    eval/reference/                     the same for pi_ref itself (fresh samples: win rate ~0.5, KL 0)
    results.json                        one row per method x beta, plus the reference row

**Reuse.** Every stage directory holds a ``manifest.json`` whose ``config`` is the *stage key*: the
part of the RunConfig that determines that artifact, and the SHA-256 of the local inputs it reads
(prompt sets, model directories, the reward's source; :mod:`infalign.run.keys`). A stage's key includes
the keys of the stages it reads. A stage whose manifest says ``status: done`` is reused, so a second
``run`` only does what is missing (e.g. a new beta). A stage made with a different key is a ValueError
naming the first differing dotted field, or the input file whose content changed: results are never
mixed silently; use another ``out`` or delete the directory. An unfinished stage with the same key
resumes (reference chunks, trainer checkpoint). Settings that do not change numbers (devices, reward
batch size, ``rl.save_every``) are not in the keys.

**Locks.** A command locks each stage directory it builds (:mod:`infalign.run.lock`); a second
command that needs the same stage gets a one-line error naming the holder's pid.

The stages live in :mod:`~infalign.run.reference` (``reference_stage``), :mod:`~infalign.run.train`,
:mod:`~infalign.run.evaluate` and :mod:`~infalign.run.results`; paths, keys, manifests, locks,
:func:`preflight` and the cleanup live in the stage store :mod:`infalign.run.runs`.

**Failures.** Inputs are checked by :func:`preflight` before any model is loaded or any file written. If
a command fails later (e.g. a NaN reward), directories it created that hold no resumable work are
removed; a KeyboardInterrupt leaves everything in place (finished stages and checkpoints are kept).
``docs/reliability.md`` lists the faults tried and what each gives.

**Seeds.** Reference artifacts use ``derive_seed(seed, 1)`` (train) and ``derive_seed(seed, 2)`` (test),
evaluation sampling ``derive_seed(evaluate.seed, 3)`` (the same for every policy), training ``rl.seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from infalign.run.config import RunConfig
from infalign.run.evaluate import evaluate_stage, require_trained
from infalign.run.parallel import Unit, run_stage, run_units
from infalign.run.reference import ReferenceSet, reference_stage
from infalign.run.results import results_row, write_results
from infalign.run.runs import (
    REFERENCE_ROW,
    SPLITS,
    check_plan,
    command_scope,
    eval_dir,
    get_method,
    preflight,
    reference_dir,
    sweep,
    train_dir,
    write_run_files,
)
from infalign.run.train import train_stage

__all__ = [
    "REFERENCE_ROW",
    "SPLITS",
    "eval_dir",
    "get_method",
    "preflight",
    "reference_dir",
    "results_row",
    "run_all",
    "run_evaluate",
    "run_reference",
    "run_references",
    "run_train",
    "sweep",
    "train_dir",
    "write_results",
]

log = logging.getLogger(__name__)


def run_references(cfg: RunConfig, splits: Sequence[str] = SPLITS) -> dict[str, ReferenceSet]:
    """Build (or reuse) the reference artifacts of the given splits; returns split -> ReferenceSet."""
    env = preflight(cfg)
    check_plan(env, splits=splits)
    with command_scope(env):
        write_run_files(env, "reference")
        return {s: reference_stage(env, s) for s in splits}


def run_reference(cfg: RunConfig, split: str) -> ReferenceSet:
    """The reference artifact of one split (``train``: K = reference.num_samples; ``test``:
    K = evaluate.reference_samples), built or reused: a :class:`~infalign.run.reference.ReferenceSet`."""
    return run_references(cfg, (split,))[split]


def run_train(cfg: RunConfig, method: str, beta: float | None = None) -> Path:
    """Train (or reuse / resume) one method at one beta (default ``rl.beta``); returns its run dir
    (:func:`infalign.run.train.train_stage`)."""
    env = preflight(cfg)
    m, b = get_method(cfg, method), float(cfg.rl.beta if beta is None else beta)
    check_plan(env, splits=("train",), train=[(m, b)])
    with command_scope(env):
        write_run_files(env, "train")
        return train_stage(env, m, b)


def run_evaluate(cfg: RunConfig, method: str | None, beta: float | None = None) -> dict[str, Any]:
    """Evaluate a trained method at beta (default ``rl.beta``), or pi_ref itself (``method=None``),
    against ``reference/test``; writes ``eval.json`` (returned) and refreshes ``results.json``."""
    env = preflight(cfg)
    m = None if method is None else get_method(cfg, method)
    b = None if m is None else float(cfg.rl.beta if beta is None else beta)
    check_plan(env, splits=("test",), evals=[(m, b)])
    if m is not None and b is not None:
        require_trained(env, m, b)
    with command_scope(env):
        write_run_files(env, "evaluate")
        out = evaluate_stage(env, m, b)
        write_results(cfg, env)
        return out


# --- report, run ---------------------------------------------------------------------------------


def _report(run_dir: Path) -> Path | None:
    try:
        from infalign.run import report
    except Exception as err:
        log.warning("report: cannot import infalign.run.report (%s); skipped", err)
        return None
    fn = getattr(report, "write_report", None)
    if fn is None:
        log.warning("report: infalign.run.report has no write_report(); skipped")
        return None
    try:
        path = Path(fn(run_dir))
    except Exception as err:
        log.error(
            "report: write_report failed (%s: %s); results.json is complete, retry with "
            "`infalign report %s`",
            type(err).__name__,
            err,
            run_dir,
        )
        return None
    log.info("report: %s", path)
    return path


def run_all(cfg: RunConfig, report: bool = True, jobs: int = 1) -> dict[str, Any]:
    """The whole experiment; finished stages are reused. Returns the content of ``results.json``
    plus ``report`` (the report's path, or None when skipped or failed).

    ``jobs`` > 1 runs the stages on that many worker processes (:mod:`infalign.run.parallel`): the
    two reference splits, then every (method, beta) train + evaluate and pi_ref's evaluation."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r}: must be >= 1")
    env = preflight(cfg)
    runs = [(m, float(b)) for m in sweep(cfg) for b in m.betas]
    check_plan(env, splits=SPLITS, train=runs, evals=[*runs, (None, None)])
    refs: list[Unit] = [("reference", s, None) for s in SPLITS]
    units: list[Unit] = [*(("method", m.name, b) for m, b in runs), ("method", None, None)]
    with command_scope(env):
        write_run_files(env, "run")
        if jobs > 1:
            run_units(cfg, refs, jobs, desc="reference")
            run_units(cfg, units, jobs, desc="sweep")
        else:
            for u in refs:
                run_stage(env, u)
            for u in tqdm(units, desc="sweep", unit="stage"):
                run_stage(env, u)
        results = write_results(cfg, env)
    path = _report(Path(cfg.out)) if report else None
    results["report"] = None if path is None else str(path)
    return results
