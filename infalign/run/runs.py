"""The stage store: the run directory under ``cfg.out`` as a safe store of stage artifacts.

Public API for the stages (:mod:`infalign.run.pipeline`, :mod:`~infalign.run.train`,
:mod:`~infalign.run.evaluate`, :mod:`~infalign.run.results`): names and paths, the method sweep,
:class:`RunEnv` (the shared lazily loaded resources of one command, its stage locks, the content
hashes of its inputs), :func:`preflight`, :func:`command_scope` (cleanup after a failure, lock
release), the stage keys (the part of the config and the inputs' content that determines each
artifact), :func:`stage_state` / :meth:`RunEnv.open_stage` / :func:`mark_stage` (reading, locking and
writing a stage's manifest: ``new`` / ``running`` / ``done``, or a ValueError naming the first
differing field or the changed input file) and :func:`check_plan` (every stage of a command, first).

Nothing here loads a model or samples; the layout and the reuse rules are described in
:mod:`infalign.run.pipeline`, the promises in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from infalign.run.config import MethodConfig, RunConfig, to_dict
from infalign.run.inputs import check_paths, input_hashes, input_label, save_hash_cache
from infalign.run.io import atomic_write_text, read_json, write_manifest
from infalign.run.keys import config_diff, eval_key, plain, reference_key, train_key
from infalign.run.lock import LOCK_FILE, StageLock, lock_stage
from infalign.run.recipe import dump_config

__all__ = [
    "MANIFEST",
    "REFERENCE_ROW",
    "SEED_KEYS",
    "SPLITS",
    "RunEnv",
    "beta_name",
    "check_plan",
    "command_scope",
    "config_diff",
    "eval_dir",
    "eval_key",
    "get_method",
    "mark_stage",
    "preflight",
    "read_stage",
    "reference_dir",
    "reference_key",
    "stage_state",
    "sweep",
    "train_dir",
    "train_key",
    "write_run_files",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

SPLITS = ("train", "test")
SEED_KEYS = {"train": 1, "test": 2, "eval": 3}  # derive_seed(seed, k): reference train/test, eval
REFERENCE_ROW = "reference"
MANIFEST = "manifest.json"
# files that are no work worth keeping when a command fails (everything else is resumable)
_BOOKKEEPING = {
    MANIFEST,
    "config.yaml",
    "transform.json",
    "metrics.jsonl",
    "reference.partial.json",
}


# --- names and paths ---------------------------------------------------------------------------


def beta_name(beta: float) -> str:
    """``beta=<repr>``: the shortest text that round-trips the float (0.1 -> ``beta=0.1``)."""
    return f"beta={float(beta)!r}"


def reference_dir(cfg: RunConfig, split: str) -> Path:
    return Path(cfg.out) / "reference" / split


def train_dir(cfg: RunConfig, method: str, beta: float) -> Path:
    return Path(cfg.out) / "train" / method / beta_name(beta)


def eval_dir(cfg: RunConfig, method: str | None = None, beta: float | None = None) -> Path:
    """``eval/<method>/beta=<b>``, or ``eval/reference`` for pi_ref (``method=None``)."""
    if method is None:
        return Path(cfg.out) / "eval" / REFERENCE_ROW
    assert beta is not None
    return Path(cfg.out) / "eval" / method / beta_name(beta)


def sweep(cfg: RunConfig) -> tuple[MethodConfig, ...]:
    """``cfg.methods``, or one method ``default`` with ``rl.transform`` at ``rl.beta`` if none."""
    if cfg.methods:
        return cfg.methods
    return (MethodConfig(name="default", transform=cfg.rl.transform, betas=(cfg.rl.beta,)),)


def get_method(cfg: RunConfig, name: str) -> MethodConfig:
    for m in sweep(cfg):
        if m.name == name:
            return m
    names = [m.name for m in sweep(cfg)]
    raise ValueError(f"method {name!r} is not in the config's methods; expected one of {names}")


# --- shared resources, preflight, cleanup -------------------------------------------------------


class RunEnv:
    """Lazily loaded resources shared by the stages of one command, the directories it made, the
    stage locks it holds and the content hashes of its inputs (:meth:`inputs`)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._tokenizer: Any = None
        self._reward: Any = None
        self._ref_model: Any = None
        self._prompts: dict[str, list[str]] = {}
        self._inputs: dict[str, str] | None = None
        self.hash_cache: dict[str, str] = {}  # file hashes (infalign.run.inputs.HASH_CACHE)
        self.refs: dict[str, Any] = {}  # split -> ReferenceSet
        self.created: list[Path] = []
        self.locks: list[StageLock] = []

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from infalign.lm.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def reward(self) -> Any:
        if self._reward is None:
            from infalign.lm.rewards import load_reward

            self._reward = load_reward(self.cfg.reward)
        return self._reward

    def prompts(self, split: str) -> list[str]:
        if split not in self._prompts:
            from infalign.lm.prompts import load_prompts

            ps = getattr(self.cfg.prompts, split)
            needs_tok = ps.chat_template or ps.max_prompt_tokens is not None
            tok = self.tokenizer() if needs_tok else None
            self._prompts[split] = load_prompts(ps, tok, path=f"prompts.{split}")
        return self._prompts[split]

    def reference_model(self) -> Any:
        if self._ref_model is None:
            from infalign.lm.models import load_model

            self._ref_model = load_model(self.cfg.reference_model_or_policy, trainable=False)
        return self._ref_model

    def inputs(self) -> dict[str, str]:
        """``{input: sha256}`` of the local inputs (:func:`~infalign.run.inputs.input_hashes`)."""
        if self._inputs is None:
            self._inputs = input_hashes(self)
        return self._inputs

    def mkdir(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))

    def open_stage(self, d: Path, key: dict[str, Any], what: str, artifact: str) -> str:
        """``done`` (finished with this key and ``d/artifact`` exists: reuse it), else lock ``d``
        for this command (held until it ends; :func:`command_scope`) and return ``new`` or
        ``running`` (resume). ValueError if ``d`` was made with another key or is locked."""
        if stage_state(d, key, what) == "done" and (d / artifact).exists():
            return "done"
        self.mkdir(d)
        lock = lock_stage(d, what)
        state = stage_state(d, key, what)  # another command may have finished it meanwhile
        if state == "done" and (d / artifact).exists():
            lock.release()
            return "done"
        self.locks.append(lock)
        return "running" if state == "done" else state  # done, but its artifact is gone


def preflight(cfg: RunConfig) -> RunEnv:
    """Every check that needs no model and writes nothing: the config (again), the paths it names,
    method names, the reward function (imported), both prompt sets (read: empty sets, missing
    columns, too-long prompts are errors here). Returns the shared resources for the stages."""
    cfg.validate()
    check_paths(cfg)
    env = RunEnv(cfg)
    if cfg.reward.kind == "callable":
        env.reward()
    for split in SPLITS:
        env.prompts(split)
    env.inputs()
    return env


def _only_bookkeeping(d: Path) -> bool:
    """No resumable work below ``d``, and no stage another live command holds."""
    for p in d.rglob("*"):
        if p.name == LOCK_FILE and p.read_text().strip() not in ("", str(os.getpid())):
            return False
        if not (p.is_dir() or p.name in _BOOKKEEPING or p.name.startswith(".")):
            return False
    return True


@contextlib.contextmanager
def command_scope(env: RunEnv) -> Iterator[None]:
    """The extent of one command: on an error, remove the directories it created that hold no
    resumable work; at the end, release its stage locks."""
    try:
        yield
    except Exception:
        for d in reversed(env.created):
            if d.is_dir() and _only_bookkeeping(d):
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed %s (unfinished, nothing to resume)", d)
        raise
    finally:
        for lock in env.locks:
            lock.release()
        env.locks.clear()


# --- stage manifests ---------------------------------------------------------------------------


def _read_manifest(d: Path, what: str) -> dict[str, Any]:
    try:
        found = read_json(d / MANIFEST)
    except ValueError as err:
        raise ValueError(f"{what}: {err}; delete {str(d)!r} to rebuild this stage") from None
    if not isinstance(found, dict):
        raise ValueError(f"{what}: {str(d / MANIFEST)!r} is not a JSON object; delete {str(d)!r}")
    return found


def stage_state(d: Path, key: dict[str, Any], what: str) -> str:
    """``new`` (no manifest), ``running`` (unfinished) or ``done``; ValueError if the directory was
    made with a different stage key, naming the first differing field (or the changed input file)."""
    if not (d / MANIFEST).is_file():
        return "new"
    found = _read_manifest(d, what)
    diff = config_diff(found.get("config"), plain(key))
    if diff is not None:
        field, old, new = diff
        head, sep, name = field.rpartition("inputs.")
        if sep and "." not in head.rstrip("."):  # inputs.NAME or train.inputs.NAME
            label = input_label(key.get(head.rstrip("."), {}) if head else key, name)
            raise ValueError(
                f"{what}: the content of {label} changed since {str(d)!r} was made (sha256 "
                f"{str(old)[:12]} -> {str(new)[:12]}); use another out (--out DIR) or delete "
                f"{str(d)!r} to rebuild it"
            )
        raise ValueError(
            f"{what}: {str(d)!r} was made with {field}={old!r} but this config has {field}={new!r}; "
            f"use another out (--out DIR) or delete {str(d)!r}"
        )
    return "done" if found.get("status") == "done" else "running"


def read_stage(what: str, d: Path, load: Callable[[], T]) -> T:
    """``load()`` of a finished stage's artifact; a ValueError it raises (a corrupt or truncated
    file, named by the loader) gets the remedy: delete the stage directory to rebuild it."""
    try:
        return load()
    except ValueError as err:
        raise ValueError(f"{what}: {err}; delete {str(d)!r} to rebuild this stage") from None


def mark_stage(d: Path, key: dict[str, Any], seed: int, what: str, status: str, **kw: Any) -> None:
    """Write the stage manifest of ``d``: its key, seed, ``status`` (running | done), versions."""
    write_manifest(d, plain(key), seed, stage=what, status=status, **kw)


def check_plan(
    env: RunEnv,
    splits: Sequence[str] = (),
    train: Sequence[tuple[MethodConfig, float]] = (),
    evals: Sequence[tuple[MethodConfig | None, float | None]] = (),
) -> None:
    """Check every stage a command will touch against its directory before anything is written or
    loaded, so a conflicting config or a changed input fails at once, not after hours of work."""
    cfg = env.cfg
    for s in splits:
        stage_state(reference_dir(cfg, s), reference_key(env, s), f"reference/{s}")
    for m, b in train:
        stage_state(train_dir(cfg, m.name, b), train_key(env, m, b), f"train/{m.name}")
    for em, eb in evals:
        d = eval_dir(cfg, None if em is None else em.name, eb)
        stage_state(d, eval_key(env, em, eb), str(d.relative_to(cfg.out)))


# --- run files ----------------------------------------------------------------------------------


def write_run_files(env: RunEnv, command: str) -> None:
    """``config.yaml`` and ``manifest.json`` of the run directory (the latest command's)."""
    out = Path(env.cfg.out)
    env.mkdir(out)
    atomic_write_text(out / "config.yaml", dump_config(env.cfg))
    save_hash_cache(env)
    write_manifest(out, to_dict(env.cfg), env.cfg.seed, command=command)
