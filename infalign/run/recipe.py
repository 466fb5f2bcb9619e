"""Reading a recipe: YAML -> the shipped task's defaults -> dotted overrides (``--rl.beta 0.1``) ->
the :class:`~infalign.run.config.RunConfig` dataclasses, each value coerced to its field's annotated
type (:func:`coerce`), then validated. An unreadable recipe (missing, a directory, not UTF-8,
malformed YAML with line and column, not a mapping) is one ValueError naming the file. The dataclasses and their checks live in
:mod:`infalign.run.config`; ``infalign config show|schema`` in :mod:`infalign.run.schema`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from infalign.run.config import RunConfig, _fail, to_dict

__all__ = [
    "apply_overrides",
    "coerce",
    "dump_config",
    "from_dict",
    "load_config",
    "read_recipe",
    "yaml_problem",
]

_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _scalar(tp: Any, value: Any, path: str) -> Any:
    """``value`` as ``bool`` (also true/false/yes/no/1/0 text), ``int`` (an integral number or
    numeral), ``float`` (a number or numeral, e.g. ``"1e-5"``, which YAML 1.1 reads as text) or
    ``str`` (text or a number); a ValueError naming ``path`` otherwise."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        _fail(path, value, "expected true or false")
    if tp in (int, float):
        try:
            if isinstance(value, bool):
                raise TypeError
            out = tp(value)
        except (TypeError, ValueError):
            _fail(path, value, f"expected a number ({tp.__name__})")
        if not math.isfinite(out):  # .inf / nan would pass every "> 0" check and break later
            _fail(path, value, "expected a finite number")
        if tp is int and isinstance(value, float) and value != out:
            _fail(path, value, "expected an integer")
        return out
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            _fail(path, value, "expected a string")
        return str(value)
    raise TypeError(f"config {path}: no coercion for field type {tp!r}")


def coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` as the annotated field type ``tp``, driven by the type alone: a dataclass from a
    mapping (:func:`from_dict`), ``X | None`` (null or X), ``tuple[X, ...]`` from a list, a
    comma-separated string or a single item, and the scalars of :func:`_scalar`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return None if value is None else coerce(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if typing.get_origin(tp) is tuple:
        items = [v for v in value.split(",") if v] if isinstance(value, str) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        return tuple(coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(items))
    return _scalar(tp, value, path)


def from_dict(cls: Any, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, naming the dotted path of any unknown key or bad value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(path or cls.__name__, data, f"expected a mapping for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        _fail(
            f"{where}{unknown[0]}",
            data[unknown[0]],
            f"unknown key; expected one of {sorted(names)} (see `infalign config show`)",
        )
    kwargs = {k: coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``rl.beta``) in a nested config dict; values given as strings are YAML-parsed."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for dotted, raw in overrides.items():
        try:
            value = yaml.safe_load(raw) if isinstance(raw, str) else raw
        except yaml.YAMLError as err:
            _fail(dotted, raw, f"not valid YAML ({yaml_problem(err)})")
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                _fail(dotted, raw, f"{key} is not a section")
        node[leaf] = value
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a recipe YAML, apply dotted overrides, build and validate the RunConfig."""
    data = read_recipe(Path(path))
    if overrides:
        data = apply_overrides(data, overrides)
    cfg: RunConfig = from_dict(RunConfig, _apply_task(data))
    return cfg.validate()


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (line, column)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(err, "problem", None) or " ".join(str(err).split())
    return f"{what}{where}"


def read_recipe(p: Path) -> dict[str, Any]:
    """The recipe file as a dict; ValueError naming the file when it is missing, a directory, not
    UTF-8, not YAML or not a mapping."""
    if p.is_dir():
        raise ValueError(f"recipe {str(p)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ValueError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {str(p)!r} is not UTF-8 text (byte offset {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {str(p)!r} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"recipe {str(p)!r}: expected a mapping of sections, got {type(data).__name__}"
        )
    return data


def _apply_task(data: dict[str, Any]) -> dict[str, Any]:
    """``task: NAME`` fills what the recipe leaves out: the task's reward, its shipped train/test
    prompt files and its procedure (``report.procedure``). An unknown name is an error."""
    name = data.get("task") if isinstance(data, dict) else None
    if name is None:
        return data
    from infalign.lm.tasks import TASKS

    if name not in TASKS:
        _fail("task", name, f"unknown task; expected one of {sorted(TASKS)}")
    task = TASKS[name]
    out = yaml.safe_load(yaml.safe_dump(data))
    reward = out.setdefault("reward", {})
    if not reward.get("name"):
        reward.update(kind="callable", name=task.reward)
    prompts = out.setdefault("prompts", {})
    for split, path in (("train", task.train_prompts), ("test", task.test_prompts)):
        section = prompts.setdefault(split, {})
        section.setdefault("source", path)
    out.setdefault("report", {}).setdefault("procedure", task.procedure)
    return out


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
