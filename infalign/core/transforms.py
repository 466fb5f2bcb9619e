"""Transforms Phi of the calibrated reward (spec sections 4 and 6): ``R(x, y) = Phi(C(x, y))``.

Every transform is a small frozen, hashable dataclass that is increasing on [0, 1], works on numpy
arrays and torch tensors alike, and round-trips through a spec string (``str(phi)`` /
``parse_transform``) and a dict (``to_dict`` / ``transform_from_dict``) for YAML/JSON.

An affine change of Phi is absorbed by beta (only the shape matters), so the exponential families are
normalised to map [0, 1] onto [0, 1]; this keeps beta on one scale across identity, exp, negexp and the
tabulated optimum, and never overflows (t = 50 or 500 on u = 1 gives exactly 1):

=========== ==================================================== =================================
spec        Phi(u)                                               for
=========== ==================================================== =================================
identity    u                                                    standard win rate (optimal)
log         log(max(u, eps))                                     1/beta = N-1 gives BoN_N exactly
exp:t       (e^{t u} - 1) / (e^t - 1)   ~ exp(t u)               BoN_N
negexp:t    (1 - e^{-t u}) / (1 - e^{-t}) ~ -exp(-t u)            WoN_N
tabulated   piecewise-linear through (grid, values)              the fixed-point optimum (theory)
a|b         b(a(u))                                              composition, applied left to right
=========== ==================================================== =================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = [
    "FAMILIES",
    "RAW",
    "Chain",
    "Exp",
    "Identity",
    "Log",
    "NegExp",
    "Tabulated",
    "Transform",
    "auto_family",
    "is_raw",
    "parse_transform",
    "transform_from_dict",
]

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _exp(x: Array) -> Array:
    return torch.exp(x) if isinstance(x, torch.Tensor) else np.exp(x)


def _expm1(x: Array) -> Array:
    return torch.expm1(x) if isinstance(x, torch.Tensor) else np.expm1(x)


def _unit(u: Array, out: Array) -> Array:
    """Clamp ``out`` into [0, 1] and pin Phi(0) = 0, Phi(1) = 1 exactly.

    Rounding (float32, or the double-precision constants meeting a float32 tensor) can otherwise
    leave Phi(1) a few ulp off 1 and push values just below u = 1 above it (non-monotone).
    """
    if isinstance(out, torch.Tensor):
        out = torch.clamp(out, 0.0, 1.0)
        return torch.where(u >= 1.0, 1.0, torch.where(u <= 0.0, 0.0, out))
    return np.where(u >= 1.0, 1.0, np.where(u <= 0.0, 0.0, np.clip(out, 0.0, 1.0)))


def _fmt(t: float) -> str:
    """Shortest spec for t that parses back to exactly t (``%g`` keeps only 6 digits)."""
    s = f"{t:g}"
    return s if float(s) == t else repr(t)


def _as_array(u: Any) -> np.ndarray | torch.Tensor:
    if isinstance(u, torch.Tensor):
        return u if u.is_floating_point() else u.to(torch.float64)
    return np.asarray(u, dtype=np.float64)


class Transform:
    """Base class: an increasing map Phi on [0, 1]. Subclasses implement ``_apply``."""

    name: str = ""

    def __call__(self, u: Any) -> Any:
        """Apply Phi elementwise; u is a numpy array, a torch tensor or a float (same type back)."""
        scalar = isinstance(u, (int, float))
        out = self._apply(_as_array(u))
        return float(out) if scalar else out

    def _apply(self, u: Any) -> Any:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def __or__(self, other: Transform) -> Chain:
        """``a | b`` is the composition u -> b(a(u))."""
        left = self.steps if isinstance(self, Chain) else (self,)
        right = other.steps if isinstance(other, Chain) else (other,)
        return Chain(left + right)


@dataclass(frozen=True)
class Identity(Transform):
    """Phi(u) = u: exactly optimal for the standard win rate (T = sample)."""

    name = "identity"

    def _apply(self, u: Any) -> Any:
        return u

    def __str__(self) -> str:
        return "identity"


@dataclass(frozen=True)
class Log(Transform):
    """Phi(u) = log(max(u, eps)). The tilt p ∝ u^(1/beta); at 1/beta = N-1 it is the BoN_N policy."""

    eps: float = 1e-12
    name = "log"

    def __post_init__(self) -> None:
        if not (0.0 < self.eps < 1.0):
            raise ValueError(f"log transform: eps must be in (0, 1), got {self.eps!r}")

    def _apply(self, u: Any) -> Any:
        if isinstance(u, torch.Tensor):
            # eps below the dtype's range (1e-300 in float32) would clamp to 0 and give -inf
            return torch.log(torch.clamp(u, min=self.eps)).clamp(min=math.log(self.eps))
        return np.log(np.maximum(u, self.eps))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "eps": self.eps}

    def __str__(self) -> str:
        return "log" if self.eps == 1e-12 else f"log:{self.eps!r}"


def _check_t(name: str, t: float) -> float:
    t = float(t)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{name} transform: t must be a finite number > 0, got {t!r}")
    return t


@dataclass(frozen=True)
class Exp(Transform):
    """Phi(u) = (e^{t u} - 1) / (e^t - 1) = (e^{t (u-1)} - e^{-t}) / (1 - e^{-t}): exp(t u) rescaled."""

    t: float
    name = "exp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", _check_t("exp", self.t))

    def _apply(self, u: Any) -> Any:
        t = self.t
        if t <= 30.0:
            # full relative precision for every u (the e^{-t}-shifted form loses ~eps/t for small
            # t); e^30 ~ 1e13 cannot overflow, even in float32
            return _unit(u, _expm1(t * u) / math.expm1(t))
        # e^{-t} < 1e-13 here; this form never overflows (t = 500 is fine)
        return _unit(u, (_exp(t * (u - 1.0)) - math.exp(-t)) / -math.expm1(-t))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t}

    def __str__(self) -> str:
        return f"exp:{_fmt(self.t)}"


@dataclass(frozen=True)
class NegExp(Transform):
    """Phi(u) = (1 - e^{-t u}) / (1 - e^{-t}): -exp(-t u) rescaled onto [0, 1]."""

    t: float
    name = "negexp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", _check_t("negexp", self.t))

    def _apply(self, u: Any) -> Any:
        return _unit(u, -_expm1(-self.t * u) / -math.expm1(-self.t))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t}

    def __str__(self) -> str:
        return f"negexp:{_fmt(self.t)}"


@dataclass(frozen=True)
class Tabulated(Transform):
    """Piecewise-linear Phi through the points (grid[i], values[i]); constant beyond the ends.

    This is how the fixed-point optimum of spec section 4 is carried into training. ``grid`` is
    strictly increasing inside [0, 1]; ``values`` is non-decreasing and finite.
    """

    grid: tuple[float, ...]
    values: tuple[float, ...]
    name = "tabulated"

    def __post_init__(self) -> None:
        g = np.asarray(self.grid, dtype=np.float64)
        v = np.asarray(self.values, dtype=np.float64)
        if g.ndim != 1 or g.shape != v.shape or g.size < 2:
            raise ValueError(
                f"tabulated transform: grid and values must be 1-D of equal length >= 2, got "
                f"{g.shape} and {v.shape}"
            )
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(v))):
            raise ValueError("tabulated transform: grid and values must be finite")
        if np.any(np.diff(g) <= 0) or g[0] < 0 or g[-1] > 1:
            raise ValueError("tabulated transform: grid must be strictly increasing inside [0, 1]")
        if np.any(np.diff(v) < 0):
            i = int(np.argmax(np.diff(v) < 0))
            raise ValueError(
                f"tabulated transform: values must be non-decreasing, but values[{i + 1}] = "
                f"{v[i + 1]!r} < values[{i}] = {v[i]!r}"
            )
        object.__setattr__(self, "grid", tuple(float(x) for x in g))
        object.__setattr__(self, "values", tuple(float(x) for x in v))

    def _apply(self, u: Any) -> Any:
        if isinstance(u, torch.Tensor):
            # Interpolate in float64: grid points closer than float32 resolution (the theory grid
            # has gaps of 1e-10 next to 0 and 1) would collapse and give 0/0 = NaN in float32.
            g = torch.tensor(self.grid, dtype=torch.float64, device=u.device)
            v = torch.tensor(self.values, dtype=torch.float64, device=u.device)
            x = torch.clamp(u.to(torch.float64), g[0], g[-1]).contiguous()
            i = torch.clamp(torch.searchsorted(g, x, right=True) - 1, 0, len(self.grid) - 2)
            w = (x - g[i]) / (g[i + 1] - g[i])
            return (v[i] + w * (v[i + 1] - v[i])).to(u.dtype)
        return np.interp(u, self.grid, self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "grid": list(self.grid), "values": list(self.values)}

    def __str__(self) -> str:
        return f"tabulated[{len(self.grid)} points]"


@dataclass(frozen=True)
class Chain(Transform):
    """Composition: applies ``steps`` left to right, u -> steps[-1](...steps[0](u))."""

    steps: tuple[Transform, ...]
    name = "chain"

    def __post_init__(self) -> None:
        if len(self.steps) < 1 or not all(isinstance(s, Transform) for s in self.steps):
            raise ValueError("chain transform: steps must be a non-empty tuple of transforms")
        object.__setattr__(self, "steps", tuple(self.steps))

    def _apply(self, u: Any) -> Any:
        for step in self.steps:
            u = step._apply(u)
        return u

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    def __str__(self) -> str:
        return "|".join(str(s) for s in self.steps)


# The one registry of the one-parameter families: parse_transform, transform_from_dict and the
# theory's best-t search (``exp:auto`` / ``negexp:auto``) all read it.
FAMILIES: dict[str, type[Exp] | type[NegExp]] = {"exp": Exp, "negexp": NegExp}
RAW = "raw"


def is_raw(spec: object) -> bool:
    """Whether a reward spec means the raw (uncalibrated) reward: None or ``"raw"`` (any case)."""
    return spec is None or (isinstance(spec, str) and spec.strip().lower() == RAW)


def auto_family(spec: str) -> type[Exp] | type[NegExp] | None:
    """The family of an ``exp:auto`` / ``negexp:auto`` spec (any case), else None."""
    name, _, arg = spec.strip().lower().partition(":")
    return FAMILIES[name] if name in FAMILIES and arg == "auto" else None


def parse_transform(spec: str | Transform) -> Transform:
    """Parse ``identity``, ``log``, ``log:EPS``, ``exp:T``, ``negexp:T`` or a chain ``a|b``.

    Raises ValueError naming the spec for anything else (``exp:auto`` is resolved by
    ``infalign.theory.resolve_transform``, which knows the procedure and the KL budget).
    """
    if isinstance(spec, Transform):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"transform spec must be a non-empty string, got {spec!r}")
    if "|" in spec:
        return Chain(tuple(parse_transform(s) for s in spec.split("|")))
    name, _, arg = spec.strip().lower().partition(":")
    try:
        if name == "identity" and not arg:
            return Identity()
        if name == "log":
            return Log(float(arg)) if arg else Log()
        if name in FAMILIES and arg:
            return FAMILIES[name](float(arg))
    except ValueError as err:
        raise ValueError(f"transform {spec!r}: {err}") from None
    raise ValueError(
        f"unknown transform {spec!r}; expected identity, log, exp:T, negexp:T (T > 0) or a chain a|b"
    )


def transform_from_dict(d: dict[str, Any]) -> Transform:
    """Inverse of ``Transform.to_dict``."""
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"transform dict must have a 'name' key, got {d!r}")
    name = d["name"]
    if name == "identity":
        return Identity()
    if name == "log":
        return Log(float(d.get("eps", 1e-12)))
    if name in FAMILIES:
        return FAMILIES[name](float(d["t"]))
    if name == "tabulated":
        return Tabulated(tuple(d["grid"]), tuple(d["values"]))
    if name == "chain":
        return Chain(tuple(transform_from_dict(s) for s in d["steps"]))
    raise ValueError(f"unknown transform name {name!r} in {d!r}")
