"""Reading a recipe file: one-line errors that name the file for every way it can be unreadable
(missing, a directory, not UTF-8, malformed YAML with line and column, not a mapping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["read_recipe", "yaml_problem"]


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
