"""Run-directory bookkeeping for :mod:`infalign.run.pipeline`: names and paths under ``cfg.out``, the
method sweep, the shared lazily loaded resources of one command (:class:`_Env`), :func:`preflight`,
the cleanup guard for failed commands, stage configs (the part of the RunConfig that determines each
artifact), and stage manifests: reading a stage's state (``new`` / ``running`` / ``done``, or a
ValueError naming the first differing field), writing it, and checking a command's whole plan first.

Nothing here loads a model or samples; the layout and the reuse rules are described in
:mod:`infalign.run.pipeline`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from infalign.run.config import MethodConfig, ModelConfig, RunConfig, to_dict
from infalign.run.io import atomic_write_text, read_json, to_jsonable, write_manifest
from infalign.run.recipe import dump_config
from infalign.theory import needs_theory, split_target

__all__ = [
    "MANIFEST",
    "REFERENCE_ROW",
    "SPLITS",
    "beta_name",
    "eval_dir",
    "get_method",
    "preflight",
    "reference_dir",
    "sweep",
    "train_dir",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
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


class _Env:
    """Lazily loaded resources shared by the stages of one command, and the directories it made."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._tokenizer: Any = None
        self._reward: Any = None
        self._ref_model: Any = None
        self._prompts: dict[str, list[str]] = {}
        self.refs: dict[str, Any] = {}  # split -> ReferenceSet
        self.created: list[Path] = []

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

    def mkdir(self, path: Path) -> None:
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))


def _fail(path: str, value: Any, why: str) -> None:
    raise ValueError(f"config {path}={value!r}: {why}")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_model_paths(path: str, m: ModelConfig) -> None:
    for key in ("name", "tokenizer"):
        value = getattr(m, key)
        if value and not Path(value).expanduser().exists() and _looks_local(value):
            _fail(f"{path}.{key}", value, "no such file or directory")
    local = Path(m.name).expanduser()
    if m.gguf_file and local.is_dir() and not (local / m.gguf_file).is_file():
        _fail(f"{path}.gguf_file", m.gguf_file, f"no such file in {m.name!r}")


def preflight(cfg: RunConfig) -> _Env:
    """Every check that needs no model and writes nothing: the config (again), the paths it names,
    method names, the reward function (imported), both prompt sets (read: empty sets, missing
    columns, too-long prompts are errors here). Returns the shared resources for the stages."""
    cfg.validate()
    _check_model_paths("model", cfg.model)
    if cfg.reference_model is not None:
        _check_model_paths("reference_model", cfg.reference_model)
    for split in SPLITS:
        src = getattr(cfg.prompts, split).source
        if not src.startswith("hf:") and not Path(src).expanduser().exists():
            _fail(f"prompts.{split}.source", src, "no such file or directory")
    if cfg.reward.kind == "hf" and _looks_local(cfg.reward.name):
        if not Path(cfg.reward.name).expanduser().exists():
            _fail("reward.name", cfg.reward.name, "no such file or directory")
    env = _Env(cfg)
    if cfg.reward.kind == "callable":
        env.reward()
    for split in SPLITS:
        env.prompts(split)
    return env


def _only_bookkeeping(d: Path) -> bool:
    return all(p.is_dir() or p.name in _BOOKKEEPING or p.name.startswith(".") for p in d.rglob("*"))


@contextlib.contextmanager
def _guard(env: _Env) -> Iterator[None]:
    """On an error, remove the directories this command created that hold no resumable work."""
    try:
        yield
    except Exception:
        for d in reversed(env.created):
            if d.is_dir() and _only_bookkeeping(d):
                shutil.rmtree(d, ignore_errors=True)
                log.info("removed %s (unfinished, nothing to resume)", d)
        raise


# --- stage manifests ---------------------------------------------------------------------------

_UNSET = "<unset>"


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(to_jsonable(x)))


def _section_defaults() -> dict[str, Any]:
    """``{"section.field": default}`` for every field of the RunConfig's sections."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunConfig):
        tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if tp is None or not dataclasses.is_dataclass(tp):
            continue
        for g, v in to_dict(tp()).items():
            out[f"{f.name}.{g}"] = v
    return out


_DEFAULTS = _section_defaults()


def _new_default(key: str, value: Any) -> bool:
    """A key that a newer infalign added, at its default: ``<section>.<field>`` (the last two parts
    of the dotted key) holds the dataclass default. Old manifests lack it and stay reusable."""
    tail = ".".join(key.split(".")[-2:])
    return tail in _DEFAULTS and _plain(_DEFAULTS[tail]) == value


def _first_diff(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            path = f"{key}.{k}" if key else k
            if k not in old and _new_default(path, new[k]):
                continue
            d = _first_diff(old.get(k, _UNSET), new.get(k, _UNSET), path)
            if d is not None:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            d = _first_diff(a, b, f"{key}[{i}]")
            if d is not None:
                return d
        return None
    return None if old == new else (key, old, new)


def _stage_state(d: Path, stage_cfg: dict[str, Any], what: str) -> str:
    """``new`` (no manifest), ``running`` (unfinished) or ``done``; ValueError if the directory was
    made with a different stage config, naming the first differing field."""
    if not (d / MANIFEST).is_file():
        return "new"
    found = read_json(d / MANIFEST)
    diff = _first_diff(found.get("config"), _plain(stage_cfg))
    if diff is not None:
        key, old, new = diff
        raise ValueError(
            f"{what}: {str(d)!r} was made with {key}={old!r} but this config has {key}={new!r}; "
            f"use another out (--out DIR) or delete {str(d)!r}"
        )
    return "done" if found.get("status") == "done" else "running"


def _write_stage(
    d: Path, stage_cfg: dict[str, Any], seed: int, what: str, status: str, **kw: Any
) -> None:
    write_manifest(d, _plain(stage_cfg), seed, stage=what, status=status, **kw)


def _check_plan(
    cfg: RunConfig,
    splits: Sequence[str] = (),
    train: Sequence[tuple[MethodConfig, float]] = (),
    evals: Sequence[tuple[MethodConfig | None, float | None]] = (),
) -> None:
    """Check every stage a command will touch against its directory before anything is written or
    loaded, so a conflicting config fails at once, not after hours of earlier stages."""
    for s in splits:
        _stage_state(reference_dir(cfg, s), _reference_cfg(cfg, s), f"reference/{s}")
    for m, b in train:
        _stage_state(train_dir(cfg, m.name, b), _train_cfg(cfg, m, b), f"train/{m.name}")
    for em, eb in evals:
        d = eval_dir(cfg, None if em is None else em.name, eb)
        _stage_state(d, _eval_cfg(cfg, em, eb), str(d.relative_to(cfg.out)))


# --- stage configs ------------------------------------------------------------------------------


def _model_key(m: ModelConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(m).items() if k != "device"}


def _reward_key(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg.reward).items() if k not in ("device", "batch_size")}


def _ref_model_key(cfg: RunConfig) -> dict[str, Any]:
    if cfg.reference_model is None:
        return {"model": _model_key(cfg.model)}
    return {"reference_model": _model_key(cfg.reference_model)}


def _reference_cfg(cfg: RunConfig, split: str) -> dict[str, Any]:
    """Stage config of ``reference/<split>``, keyed by the config's own dotted paths."""
    k = (
        {"reference": {"num_samples": cfg.reference.num_samples}}
        if split == "train"
        else {"evaluate": {"reference_samples": cfg.evaluate.reference_samples}}
    )
    return {
        "seed": cfg.seed,
        **_ref_model_key(cfg),
        "reward": _reward_key(cfg),
        "prompts": {split: to_dict(getattr(cfg.prompts, split))},
        "sampling": to_dict(cfg.sampling),
        **k,
    }


def _train_cfg(cfg: RunConfig, method: MethodConfig, beta: float) -> dict[str, Any]:
    """Stage config of ``train/<method>/beta=<b>``, keyed by the config's own dotted paths
    (``rl.beta`` and ``rl.transform`` are the method's)."""
    rl = dataclasses.replace(cfg.rl, beta=float(beta), transform=method.transform)
    rl.validate("rl")
    rl_d = {k: v for k, v in to_dict(rl).items() if k != "target_kl"}
    out: dict[str, Any] = {
        "method": method.name,
        "seed": cfg.seed,
        "model": _model_key(cfg.model),
        **_ref_model_key(cfg),
        "reward": _reward_key(cfg),
        "prompts": {"train": to_dict(cfg.prompts.train)},
        "sampling": to_dict(cfg.sampling),
        "reference": to_dict(cfg.reference),
        "rl": rl_d,
    }
    if needs_theory(method.transform):  # the transform is resolved for this procedure and KL
        if split_target(method.transform)[1] is None:  # (exp:auto@KL carries its own KL)
            out["rl"]["target_kl"] = cfg.rl.target_kl
        out["report"] = {"procedure": cfg.report.procedure}
    return out


def _eval_cfg(cfg: RunConfig, method: MethodConfig | None, beta: float | None) -> dict[str, Any]:
    """Stage config of an eval dir: the policy's (pi_ref's model or the train stage config), the
    test reference artifact's and the ``evaluate`` section."""
    if method is None:
        policy: dict[str, Any] = {"policy": "reference", **_ref_model_key(cfg)}
    else:
        assert beta is not None
        policy = {"policy": "trained", "train": _train_cfg(cfg, method, beta)}
    return {**policy, **_reference_cfg(cfg, "test"), "evaluate": to_dict(cfg.evaluate)}


# --- run files ----------------------------------------------------------------------------------


def _write_run_files(env: _Env, command: str) -> None:
    out = Path(env.cfg.out)
    env.mkdir(out)
    atomic_write_text(out / "config.yaml", dump_config(env.cfg))
    write_manifest(out, to_dict(env.cfg), env.cfg.seed, command=command)
