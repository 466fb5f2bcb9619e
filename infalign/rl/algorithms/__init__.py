"""The RL algorithms: one module each, defining ``TRAINER``, a subclass of
:class:`infalign.rl.base.CTRLTrainer`. ``rl.algorithm`` names a module here; a new algorithm is one new
file (no registration: :func:`names` lists the modules)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

__all__ = ["names", "trainer_class"]


def names() -> tuple[str, ...]:
    """The available ``rl.algorithm`` values: the modules of this package (imports nothing)."""
    return tuple(
        sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    )


def trainer_class(name: str) -> Any:
    """The ``TRAINER`` class of algorithm ``name``."""
    if name not in names():
        raise ValueError(f"rl.algorithm={name!r}: expected one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").TRAINER
