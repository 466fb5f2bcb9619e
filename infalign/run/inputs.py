"""The inputs a run reads from outside its directory: checked before any work (paths that must
exist) and keyed by content, so a stage is never reused after one of them changed.

Inputs hashed (SHA-256, :func:`input_hashes`): both prompt sets (the loaded, formatted prompts:
:func:`~infalign.lm.prompts.prompts_sha256`, whatever the source), local model and tokenizer
directories (:func:`~infalign.run.io.sha256_path`), and the reward: the source file of a callable
reward outside installed packages and infalign itself, or the directory of a local reward model. Hub
names and installed packages are identified by name, and their versions go into every manifest.
"""

from __future__ import annotations

import inspect
import sys
import sysconfig
from pathlib import Path
from typing import Any

from infalign.run.config import ModelConfig, RunConfig
from infalign.run.io import atomic_write_json, read_json, sha256_path, stat_key_current

__all__ = [
    "HASH_CACHE",
    "check_paths",
    "input_hashes",
    "input_label",
    "looks_local",
    "save_hash_cache",
]

# file hashes of earlier commands, by path, size, mtime and inode (:func:`sha256_path`)
HASH_CACHE = ".inputs-cache.json"


def _fail(path: str, value: Any, why: str) -> None:
    raise ValueError(f"config {path}={value!r}: {why}")


def looks_local(name: str) -> bool:
    """A model / reward name that can only be a local path (not a hub name ``org/model``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _check_model_paths(path: str, m: ModelConfig) -> None:
    for key in ("name", "tokenizer"):
        value = getattr(m, key)
        if value and not Path(value).expanduser().exists() and looks_local(value):
            _fail(f"{path}.{key}", value, "no such file or directory")
    local = Path(m.name).expanduser()
    if m.gguf_file and local.is_dir() and not (local / m.gguf_file).is_file():
        _fail(f"{path}.gguf_file", m.gguf_file, f"no such file in {m.name!r}")


def check_paths(cfg: RunConfig) -> None:
    """ValueError naming the field for a local model, prompts or reward path that does not exist."""
    _check_model_paths("model", cfg.model)
    if cfg.reference_model is not None:
        _check_model_paths("reference_model", cfg.reference_model)
    for split in ("train", "test"):
        src = getattr(cfg.prompts, split).source
        if not src.startswith("hf:") and not Path(src).expanduser().exists():
            _fail(f"prompts.{split}.source", src, "no such file or directory")
    if cfg.reward.kind == "hf" and looks_local(cfg.reward.name):
        if not Path(cfg.reward.name).expanduser().exists():
            _fail("reward.name", cfg.reward.name, "no such file or directory")


def _installed(path: Path) -> bool:
    """Inside an installed package (site-packages, the standard library) or infalign itself."""
    import infalign

    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    roots.add(str(Path(infalign.__file__).resolve().parent))
    return any(path.is_relative_to(Path(r).resolve()) for r in roots)


def _reward_source(reward: Any) -> Path | None:
    """The local source file of a callable reward (``CallableReward.fn``), if it has one."""
    fn = getattr(reward, "fn", None)
    if fn is None:
        return None
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    try:
        src = inspect.getsourcefile(module if module is not None else fn)
    except TypeError:  # a builtin
        return None
    if src is None or not Path(src).is_file():
        return None
    path = Path(src).resolve()
    return None if _installed(path) else path


def input_hashes(env: Any) -> dict[str, str]:
    """``{input: sha256}`` for ``prompts.train``, ``prompts.test`` and whichever of ``model``,
    ``model.tokenizer``, ``reference_model``, ``reference_model.tokenizer``, ``reward`` are local
    (``env``: a :class:`~infalign.run.runs.RunEnv`; the callable reward is imported)."""
    from infalign.lm.prompts import prompts_sha256

    cfg: RunConfig = env.cfg
    cache = env.hash_cache
    if not cache and (Path(cfg.out) / HASH_CACHE).is_file():
        try:
            found = read_json(Path(cfg.out) / HASH_CACHE)
        except ValueError:  # a torn cache only costs a re-read
            found = None
        if isinstance(found, dict):
            cache.update({str(k): str(v) for k, v in found.items()})
    out = {f"prompts.{s}": prompts_sha256(env.prompts(s)) for s in ("train", "test")}
    models = {"model": cfg.model, "reference_model": cfg.reference_model}
    for name, m in models.items():
        for key, value in (("", m.name if m else None), (".tokenizer", m.tokenizer if m else None)):
            if value and Path(value).expanduser().exists():
                out[name + key] = sha256_path(Path(value).expanduser(), cache)
    if cfg.reward.kind == "hf":
        local = Path(cfg.reward.name).expanduser()
        if local.exists():
            out["reward"] = sha256_path(local, cache)
    else:
        src = _reward_source(env.reward())
        if src is not None:
            out["reward"] = sha256_path(src, cache)
    return out


def save_hash_cache(env: Any) -> None:
    """Write the file hashes of this command (still current) to ``out/.inputs-cache.json``."""
    keep = {k: v for k, v in env.hash_cache.items() if stat_key_current(k)}
    if keep:
        atomic_write_json(Path(env.cfg.out) / HASH_CACHE, keep)


def input_label(key: dict[str, Any], name: str) -> str:
    """The config field that names input ``name`` in a stage key, with its value:
    ``prompts.test.source='data/test.jsonl'``, ``model.name='runs/m'``, ``reward.name='r.py:f'``."""
    if name.startswith("prompts."):
        field = f"{name}.source"
    elif name in ("model", "reference_model", "reward"):
        field = f"{name}.name"
    else:
        field = name
    node: Any = key
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return f"{field}={node!r}" if node else field
