"""The best t of a one-parameter family (``exp:auto`` / ``negexp:auto``) at a KL budget.

W_T(t) is the win rate of the family member Phi_t tilted to the KL target. It is scanned on a
log-spaced grid of t, the scan is widened past either end while the maximum sits there (up to
``T_RANGE``), and the maximum is refined by golden-section search in log t. A maximum still at an end
of ``T_RANGE`` is a limit of the family (t -> 0 is identity; t -> inf a step at u = 1 or 0), not an
attainable t: it is reported as NaN (``best_t`` raises, ``frontier`` leaves the row out).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from infalign.core.procedures import Procedure, parse_procedure
from infalign.core.transforms import FAMILIES, Transform
from infalign.theory.tilted import check_kl, lambda_for_kl, phi_nodes, tilt, win_rates

__all__ = ["T_RANGE", "best_t", "best_t_many", "family_class", "smallest_t_within"]

T_RANGE = (1e-3, 1e6)  # the t searched; spikes of width 1/t stay far above the grid's 1e-10
_T_GRID = np.geomspace(0.05, 400.0, 14)  # the first scan; widened by its own ratio when needed
_RATIO = float(_T_GRID[1] / _T_GRID[0])


def family_class(name: Any) -> type[Transform]:
    """``"exp"`` / ``"negexp"`` (any case) or the class itself -> the class in the registry."""
    if isinstance(name, str) and name.lower() in FAMILIES:
        return FAMILIES[name.lower()]
    if name in FAMILIES.values():
        return name
    raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {name!r}")


def _family_win_rates(
    cls: type[Transform], t: np.ndarray, kl: np.ndarray, procedure: Procedure
) -> np.ndarray:
    """Win rates of family members with parameters t (L,) at KL targets kl (L,); -inf where the
    member cannot reach its target."""
    phi = np.stack([phi_nodes(cls(float(ti))) for ti in t])  # type: ignore[call-arg]
    lam = lambda_for_kl(phi, kl)
    ok = np.isfinite(lam)
    w = np.full(kl.shape, -np.inf)
    if ok.any():  # (golden-section probes can all lie past the edge of reachability)
        w[ok] = win_rates(tilt(phi[ok], lam[ok])[0], procedure)
    return w


def _scan(cls: type[Transform], procedure: Procedure, kl: np.ndarray) -> tuple[np.ndarray, ...]:
    """W on the t grid (T,) for every KL (K,) -> (log t (T,), W (T, K)), the grid widened at an
    end (by the grid's own ratio, within T_RANGE) while some KL's maximum sits at that end."""
    ts = _T_GRID.copy()
    K = kl.size
    w = _family_win_rates(cls, np.repeat(ts, K), np.tile(kl, ts.size), procedure).reshape(-1, K)
    while True:
        best = np.argmax(w, axis=0)
        reached = np.isfinite(w.max(axis=0))
        top = reached & (best == ts.size - 1) & (ts[-1] * _RATIO <= T_RANGE[1])
        low = reached & (best == 0) & (ts[0] / _RATIO >= T_RANGE[0])
        if not (top.any() or low.any()):
            return np.log(ts), w
        if top.any():
            ts, w = np.append(ts, ts[-1] * _RATIO), np.vstack([w, np.full(K, -np.inf)])
            w[-1, top] = _family_win_rates(cls, np.full(top.sum(), ts[-1]), kl[top], procedure)
        if low.any():
            ts, w = np.insert(ts, 0, ts[0] / _RATIO), np.vstack([np.full(K, -np.inf), w])
            w[0, low] = _family_win_rates(cls, np.full(low.sum(), ts[0]), kl[low], procedure)


def best_t_many(cls: type[Transform], procedure: Procedure, kl: np.ndarray) -> np.ndarray:
    """argmax_t W_T at each KL (K,) -> t (K,): the widened scan, then golden-section in log t around
    the best point. NaN where no member reaches the KL or the maximum is at an end of T_RANGE."""
    logt, w = _scan(cls, procedure, kl)
    T = logt.size
    best = np.argmax(w, axis=0)
    # The best point evaluated so far is what is returned (the bracket's midpoint may lie past
    # the edge of reachability, where larger t no longer attains the KL).
    best_logt, best_w = logt[best], np.max(w, axis=0)
    a = logt[np.clip(best - 1, 0, T - 1)]
    b = logt[np.clip(best + 1, 0, T - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc = _family_win_rates(cls, np.exp(c), kl, procedure)
    fd = _family_win_rates(cls, np.exp(d), kl, procedure)
    for _ in range(40):
        left = fc > fd  # maximum in [a, d] (left) or [c, b]
        a, b = np.where(left, a, c), np.where(left, d, b)
        c_next = np.where(left, b - g * (b - a), d)
        d_next = np.where(left, c, a + g * (b - a))
        x = np.where(left, c_next, d_next)
        fresh = _family_win_rates(cls, np.exp(x), kl, procedure)
        better = fresh > best_w
        best_logt, best_w = np.where(better, x, best_logt), np.where(better, fresh, best_w)
        fc, fd = np.where(left, fresh, fd), np.where(left, fc, fresh)
        c, d = c_next, d_next
        if np.all(b - a < 1e-4):
            break
    limit = (best == 0) | (best == T - 1) | ~np.isfinite(best_w)
    return np.where(limit, np.nan, np.exp(best_logt))


def best_t(family: Any, procedure: Procedure | str, kl: float) -> float:
    """The t of ``Exp``/``NegExp`` that maximises the procedure's win rate at that KL.

    ValueError when the maximum is a limit of the family rather than a t in ``T_RANGE`` (e.g.
    ``exp`` for best-of-1000, whose win rate still rises at t = 1e6).
    """
    cls, proc = family_class(family), parse_procedure(procedure)
    t = float(best_t_many(cls, proc, check_kl(kl))[0])
    if math.isnan(t):
        raise ValueError(
            f"{cls.name}:auto for {proc} at KL {kl:g}: no t in [{T_RANGE[0]:g}, {T_RANGE[1]:g}] "
            "maximises the win rate (its best is a limit of the family: t -> 0 is identity, "
            f"t -> inf a step; or the KL is out of reach); give {cls.name}:T or use 'optimal'"
        )
    return t


def smallest_t_within(
    family: Any,
    procedure: Procedure | str,
    kl: float,
    tol: float = 0.005,
    t_best: float | None = None,
) -> float:
    """The smallest t whose win rate at ``kl`` is within ``tol`` of the family's best (``best_t``):
    the first of 41 t's log-spaced from best / 1e4 to best that is, then again on 41 t's between it
    and the one before (to 0.6 % in t).

    The argmax can sit on a plateau along which beta falls by orders of magnitude for a gain below
    ``tol``: worst-of-4 at KL 1 has negexp:16 at beta 2.4e-5 and negexp:4 at beta 0.029 for 0.0025
    less. A reward scaled by 1/beta that large is ill-conditioned for a trained policy (the harmless
    sweep's negexp:auto@1 unit ran to KL 179), so ``recommend`` reports this t beside the best.
    ``t_best``: the family's ``best_t`` at this KL, when the caller has it already.
    """
    cls, proc = family_class(family), parse_procedure(procedure)
    k = check_kl(kl)
    if t_best is None:
        t_best = best_t(cls, proc, float(k[0]))
    w_best = float(_family_win_rates(cls, np.array([t_best]), k, proc)[0])
    lo, hi = max(T_RANGE[0], t_best / 1e4), t_best
    for _ in range(2):
        ts = np.geomspace(lo, hi, 41)
        i = int(np.argmax(_family_win_rates(cls, ts, np.full(ts.size, k[0]), proc) >= w_best - tol))
        lo, hi = ts[max(i - 1, 0)], ts[i]
    return float(hi)
