"""Experiment tracking through ``accelerate``'s trackers: ``tracking: [tensorboard]`` in a recipe
(also ``wandb``, ``trackio``, ``mlflow`` where installed; each is an optional extra).

Each trained policy is one tracker run named ``<method>/beta=<b>`` (its train directory's name) in
an experiment named after the ``out`` directory; pi_ref's evaluation is the run ``reference``. Files stay
inside the run directory, and every tracker runs offline:

    <out>/tracking/<method>/beta=<b>/events.out.tfevents.*   tensorboard (``tensorboard --logdir <out>/tracking``)
    <out>/tracking/wandb/                                    wandb, mode offline (unless WANDB_MODE is set)
    <out>/tracking/mlruns/                                   mlflow file store (unless MLFLOW_TRACKING_URI is set)
    trackio's local database                                 trackio (local unless given a Space)

What is logged (``docs/metrics.md``):

* at the start of training: the run's config, flattened to dotted keys (``rl.beta``; the method's
  beta and transform in ``rl.beta`` / ``rl.transform``, plus ``method``; lists as JSON text);
* every RL step: the record of ``metrics.jsonl`` under the same names, at step ``rl/step``
  (``CTRLTrainer._log`` -> ``accelerator.log``);
* when an evaluation finishes: :func:`eval_scalars` of its ``eval.json`` at step ``rl.steps``
  (0 for ``reference``).

**Resume.** A resumed training run continues the same tensorboard run with ``purge_step`` = the
checkpoint's step: the events of steps logged after that checkpoint by the interrupted attempt are
dropped by tensorboard's event reader, so each step has one value, equal to ``metrics.jsonl``'s. The
other trackers start a new run of the same name on every command (their offline runs have no
purge), so there the re-done steps appear in both runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TRACKERS",
    "TRACKING_DIR",
    "check_trackers",
    "eval_scalars",
    "flat_config",
    "log_eval",
    "run_name",
    "session",
]

log = logging.getLogger(__name__)

TRACKING_DIR = "tracking"
# tracker name -> (the module it needs, the pip extra of infalign that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "track"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


def check_trackers(names: Sequence[str], path: str = "tracking") -> None:
    """A ValueError naming ``path[i]`` for an unknown, repeated or not installed tracker (with the
    pip extra that installs it); imports nothing, so it runs before any work."""
    for i, name in enumerate(names):
        where = f"config {path}[{i}]={name!r}"
        if name not in TRACKERS:
            raise ValueError(f"{where}: unknown tracker; expected one of {', '.join(TRACKERS)}")
        if name in names[:i]:
            raise ValueError(f"{where}: listed twice")
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"{where}: {module} is not installed; pip install 'infalign[{extra}]'")


def tracking_dir(out: str | Path) -> Path:
    return Path(out) / TRACKING_DIR


def _trackers(cfg: Any, run: str, purge_step: int) -> list[Any]:
    """Unstarted accelerate trackers of ``cfg.tracking`` for the run named ``run``, offline, with
    their files under ``<out>/tracking``."""
    from accelerate.tracking import (
        MLflowTracker,
        TensorBoardTracker,
        TrackioTracker,
        WandBTracker,
    )

    root = tracking_dir(cfg.out).resolve()
    experiment = Path(cfg.out).resolve().name
    out: list[Any] = []
    for name in cfg.tracking:
        if name == "tensorboard":
            kw = {"purge_step": purge_step} if purge_step > 0 else {}
            out.append(TensorBoardTracker(run, str(root), **kw))
        elif name == "wandb":
            mode = os.environ.get("WANDB_MODE", "offline")
            out.append(WandBTracker(experiment, name=run, dir=str(root), mode=mode))
        elif name == "trackio":
            out.append(TrackioTracker(experiment, name=run))
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                mlflow.set_tracking_uri((root / "mlruns").as_uri())
            out.append(MLflowTracker(experiment, run_name=run))
    if out:
        root.mkdir(parents=True, exist_ok=True)
    return out


def run_name(method: Any, beta: float | None) -> str:
    """``<method>/beta=<b>`` for a trained policy (a MethodConfig), ``reference`` for pi_ref (None)."""
    from infalign.run.runs import REFERENCE_ROW, beta_name

    if method is None:
        return REFERENCE_ROW
    assert beta is not None
    return f"{method.name}/{beta_name(beta)}"


def flat_config(cfg: Any, method: Any = None, beta: float | None = None) -> dict[str, Any]:
    """The RunConfig as ``{"section.key": value}`` (scalars; lists and mappings as JSON text); for a
    trained policy, ``rl.beta`` / ``rl.transform`` are the method's and ``method`` is its name."""
    from infalign.run.config import to_dict

    tree = to_dict(cfg)
    if method is not None:
        assert beta is not None
        tree["rl"].update(beta=float(beta), transform=method.transform)
        tree["method"] = method.name

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(node, (list, dict)):
            yield prefix, json.dumps(node)
        else:
            yield prefix, node

    return dict(walk(tree, ""))


@contextlib.contextmanager
def session(accelerator: Any, cfg: Any, method: Any, beta: float, step: int) -> Iterator[None]:
    """Attach ``cfg.tracking``'s trackers to ``accelerator`` for the run of ``method`` at ``beta``
    resumed at ``step`` (the trainer's completed steps), store the run's config, and finish them on
    exit. The trainer's ``accelerator.log`` calls go to them; no trackers: nothing happens."""
    if not cfg.tracking:
        yield
        return
    run = run_name(method, beta)
    accelerator.log_with = _trackers(cfg, run, step)
    accelerator.init_trackers(Path(cfg.out).resolve().name, config=flat_config(cfg, method, beta))
    log.info("tracking %s: %s under %s", run, ", ".join(cfg.tracking), tracking_dir(cfg.out))
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers = []
        accelerator.log_with = []


def _tag(procedure: str) -> str:
    return procedure.replace(":", "_")  # mlflow metric names allow no ':'


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of an ``eval.json`` that the trackers get: ``eval/kl`` (and ``_stderr``,
    ``_low``, ``_high``), ``eval/win_rate/<proc>`` (and ``_low``, ``_high``, ``_stderr``; ``bon:4``
    is written ``bon_4``), ``eval/standard_win_rate`` (same suffixes), ``eval/theory_bound/<proc>``
    and ``eval/reward_mean``. Null values are left out."""
    out: dict[str, Any] = {}

    def stats(name: str, d: dict[str, Any]) -> None:
        out[name] = d.get("mean")
        for k in ("low", "high", "stderr"):
            out[f"{name}_{k}"] = d.get(k)

    stats("eval/kl", result["kl"])
    for proc, w in result["win_rate"].items():
        stats(f"eval/win_rate/{_tag(proc)}", w)
    stats("eval/standard_win_rate", result["standard_win_rate"])
    for proc, b in (result.get("theory_bound") or {}).items():
        out[f"eval/theory_bound/{_tag(proc)}"] = b.get("win_rate")
    out["eval/reward_mean"] = result["reward"]["mean"]
    return {k: float(v) for k, v in out.items() if v is not None}


def log_eval(cfg: Any, method: Any, beta: float | None, result: dict[str, Any]) -> None:
    """Log :func:`eval_scalars` of a finished evaluation of ``method`` at ``beta`` (None: pi_ref)
    with the run's config, at step ``rl.steps`` (0 for pi_ref); trackers are started and finished
    here, on the main process. Nothing without ``cfg.tracking``."""
    if not cfg.tracking:
        return
    scalars, step = eval_scalars(result), 0 if method is None else cfg.rl.steps
    for tracker in _trackers(cfg, run_name(method, beta), 0):
        tracker.start()
        tracker.store_init_configuration(flat_config(cfg, method, beta))
        tracker.log(scalars, step=step)
        tracker.finish()
