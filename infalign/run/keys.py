"""Stage keys: the part of the config, and the content of the inputs, that determines each stage's
artifact, and the first difference between two keys. A stage's manifest records its key; a stage is
reused only under the same key (:func:`infalign.run.runs.stage_state`).

Keys use the config's own dotted paths (``rl.beta``, ``prompts.test.source``), so a difference names
the field to change. ``inputs`` holds the SHA-256 of every local input the stage reads
(:func:`infalign.run.inputs.input_hashes`). Settings that never change an artifact's numbers (devices,
reward batch size, ``rl.save_every``) are left out, so changing them reuses finished stages.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from infalign.run.config import MethodConfig, RunConfig, to_dict
from infalign.run.io import to_jsonable

if TYPE_CHECKING:
    from infalign.run.runs import RunEnv

__all__ = ["config_diff", "eval_key", "plain", "reference_key", "train_key"]

_UNSET = "<unset>"
# settings that never change an artifact's numbers, left out of the stage keys
_NOT_IN_KEY = {"model": {"device"}, "reward": {"device", "batch_size"}, "rl": {"save_every"}}
_DROPPED = {f"{sec}.{f}" for sec, fs in _NOT_IN_KEY.items() for f in fs} | {
    "reference_model.device"
}


def plain(x: Any) -> Any:
    """``x`` as the plain JSON values a manifest holds (tuples as lists, tensors as numbers)."""
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
    return tail in _DEFAULTS and plain(_DEFAULTS[tail]) == value


def config_diff(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first differing dotted field ``(key, old, new)`` of two stage keys, or None. A key
    added by a newer infalign at its default, and ``inputs`` missing from a manifest written before
    inputs were hashed, are not differences (those stages stay reusable)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            path = f"{key}.{k}" if key else k
            if k not in old and (k == "inputs" or _new_default(path, new[k])):
                continue
            if k not in new and ".".join(path.split(".")[-2:]) in _DROPPED:
                continue  # a setting that older infalign kept in the key
            d = config_diff(old.get(k, _UNSET), new.get(k, _UNSET), path)
            if d is not None:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            d = config_diff(a, b, f"{key}[{i}]")
            if d is not None:
                return d
        return None
    return None if old == new else (key, old, new)


def _section(obj: Any, name: str) -> dict[str, Any]:
    return {k: v for k, v in to_dict(obj).items() if k not in _NOT_IN_KEY.get(name, set())}


def _inputs(env: RunEnv, *names: str) -> dict[str, str]:
    return {n: h for n, h in env.inputs().items() if n in names}


def _ref_model_key(env: RunEnv) -> dict[str, Any]:
    cfg = env.cfg
    if cfg.reference_model is None:
        return {"model": _section(cfg.model, "model")}
    return {"reference_model": _section(cfg.reference_model, "model")}


def _ref_inputs(env: RunEnv) -> tuple[str, ...]:
    if env.cfg.reference_model is None:
        return ("model", "model.tokenizer")
    return ("reference_model", "reference_model.tokenizer")


def reference_key(env: RunEnv, split: str) -> dict[str, Any]:
    """Stage key of ``reference/<split>``, keyed by the config's own dotted paths."""
    cfg = env.cfg
    k = (
        {"reference": {"num_samples": cfg.reference.num_samples}}
        if split == "train"
        else {"evaluate": {"reference_samples": cfg.evaluate.reference_samples}}
    )
    return {
        "seed": cfg.seed,
        **_ref_model_key(env),
        "reward": _section(cfg.reward, "reward"),
        "prompts": {split: to_dict(getattr(cfg.prompts, split))},
        "sampling": to_dict(cfg.sampling),
        **k,
        "inputs": _inputs(env, f"prompts.{split}", "reward", *_ref_inputs(env)),
    }


def train_key(env: RunEnv, method: MethodConfig, beta: float) -> dict[str, Any]:
    """Stage key of ``train/<method>/beta=<b>``, keyed by the config's own dotted paths
    (``rl.beta`` and ``rl.transform`` are the method's)."""
    cfg = env.cfg
    rl = dataclasses.replace(cfg.rl, beta=float(beta), transform=method.transform)
    rl.validate("rl")
    rl_d = {k: v for k, v in _section(rl, "rl").items() if k != "target_kl"}
    out: dict[str, Any] = {
        "method": method.name,
        "seed": cfg.seed,
        "model": _section(cfg.model, "model"),
        **_ref_model_key(env),
        "reward": _section(cfg.reward, "reward"),
        "prompts": {"train": to_dict(cfg.prompts.train)},
        "sampling": to_dict(cfg.sampling),
        "reference": to_dict(cfg.reference),
        "rl": rl_d,
    }
    from infalign.theory import needs_theory, split_target  # (lazy: the CLI's parser stays light)

    if needs_theory(method.transform):  # the transform is resolved for this procedure and KL
        if split_target(method.transform)[1] is None:  # (exp:auto@KL carries its own KL)
            out["rl"]["target_kl"] = cfg.rl.target_kl
        out["report"] = {"procedure": cfg.report.procedure}
    names = ("prompts.train", "reward", "model", "model.tokenizer", *_ref_inputs(env))
    out["inputs"] = _inputs(env, *names)
    return out


def eval_key(env: RunEnv, method: MethodConfig | None, beta: float | None) -> dict[str, Any]:
    """Stage key of an eval dir: the policy's (pi_ref's model or the train stage key), the
    test reference artifact's and the ``evaluate`` section."""
    if method is None:
        policy: dict[str, Any] = {"policy": "reference", **_ref_model_key(env)}
    else:
        assert beta is not None
        policy = {"policy": "trained", "train": train_key(env, method, beta)}
    return {**policy, **reference_key(env, "test"), "evaluate": to_dict(env.cfg.evaluate)}
