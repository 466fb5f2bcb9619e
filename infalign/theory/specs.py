"""Specs resolved by the theory and the answers it gives: ``frontier`` (win rate vs KL per
transform), ``resolve_transform`` (``exp:auto``, ``negexp:auto``, ``optimal``, with an optional
``@KL`` pin) and ``recommend`` (what ``infalign solve`` prints)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infalign.core.procedures import BestOfN, Procedure, Sample, WorstOfN, parse_procedure
from infalign.core.transforms import Transform, auto_family, parse_transform
from infalign.theory.families import T_RANGE, best_t, best_t_many, smallest_t_within
from infalign.theory.optimum import optimal_policies, optimal_policy
from infalign.theory.quadrature import GRID
from infalign.theory.tilted import (
    MAX_KL,
    check_kl,
    kl_of,
    lambda_for_kl,
    phi_nodes,
    tilt,
    win_rates,
)

__all__ = [
    "FrontierRow",
    "Recommendation",
    "frontier",
    "needs_theory",
    "recommend",
    "resolve_transform",
    "split_target",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrontierRow:
    """One point of a win-rate-vs-KL curve: transform (as asked and as resolved), t, beta, KL, W."""

    transform: str
    resolved: str
    t: float | None
    beta: float
    kl: float
    win_rate: float
    standard_win_rate: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rows(
    label: str, transforms: Sequence[Transform], kl: np.ndarray, proc: Procedure
) -> list[FrontierRow]:
    """Tilt each transform to its KL target (vectorised) and measure; unreachable targets dropped."""
    phi = np.stack([phi_nodes(tf) for tf in transforms])
    lam = lambda_for_kl(phi, kl)
    ok = [int(i) for i in np.nonzero(np.isfinite(lam))[0]]
    if not ok:
        return []
    logp = tilt(phi[ok], lam[ok])[0]
    win = win_rates(logp, proc)
    std = GRID.integrate(np.exp(logp) * GRID.nodes)
    kls = kl_of(logp)
    return [
        FrontierRow(
            label,
            str(transforms[i]),
            getattr(transforms[i], "t", None),
            float(1.0 / lam[i]),
            float(kls[j]),
            float(win[j]),
            float(std[j]),
        )
        for j, i in enumerate(ok)
    ]


def _auto_rows(
    label: str, fam: type[Transform], kl: np.ndarray, proc: Procedure
) -> list[FrontierRow]:
    """Rows of ``exp:auto`` / ``negexp:auto``: the family member with the best t at each KL (K,);
    KLs where no t in T_RANGE is best (the family's limit) are left out, with a warning."""
    ts = best_t_many(fam, proc, kl)
    ok = np.isfinite(ts)
    if not ok.all():
        bad = kl[~ok]
        log.warning(
            "%s for %s: no t in %s is best at %d of %d KLs (%g to %g nats): the family's best is "
            "its limit there (t -> 0 is identity, t -> inf a step); those rows are left out",
            *(label, proc, T_RANGE, bad.size, kl.size, bad.min(), bad.max()),
        )
    if not ok.any():
        return []
    return _rows(label, [fam(float(t)) for t in ts[ok]], kl[ok], proc)  # type: ignore[call-arg]


def frontier(
    procedure: Procedure | str,
    transforms: Sequence[str | Transform],
    kls: Sequence[float] | np.ndarray,
) -> list[FrontierRow]:
    """Win rate against KL for each transform at each KL target (policies tilted to that KL).

    Transforms are specs or objects; ``exp:auto`` / ``negexp:auto`` take the best t at every KL and
    ``optimal`` the fixed-point optimum (an upper bound for every other row at the same KL).
    Targets a transform cannot reach (e.g. a saturating negexp) are left out.
    """
    proc = parse_procedure(procedure)
    kl = check_kl(kls)
    out: list[FrontierRow] = []
    for spec in transforms:
        label = str(spec)
        if isinstance(spec, str) and spec.strip().lower() == "optimal":
            for pol in optimal_policies(proc, kl, None):
                if pol is not None:
                    out.append(
                        FrontierRow(
                            label,
                            "optimal",
                            None,
                            pol.beta,
                            pol.kl(),
                            pol.win_rate(proc),
                            pol.standard_win_rate(),
                        )
                    )
            continue
        fam = auto_family(spec) if isinstance(spec, str) else None
        if fam is not None:
            out += _auto_rows(label, fam, kl, proc)
        else:
            tf = parse_transform(spec)
            out += _rows(label, [tf] * kl.size, kl, proc)
    return out


def needs_theory(spec: str) -> bool:
    """Whether a transform spec is resolved by the theory: ``exp:auto``, ``negexp:auto`` or
    ``optimal``, with or without an ``@KL`` pin."""
    base = spec.partition("@")[0].strip().lower()
    return base == "optimal" or auto_family(base) is not None


def split_target(spec: str) -> tuple[str, float | None]:
    """``"exp:auto@0.3"`` -> ``("exp:auto", 0.3)``; a spec without ``@KL`` -> ``(spec, None)``.

    The suffix pins the KL at which ``exp:auto`` / ``negexp:auto`` / ``optimal`` are resolved, so one
    recipe can sweep KL budgets (each with its own t or fixed-point Phi). ValueError names the spec.
    """
    base, at, kl = spec.partition("@")
    if not at:
        return spec, None
    if not needs_theory(base):
        raise ValueError(f"transform {spec!r}: '@KL' only follows exp:auto, negexp:auto or optimal")
    try:
        k = float(kl)
    except ValueError:
        raise ValueError(f"transform {spec!r}: {kl!r} after '@' is not a number") from None
    if not 0 < k <= MAX_KL:
        raise ValueError(f"transform {spec!r}: the KL after '@' must be in (0, {MAX_KL:g}] nats")
    return base.strip(), k


def resolve_transform(spec: str | Transform, procedure: Procedure | str, kl: float) -> Transform:
    """A transform spec with the theory filled in: ``exp:auto``/``negexp:auto`` get the best t at
    that KL, ``optimal`` the tabulated fixed-point Phi; anything else is ``parse_transform``.
    A ``@KL`` suffix (``exp:auto@0.3``) overrides ``kl``."""
    if isinstance(spec, Transform):
        return spec
    spec, pinned = split_target(spec)
    kl = kl if pinned is None else pinned
    fam = auto_family(spec)
    if fam is not None:
        return fam(best_t(fam, procedure, kl))
    if spec.strip().lower() == "optimal":
        return optimal_policy(procedure, kl=kl).transform
    return parse_transform(spec)


@dataclass(frozen=True)
class Recommendation:
    """What ``infalign solve`` prints: the transform to train with, its t, the beta to start the RL
    sweep at (the calibrated-space beta giving that KL), and the win rates it predicts."""

    procedure: str
    kl: float
    transform: str
    t: float | None
    beta: float
    win_rate: float
    standard_win_rate: float
    identity_win_rate: float
    optimal_win_rate: float
    optimal_beta: float
    # the smallest t within 0.005 of the best win rate (``smallest_t_within``), its beta and win rate
    robust_transform: str | None = None
    robust_beta: float | None = None
    robust_win_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def recommend(procedure: Procedure | str, kl: float) -> Recommendation:
    """Best practical transform for a procedure at one KL budget: identity for plain sampling,
    exp(t) for best-of-n, negexp(t) for worst-of-n, the better of the two otherwise; t tuned by
    ``best_t``. Every number in it is at that KL, so ``win_rate <= optimal_win_rate``."""
    proc = parse_procedure(procedure)
    k = check_kl(kl)
    if k.size != 1:
        raise ValueError(f"recommend: kl must be one number, got {kl!r}; call it once per KL")
    specs = {Sample: ["identity"], BestOfN: ["exp:auto"], WorstOfN: ["negexp:auto"]}
    rows = frontier(proc, [*specs.get(type(proc), ["exp:auto", "negexp:auto"]), "identity"], k)
    candidates = [r for r in rows if r.transform != "identity" or isinstance(proc, Sample)]
    if not candidates:
        raise ValueError(
            f"recommend: no exp/negexp t in {T_RANGE} is best for {proc} at KL {k[0]:g} (the "
            "family's best is its limit); train with the 'optimal' transform instead"
        )
    best = max(candidates, key=lambda r: r.win_rate)
    ident = next(r for r in rows if r.transform == "identity")
    opt = optimal_policy(proc, kl=float(k[0]))
    robust: list[Any] = [None] * 3
    if best.t is not None:
        fam = best.resolved.split(":")[0]
        t = smallest_t_within(fam, proc, float(k[0]), t_best=best.t)
        row = frontier(proc, [f"{fam}:{t:.4g}"], k)[0]
        robust = [row.resolved, row.beta, row.win_rate]
    return Recommendation(
        str(proc),
        float(k[0]),
        best.resolved,
        best.t,
        best.beta,
        best.win_rate,
        best.standard_win_rate,
        ident.win_rate,
        opt.win_rate(proc),
        opt.beta,
        *robust,
    )
