"""The optimal policy for a procedure at a KL budget (spec section 4).

The optimum of W_T - beta KL is the fixed point p* ∝ exp(Phi_{F*} / beta) with the functional
derivative of W_T as its reward,

    Phi_F(v) = -integral_v^1 G'(F(u)) G'(u) du,

found by damped (mirror-ascent) iteration with the KL held at its target at every step. Its
``transform`` is Phi_{F*} rescaled onto [0, 1], so CTRL can train on it like any other transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from infalign.core.procedures import Procedure, parse_procedure
from infalign.core.transforms import Tabulated
from infalign.theory.quadrature import GRID, logsumexp
from infalign.theory.tilted import CalibratedPolicy, check_kl, lambda_for_kl, tilt

__all__ = ["OptimalPolicy", "optimal_policies", "optimal_policy"]


def _phi_of(logp: np.ndarray, procedure: Procedure) -> np.ndarray:
    """Phi_F(v) = -integral_v^1 G'(F(u)) G'(u) du (the functional derivative of W_T), shape (L, N)."""
    F = np.clip(GRID.cumulative(np.exp(logp)), 0.0, 1.0)
    g = procedure.cdf_map_derivative(F) * procedure.cdf_map_derivative(GRID.nodes)
    return np.asarray(GRID.cumulative(g) - GRID.integrate(g)[..., None])


def _temper(logr: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Project r (log r (L, N), unnormalised) onto the KL sphere: r^g / Z with KL = kl (L,).

    Rows whose target r^g cannot reach keep r, normalised."""
    logr = logr - logr.max(axis=-1, keepdims=True)
    g = lambda_for_kl(logr, kl, lam0=np.ones(kl.shape))  # r is near the sphere: g ~ 1
    return tilt(logr, np.where(np.isfinite(g), g, 1.0))[0]


def _solve_optimum(
    procedure: Procedure,
    kl: np.ndarray | None = None,
    lam: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 3000,
) -> tuple[np.ndarray, np.ndarray]:
    """Fixed point p ∝ exp(lam Phi_p) at KL targets ``kl`` (L,) or at fixed ``lam`` = 1/beta (L,).

    Damped iteration in log space: log r = (1 - eta) log p + eta log q with q = exp(lam Phi_p) / Z;
    for a KL target lam is re-solved at every step so that KL(q) = kl, and the geometric mixture r,
    which is more concentrated than p and q (KL(r) > kl: at KL 7 for bon:4 it overshot to 9.4 and
    the iteration ran away), is tempered back onto the sphere KL = kl. The step eta is per row: it
    halves whenever the residual TV(p, q) grows and recovers slowly otherwise. A row whose step
    has shrunk below 1e-6 with TV < 1e-7 sits at the rounding floor of lam Phi (lam ~ 1e6 at KL 12)
    and counts as converged. Returns (log p, lam); rows whose KL target became unreachable have
    lam = NaN.
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
            lam_now[a] = lambda_for_kl(phi, kl[a], lam0=lam_now[a])
        # A KL target the current Phi cannot reach (it saturates, e.g. worst-of-n far beyond
        # KL 3 where W is ~1) ends its row with lam = NaN.
        lam_a = np.where(np.isfinite(lam_now[a]), lam_now[a], 1.0)
        logq = tilt(phi, lam_a)[0]
        change = GRID.integrate(np.abs(np.exp(logq) - np.exp(logp[a])))  # total variation
        stalled = (eta[a] < 1e-6) & (change < 1e-7)
        done = (change < tol) | stalled | ~np.isfinite(lam_now[a])
        logp[a[done]] = logq[done]
        if it == 0:
            logp[a] = logq
        else:
            eta[a] = np.where(change > prev[a], eta[a] * 0.5, np.minimum(eta[a] * 1.1, 0.8))
            prev[a] = change
            mixed = (1.0 - eta[a, None]) * logp[a] + eta[a, None] * logq
            if kl is not None:
                new = _temper(mixed, kl[a])
            else:
                new = mixed - logsumexp(mixed + GRID.log_weights)[:, None]
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


def optimal_policies(
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
        pol = optimal_policies(proc, check_kl(kl), None)[0]
        if pol is None:
            raise ValueError(
                f"the optimum for {proc} at KL {kl!r} is out of reach on the calibrated-space grid "
                "(its win rate is already within ~1e-4 of 1 at a lower KL)"
            )
        return pol
    if not (beta is not None and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"optimal_policy: beta must be a finite number > 0, got {beta!r}")
    pol = optimal_policies(proc, None, np.array([1.0 / beta]))[0]
    assert pol is not None
    return pol
