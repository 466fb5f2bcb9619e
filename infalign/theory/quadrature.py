"""The one fixed quadrature of the calibrated-space engine (``GRID``).

Gauss-Legendre panels graded geometrically towards both ends of [0, 1] (panel edges down to 1e-10
from 0 and 1), with a spectral integration matrix for running integrals: spikes of width ~beta/t near
u = 1 are resolved. Functions on the grid are arrays shaped (..., N) of their node values.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre

__all__ = ["GRID", "Quadrature", "logsumexp"]


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


def logsumexp(a: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis: (..., N) -> (...)."""
    m = np.max(a, axis=-1, keepdims=True)
    return np.asarray(m[..., 0] + np.log(np.sum(np.exp(a - m), axis=-1)))
