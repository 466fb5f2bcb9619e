"""The calibrated-space engine (spec sections 3-5): every policy is a density p on [0, 1].

In calibrated space the reference policy is Uniform[0, 1] and a KL-regularised RL solution for the
transformed reward ``Phi(C)`` is the tilted density

    p(u) = exp(Phi(u) / beta) / Z,     Z = integral_0^1 exp(Phi / beta),    F(u) = integral_0^u p

with, for a procedure with CDF map G,

    KL               = integral p log p = E_p[Phi] / beta - log Z
    standard win rate = E_p[U]
    W_T(p)            = 1 - integral_0^1 G(F(u)) G'(u) du.

All integrals use one fixed quadrature (``GRID``): Gauss-Legendre panels graded geometrically towards
both ends of [0, 1] (panel edges down to 1e-10 from 0 and 1), with a spectral integration matrix for the
running integral F. Spikes of width ~beta/t near u = 1 are resolved, everything is computed in log
space, and every function is vectorised over many policies at once (arrays shaped (L, nodes)).

The optimum for any procedure (spec section 4) is the fixed point p* ∝ exp(Phi_{F*} / beta) with
Phi_F(v) = -integral_v^1 G'(F(u)) G'(u) du, found by damped (mirror-ascent) iteration with the KL
held at its target at every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.polynomial import legendre

from infalign.core.procedures import BestOfN, Procedure, Sample, WorstOfN, parse_procedure
from infalign.core.transforms import Exp, NegExp, Tabulated, Transform, parse_transform

__all__ = [
    "GRID",
    "FrontierRow",
    "OptimalPolicy",
    "Recommendation",
    "TiltedPolicy",
    "best_t",
    "beta_for_kl",
    "frontier",
    "needs_theory",
    "optimal_policy",
    "recommend",
    "resolve_transform",
    "split_target",
]

MAX_KL = 12.0  # beyond this the tilted densities are narrower than the grid resolves reliably
_LAMBDA_RANGE = (1e-8, 1e15)


class Quadrature:
    """Composite Gauss-Legendre rule on [0, 1] with a running-integral operator.

    ``nodes``/``weights`` are (N,) with N = panels * order; ``integrate(f)`` sums over the last axis
    and ``cumulative(f)`` returns integral_0^{node} f for every node (spectrally accurate per panel).
    """

    def __init__(self, order: int = 16, min_gap: float = 1e-10, ratio: float = 1.6) -> None:
        gaps = [min_gap]
        while gaps[-1] * ratio < 0.5:
            gaps.append(gaps[-1] * ratio)
        left = np.array([0.0, *gaps])
        edges = np.unique(np.concatenate([left, 0.5 * np.ones(1), 1.0 - left[::-1]]))
        x, w = legendre.leggauss(order)
        # S[i, k] = integral_{-1}^{x_i} L_k(s) ds for the Lagrange basis L_k on the nodes x.
        vander = legendre.legvander(x, order - 1)  # (n, n): P_j(x_i)
        coef = np.linalg.inv(vander)  # L_k = sum_j coef[j, k] P_j
        integ = np.stack(
            [legendre.legval(x, legendre.legint(np.eye(order)[j], lbnd=-1)) for j in range(order)],
            axis=1,
        )  # (n, n): integral_{-1}^{x_i} P_j
        self.order = order
        self.edges = edges
        self.half = np.diff(edges) / 2.0  # (J,)
        self.nodes = (edges[:-1, None] + self.half[:, None] * (x[None, :] + 1.0)).ravel()
        self.weights = (self.half[:, None] * w[None, :]).ravel()
        self.log_weights = np.log(self.weights)
        self._S = integ @ coef  # (n, n)
        self._w = w
        self._x = x
        self._bary = (-1.0) ** np.arange(order) * np.sqrt((1.0 - x**2) * w)  # Legendre points

    @property
    def size(self) -> int:
        return int(self.nodes.size)

    def integrate(self, f: np.ndarray) -> np.ndarray:
        return np.asarray(f @ self.weights)

    def interpolate(self, f: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Evaluate node values f (N,) at points u in [0, 1] with the per-panel interpolating
        polynomial (barycentric Lagrange on the Gauss nodes): spectrally accurate, like the rule."""
        u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
        j = np.clip(np.searchsorted(self.edges, u, side="right") - 1, 0, self.half.size - 1)
        x = (u - self.edges[j]) / self.half[j] - 1.0  # (...) in [-1, 1]
        fp = f.reshape(-1, self.order)[j]  # (..., n)
        diff = x[..., None] - self._x
        exact = diff == 0.0
        diff = np.where(exact, 1.0, diff)
        terms = self._bary / diff
        out = np.sum(terms * fp, axis=-1) / np.sum(terms, axis=-1)
        hit = exact.any(axis=-1)
        return np.where(hit, np.sum(np.where(exact, fp, 0.0), axis=-1), out)

    def cumulative(self, f: np.ndarray) -> np.ndarray:
        """integral_0^{nodes} f, for f shaped (..., N); returns (..., N)."""
        shape = f.shape
        fp = f.reshape(*shape[:-1], -1, self.order)  # (..., J, n)
        local = np.einsum("...jk,ik->...ji", fp, self._S) * self.half[:, None]
        totals = (fp @ self._w) * self.half  # (..., J)
        starts = np.cumsum(totals, axis=-1) - totals
        return (local + starts[..., None]).reshape(shape)


GRID = Quadrature()


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=-1, keepdims=True)
    return np.asarray(m[..., 0] + np.log(np.sum(np.exp(a - m), axis=-1)))


def _tilt(phi: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p = lam * phi - log Z on the grid nodes; phi (..., N), lam (...,) -> (log p, log Z)."""
    a = lam[..., None] * phi
    log_z = _logsumexp(a + GRID.log_weights)
    return a - log_z[..., None], log_z


def _kl(logp: np.ndarray) -> np.ndarray:
    return GRID.integrate(np.exp(logp) * logp)


def _lambda_for_kl(
    phi: np.ndarray, kl: np.ndarray, tol: float = 1e-10, lam0: np.ndarray | None = None
) -> np.ndarray:
    """Solve KL(tilt(phi, lam)) = kl for lam = 1/beta, vectorised: phi (L, N), kl (L,) -> (L,).

    KL(lam) = lam E[phi] - log Z(lam) is increasing with dKL/d log(lam) = lam^2 Var_p(phi): safeguarded
    Newton in s = log(lam), kept inside a shrinking bracket. Targets the transform cannot
    reach with lam <= 1e15 (e.g. negexp with a huge t) come back as NaN.
    """
    phi = np.broadcast_to(phi, (*kl.shape, GRID.size))
    lo = np.full(kl.shape, math.log(_LAMBDA_RANGE[0]))
    hi = np.full(kl.shape, math.log(_LAMBDA_RANGE[1]))
    var0 = GRID.integrate(phi**2) - GRID.integrate(phi) ** 2
    s = np.clip(0.5 * np.log(2.0 * kl / np.maximum(var0, 1e-300)), lo, hi)
    if lam0 is not None:  # warm start where a previous solution is known
        s = np.where(np.isfinite(lam0) & (lam0 > 0), np.log(np.where(lam0 > 0, lam0, 1.0)), s)
    log_target = np.log(kl)
    g = np.full(kl.shape, np.inf)
    # Targets above KL(lam_max) are unreachable on this grid: settle them in one pass.
    reachable = _kl(_tilt(phi, np.exp(hi))[0]) > kl
    active = reachable.copy()
    for _ in range(200):
        # Newton on g(s) = log KL(s) - log kl: nearly linear for small lam (KL ~ lam^2 Var/2) and
        # concave beyond, so the iterates converge from one side after at most one overshoot.
        idx = np.nonzero(active)[0]
        lam = np.exp(s[idx])
        logp, _ = _tilt(phi[idx], lam)
        p = np.exp(logp)
        mean = GRID.integrate(p * phi[idx])
        var = np.maximum(GRID.integrate(p * phi[idx] ** 2) - mean**2, 0.0)
        kl_now = np.maximum(GRID.integrate(p * logp), 1e-300)
        g[idx] = np.log(kl_now) - log_target[idx]
        lo[idx] = np.where(g[idx] < 0, s[idx], lo[idx])
        hi[idx] = np.where(g[idx] > 0, s[idx], hi[idx])
        step = s[idx] - g[idx] / np.maximum(lam**2 * var / kl_now, 1e-300)
        # Newton while it stays inside the bracket (1% margins), bisection otherwise.
        width = hi[idx] - lo[idx]
        step = np.where(np.isfinite(step), step, 0.5 * (lo[idx] + hi[idx]))
        going = (np.abs(g[idx]) > tol) & (width > 1e-13)
        inside = (step > lo[idx] + 0.01 * width) & (step < hi[idx] - 0.01 * width)
        s[idx] = np.where(going, np.where(inside, step, 0.5 * (lo[idx] + hi[idx])), s[idx])
        active[idx] = going
        if not active.any():
            break
    f = np.abs(g)
    # Targets still off after the loop sit at the top of the bracket: not reachable on this grid.
    return np.where(reachable & (f < 1e-7), np.exp(s), np.nan)


def _win_rates(logp: np.ndarray, procedure: Procedure) -> np.ndarray:
    """W_T = 1 - integral G(F(u)) G'(u) du for densities given as log p on the grid (..., N)."""
    F = np.clip(GRID.cumulative(np.exp(logp)), 0.0, 1.0)
    return np.asarray(
        1.0 - GRID.integrate(procedure.cdf_map(F) * procedure.cdf_map_derivative(GRID.nodes))
    )


class CalibratedPolicy:
    """A density on [0, 1] held as log p on ``GRID.nodes``; the reference policy is log p = 0."""

    logp: np.ndarray  # (N,)

    def kl(self) -> float:
        """KL(p || Uniform) = integral p log p, in nats."""
        return float(_kl(self.logp))

    def win_rate(self, procedure: Procedure | str = "sample") -> float:
        """Inference-time win rate against the reference, T applied to both sides (1/2 for p = 1)."""
        return float(_win_rates(self.logp, parse_procedure(procedure)))

    def standard_win_rate(self) -> float:
        """E_p[U]: the win rate under plain sampling."""
        return float(GRID.integrate(np.exp(self.logp) * GRID.nodes))

    @cached_property
    def _cdf_nodes(self) -> np.ndarray:
        return np.asarray(GRID.cumulative(np.exp(self.logp)))

    def cdf(self, u: Any) -> np.ndarray:
        """F(u) = integral_0^u p, spectrally interpolated within the quadrature panels."""
        u = np.asarray(u, dtype=float)
        F = np.clip(GRID.interpolate(self._cdf_nodes, u), 0.0, 1.0)
        return np.where(u <= 0.0, 0.0, np.where(u >= 1.0, 1.0, F))

    def density(self, u: Any) -> np.ndarray:
        """p(u), interpolated in log space within the quadrature panels."""
        return np.exp(GRID.interpolate(self.logp, np.asarray(u, dtype=float)))


@dataclass(frozen=True)
class TiltedPolicy(CalibratedPolicy):
    """p(u) ∝ exp(Phi(u) / beta): the KL-regularised RL optimum for reward Phi(C)."""

    transform: Transform
    beta: float

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")

    @cached_property
    def logp(self) -> np.ndarray:  # type: ignore[override]
        phi = np.asarray(self.transform(GRID.nodes), dtype=float)
        return _tilt(phi, np.asarray(1.0 / self.beta))[0]

    def density(self, u: Any) -> np.ndarray:
        """p(u) = exp(Phi(u)/beta - log Z), exact at any u."""
        phi = np.asarray(self.transform(GRID.nodes), dtype=float)
        log_z = _tilt(phi, np.asarray(1.0 / self.beta))[1]
        return np.exp(np.asarray(self.transform(np.asarray(u, dtype=float))) / self.beta - log_z)


def _phi_nodes(transform: Transform) -> np.ndarray:
    phi = np.asarray(transform(GRID.nodes), dtype=float)
    if not np.all(np.isfinite(phi)):
        raise ValueError(f"transform {transform} is not finite on (0, 1)")
    return phi


def _check_kl(kl: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(kl, dtype=float))
    if np.any(~np.isfinite(arr)) or np.any(arr <= 0) or np.any(arr > MAX_KL):
        raise ValueError(f"kl must be in (0, {MAX_KL}], got {kl!r}")
    return arr


def beta_for_kl(transform: Transform | str, kl: float) -> float:
    """The beta whose tilted policy exp(Phi/beta)/Z has KL(p || uniform) = kl."""
    tf = parse_transform(transform)
    lam = float(_lambda_for_kl(_phi_nodes(tf)[None], _check_kl(kl))[0])
    if math.isnan(lam):
        raise ValueError(f"transform {tf} cannot reach KL {kl!r} (the tilt saturates first)")
    return 1.0 / lam


_FAMILIES = {"exp": Exp, "negexp": NegExp}
_T_GRID = np.geomspace(0.05, 400.0, 14)


def _family(family: Any) -> type[Transform]:
    if isinstance(family, str) and family.lower() in _FAMILIES:
        return _FAMILIES[family.lower()]
    if family in (Exp, NegExp):
        return family
    raise ValueError(f"family must be 'exp' or 'negexp', got {family!r}")


def _family_win_rates(
    cls: type[Transform], t: np.ndarray, kl: np.ndarray, procedure: Procedure
) -> tuple[np.ndarray, np.ndarray]:
    """Win rates and lambdas of family members with parameters t (L,) at KL targets kl (L,)."""
    phi = np.stack([_phi_nodes(cls(float(ti))) for ti in t])  # type: ignore[call-arg]
    lam = _lambda_for_kl(phi, kl)
    ok = np.isfinite(lam)
    w = np.full(kl.shape, -np.inf)
    if ok.any():  # (golden-section probes can all lie past the edge of reachability)
        w[ok] = _win_rates(_tilt(phi[ok], lam[ok])[0], procedure)
    return w, lam


def _best_t_many(cls: type[Transform], procedure: Procedure, kl: np.ndarray) -> np.ndarray:
    """argmax_t W_T at each KL: a log-spaced scan, then golden-section in log t around the best."""
    T, K = _T_GRID.size, kl.size
    w, _ = _family_win_rates(cls, np.repeat(_T_GRID, K), np.tile(kl, T), procedure)
    best = np.argmax(w.reshape(T, K), axis=0)
    logt = np.log(_T_GRID)
    # The best point evaluated so far is what is returned (the bracket's midpoint may lie past
    # the edge of reachability, where larger t no longer attains the KL).
    best_logt, best_w = logt[best], np.max(w.reshape(T, K), axis=0)
    a = logt[np.clip(best - 1, 0, T - 1)]
    b = logt[np.clip(best + 1, 0, T - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc = _family_win_rates(cls, np.exp(c), kl, procedure)[0]
    fd = _family_win_rates(cls, np.exp(d), kl, procedure)[0]
    for _ in range(40):
        left = fc > fd  # maximum in [a, d] (left) or [c, b]
        a, b = np.where(left, a, c), np.where(left, d, b)
        c_next = np.where(left, b - g * (b - a), d)
        d_next = np.where(left, c, a + g * (b - a))
        x = np.where(left, c_next, d_next)
        fresh = _family_win_rates(cls, np.exp(x), kl, procedure)[0]
        better = fresh > best_w
        best_logt, best_w = np.where(better, x, best_logt), np.where(better, fresh, best_w)
        fc, fd = np.where(left, fresh, fd), np.where(left, fc, fresh)
        c, d = c_next, d_next
        if np.all(b - a < 1e-4):
            break
    return np.asarray(np.exp(best_logt))


def best_t(family: Any, procedure: Procedure | str, kl: float) -> float:
    """The t of ``Exp``/``NegExp`` that maximises the procedure's win rate at that KL."""
    proc = parse_procedure(procedure)
    return float(_best_t_many(_family(family), proc, _check_kl(kl))[0])


def _phi_of(logp: np.ndarray, procedure: Procedure) -> np.ndarray:
    """Phi_F(v) = -integral_v^1 G'(F(u)) G'(u) du (the functional derivative of W_T), shape (L, N)."""
    F = np.clip(GRID.cumulative(np.exp(logp)), 0.0, 1.0)
    g = procedure.cdf_map_derivative(F) * procedure.cdf_map_derivative(GRID.nodes)
    return np.asarray(GRID.cumulative(g) - GRID.integrate(g)[..., None])


def _solve_optimum(
    procedure: Procedure,
    kl: np.ndarray | None = None,
    lam: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 5000,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed point p ∝ exp(lam Phi_p) at KL targets ``kl`` (L,) or at fixed ``lam`` = 1/beta (L,).

    Damped iteration in log space: log p <- (1 - eta) log p + eta log q with q = exp(lam Phi_p) / Z;
    for a KL target lam is re-solved at every step so that KL(q) = kl. The step eta is per row: it
    halves whenever the residual TV(p, q) grows and recovers slowly otherwise. Returns (log p, lam);
    rows whose KL target became unreachable have lam = NaN.
    """
    target = kl if kl is not None else lam
    assert target is not None
    L = target.shape[0]
    logp = np.zeros((L, GRID.size))
    lam_now = np.full(L, np.nan) if kl is not None else np.asarray(lam, dtype=float)
    eta = np.full(L, 0.5)
    prev = np.full(L, np.inf)
    active = np.arange(L)
    for it in range(max_iter):
        a = active
        phi = _phi_of(logp[a], procedure)
        if kl is not None:
            lam_now[a] = _lambda_for_kl(phi, kl[a], lam0=lam_now[a])
        # A KL target the current Phi cannot reach (it saturates, e.g. worst-of-n far beyond
        # KL 3 where W is ~1) ends its row with lam = NaN.
        lam_a = np.where(np.isfinite(lam_now[a]), lam_now[a], 1.0)
        logq = _tilt(phi, lam_a)[0]
        change = GRID.integrate(np.abs(np.exp(logq) - np.exp(logp[a])))  # total variation
        done = (change < tol) | ~np.isfinite(lam_now[a])
        logp[a[done]] = logq[done]
        if it == 0:
            logp[a] = logq
        else:
            eta[a] = np.where(change > prev[a], eta[a] * 0.5, np.minimum(eta[a] * 1.1, 0.8))
            prev[a] = change
            mixed = (1.0 - eta[a, None]) * logp[a] + eta[a, None] * logq
            new = mixed - _logsumexp(mixed + GRID.log_weights)[:, None]
            logp[a[~done]] = new[~done]
        active = a[~done]
        if active.size == 0:
            return logp, lam_now
    raise RuntimeError(
        f"optimal policy for {procedure} did not converge (TV change {change.max():.1e})"
    )


@dataclass(frozen=True, eq=False)
class OptimalPolicy(CalibratedPolicy):
    """The optimum of W_T - beta KL (spec section 4) for one procedure.

    ``transform`` is the fixed-point Phi as a ``Tabulated`` transform rescaled onto [0, 1] and
    ``beta`` the matching temperature, so ``TiltedPolicy(transform, beta)`` is this same policy and
    CTRL can train on it; ``lagrange_beta`` is the beta of the objective W_T - beta KL itself.
    """

    procedure: Procedure
    logp: np.ndarray
    transform: Tabulated
    beta: float
    lagrange_beta: float


def _optimal_policies(
    procedure: Procedure, kl: np.ndarray | None, lam: np.ndarray | None
) -> list[OptimalPolicy | None]:
    """Solve the fixed points (vectorised over rows) and carry each as a [0, 1] Tabulated Phi.

    Phi_F(v) = cum(v) - total with cum(v) = integral_0^v G'(F) G', so Phi_norm = cum / total and
    lam Phi = (lam total) Phi_norm + const: the normalised transform's beta is 1 / (lam total).
    Rows whose KL target is out of reach come back as None.
    """
    logp, lam_out = _solve_optimum(procedure, kl=kl, lam=lam)
    F = np.clip(GRID.cumulative(np.exp(logp)), 0.0, 1.0)
    g = procedure.cdf_map_derivative(F) * procedure.cdf_map_derivative(GRID.nodes)
    cum, total = GRID.cumulative(g), GRID.integrate(g)
    grid = (0.0, *GRID.nodes.tolist(), 1.0)
    out: list[OptimalPolicy | None] = []
    for row in range(logp.shape[0]):
        if not np.isfinite(lam_out[row]):
            out.append(None)
            continue
        values = np.maximum.accumulate(np.clip(cum[row] / total[row], 0.0, 1.0))
        tf = Tabulated(grid, (0.0, *values.tolist(), 1.0))
        beta = float(1.0 / (lam_out[row] * total[row]))
        out.append(OptimalPolicy(procedure, logp[row], tf, beta, float(1.0 / lam_out[row])))
    return out


def optimal_policy(
    procedure: Procedure | str, kl: float | None = None, beta: float | None = None
) -> OptimalPolicy:
    """The best policy for ``procedure`` at a KL budget (``kl=``) or a Lagrange ``beta=`` (one of them)."""
    proc = parse_procedure(procedure)
    if (kl is None) == (beta is None):
        raise ValueError("optimal_policy: give exactly one of kl= or beta=")
    if kl is not None:
        pol = _optimal_policies(proc, _check_kl(kl), None)[0]
        if pol is None:
            raise ValueError(
                f"the optimum for {proc} at KL {kl!r} is out of reach on the calibrated-space grid "
                "(its win rate is already within ~1e-4 of 1 at a lower KL)"
            )
        return pol
    if not (beta is not None and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"optimal_policy: beta must be a finite number > 0, got {beta!r}")
    pol = _optimal_policies(proc, None, np.array([1.0 / beta]))[0]
    assert pol is not None
    return pol


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


def _auto_family(spec: str) -> type[Transform] | None:
    name, _, arg = spec.strip().lower().partition(":")
    return _FAMILIES[name] if name in _FAMILIES and arg == "auto" else None


def _rows(
    label: str, transforms: list[Transform], kl: np.ndarray, proc: Procedure
) -> list[FrontierRow]:
    """Tilt each transform to its KL target (vectorised) and measure; unreachable targets dropped."""
    phi = np.stack([_phi_nodes(tf) for tf in transforms])
    lam = _lambda_for_kl(phi, kl)
    ok = np.nonzero(np.isfinite(lam))[0]
    if ok.size == 0:
        return []
    logp = _tilt(phi[ok], lam[ok])[0]
    win = _win_rates(logp, proc)
    std = GRID.integrate(np.exp(logp) * GRID.nodes)
    kls = _kl(logp)
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
    kl = _check_kl(kls)
    out: list[FrontierRow] = []
    for spec in transforms:
        label = str(spec)
        if isinstance(spec, str) and spec.strip().lower() == "optimal":
            for pol in _optimal_policies(proc, kl, None):
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
        fam = _auto_family(spec) if isinstance(spec, str) else None
        if fam is not None:
            ts = _best_t_many(fam, proc, kl)
            out += _rows(label, [fam(float(t)) for t in ts], kl, proc)  # type: ignore[call-arg]
        else:
            tf = parse_transform(spec)
            out += _rows(label, [tf] * kl.size, kl, proc)
    return out


def needs_theory(spec: str) -> bool:
    """Whether a transform spec is resolved by the theory: ``exp:auto``, ``negexp:auto`` or
    ``optimal``, with or without an ``@KL`` pin."""
    base = spec.partition("@")[0].strip().lower()
    return base == "optimal" or _auto_family(base) is not None


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
    fam = _auto_family(spec)
    if fam is not None:
        return fam(best_t(fam, procedure, kl))  # type: ignore[call-arg]
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def recommend(procedure: Procedure | str, kl: float) -> Recommendation:
    """Best practical transform for a procedure at a KL budget: identity for plain sampling, exp(t)
    for best-of-n, negexp(t) for worst-of-n, the better of the two otherwise; t tuned by ``best_t``."""
    proc = parse_procedure(procedure)
    k = _check_kl(kl)
    specs = {Sample: ["identity"], BestOfN: ["exp:auto"], WorstOfN: ["negexp:auto"]}
    rows = frontier(proc, [*specs.get(type(proc), ["exp:auto", "negexp:auto"]), "identity"], k)
    best = max(
        (r for r in rows if r.transform != "identity" or isinstance(proc, Sample)),
        key=lambda r: r.win_rate,
    )
    ident = next(r for r in rows if r.transform == "identity")
    opt = optimal_policy(proc, kl=float(k[0]))
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
    )
