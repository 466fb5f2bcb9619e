"""The train stage: one method at one beta in ``train/<method>/beta=<b>/`` (``metrics.jsonl``,
``checkpoint/``, ``transform.json``, ``manifest.json``), reused when finished under the same stage
key, resumed from its checkpoint when unfinished, built under the stage lock."""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

import torch

from infalign.core.transforms import RAW, is_raw
from infalign.run import tracking
from infalign.run.config import MethodConfig, RLConfig, RunConfig
from infalign.run.io import atomic_write_json, read_jsonl
from infalign.run.keys import train_key
from infalign.run.reference import ReferenceSet, reference_stage
from infalign.run.runs import RunEnv, beta_name, mark_stage, reference_dir, train_dir

__all__ = ["TILT_WARN_NATS", "resolve_transform", "tilt_span", "train_stage"]

log = logging.getLogger(__name__)

# Measured, not derived (docs/results.md, the claims sweep): every run whose optimum asked for a
# log-ratio span of 34-4e4 nats overshot its KL budget 1.7-250x, did not move, or fell below pi_ref's
# win rate (harmless: 3.75-250x past 34 nats); those at <= 24 nats stayed within 2.5x of their budget.
TILT_WARN_NATS = 30.0


def resolve_transform(cfg: RunConfig, method: MethodConfig) -> tuple[Any, dict[str, Any]]:
    """(Transform or None for raw, the content of ``transform.json``): ``exp:auto`` /
    ``negexp:auto`` / ``optimal`` resolved for ``report.procedure`` at ``rl.target_kl`` (or the
    ``@KL`` pinned in the spec), with the beta theory gives for that KL."""
    from infalign import theory

    spec = method.transform
    if is_raw(spec):
        return None, {"spec": RAW, "resolved": RAW, "transform": None}
    auto = theory.needs_theory(spec)
    proc, kl = cfg.report.procedure, theory.split_target(spec)[1] or cfg.rl.target_kl
    tf = theory.resolve_transform(spec, proc, kl=kl)
    info: dict[str, Any] = {"spec": spec, "resolved": str(tf), "t": getattr(tf, "t", None)}
    if auto:
        info.update(procedure=proc, target_kl=kl)
    try:
        info["theory_beta"] = theory.beta_for_kl(tf, kl)
    except ValueError:
        info["theory_beta"] = None
    info["transform"] = tf.to_dict()
    return tf, info


def tilt_span(tf: Any, beta: float) -> float | None:
    """``(Phi(1) - Phi(0)) / beta`` in nats: how far apart the optimum puts the log-ratios
    ``log pi*/pi_ref = (Phi(u) - beta log Z) / beta`` of pi_ref's worst and best samples. None for
    raw (its scale is the reward's)."""
    if tf is None:
        return None
    lo, hi = (float(x) for x in tf(torch.tensor([0.0, 1.0], dtype=torch.float64)))
    return abs(hi - lo) / beta


def _warn_steep_tilt(tf: Any, beta: float, what: str) -> None:
    span = tilt_span(tf, beta)
    if span is not None and span > TILT_WARN_NATS:
        log.warning(
            "%s: beta %.3g asks for log-ratios %.3g nats apart ((Phi(1) - Phi(0)) / beta); trained "
            "LMs have not followed targets past ~%g nats (they overshot the KL budget many times, "
            "did not move, or lost to pi_ref). `infalign solve` prints a robust t with a larger "
            "beta.",
            what, beta, span, TILT_WARN_NATS,
        )  # fmt: skip


def _trainer(env: RunEnv, rl: RLConfig, ref: ReferenceSet, tf: Any, d: Path, resume: bool) -> Any:
    """The trainer of ``rl.algorithm`` on a fresh load of ``model`` (LoRA if ``model.lora_r``)."""
    from infalign.lm.models import load_model
    from infalign.rl.algorithms import trainer_class

    cfg = env.cfg
    calibration = ref.calibration(smoothed=cfg.reference.smoothed)
    torch.manual_seed(rl.seed)  # LoRA initialisation
    policy = load_model(cfg.model, trainable=True)
    shared_base = cfg.model.lora_r > 0 and cfg.reference_model is None
    reference = None if shared_base else env.reference_model()
    return trainer_class(rl.algorithm).from_reference(
        policy, reference, env.tokenizer(), ref, env.reward, calibration, tf, rl, cfg.sampling, d,
        resume=resume,
    )  # fmt: skip


def train_stage(env: RunEnv, method: MethodConfig, beta: float) -> Path:
    """Train (or reuse / resume) ``method`` at ``beta``; returns its directory.

    Policy: a fresh load of ``model``; reference: ``reference_model`` (or ``model``) frozen;
    calibration from ``reference/train``; transform: :func:`resolve_transform`.
    """
    from infalign.rl.checkpoint import CHECKPOINT_DIR, METRICS_FILE, find_checkpoint

    cfg = env.cfg
    d, what = train_dir(cfg, method.name, beta), f"train/{method.name}/{beta_name(beta)}"
    key = train_key(env, method, beta)
    if env.open_stage(d, key, what, CHECKPOINT_DIR) == "done":
        log.info("%s: reusing the finished run in %s", what, d)
        return d
    ref = reference_stage(env, "train")
    if ref.prompts != env.prompts("train"):
        raise ValueError(f"{reference_dir(cfg, 'train')} holds other prompts than prompts.train")
    rl = dataclasses.replace(cfg.rl, beta=float(beta), transform=method.transform)
    tf, tinfo = resolve_transform(cfg, method)
    log.info(
        "%s: transform %s -> %s, %d steps", what, method.transform, tinfo["resolved"], rl.steps
    )
    _warn_steep_tilt(tf, rl.beta, what)
    resume = find_checkpoint(d) is not None
    if not resume and (d / METRICS_FILE).exists():
        (d / METRICS_FILE).unlink()  # records of an attempt that never reached a checkpoint
    atomic_write_json(d / "transform.json", tinfo)
    mark_stage(d, key, rl.seed, what, "running")
    trainer = _trainer(env, rl, ref, tf, d, resume)
    with tracking.session(trainer.accelerator, cfg, method, beta, trainer.step):
        trainer.train()
    del trainer
    gc.collect()
    rows = read_jsonl(d / METRICS_FILE) if (d / METRICS_FILE).is_file() else []
    mark_stage(d, key, rl.seed, what, "done", summary=rows[-1] if rows else {})
    return d
