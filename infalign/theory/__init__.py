"""The calibrated-space engine (spec sections 3-5): every policy is a density p on [0, 1].

In calibrated space the reference policy is Uniform[0, 1] and a KL-regularised RL solution for the
transformed reward ``Phi(C)`` is the tilted density p(u) = exp(Phi(u) / beta) / Z. The modules, in
the order they build on each other:

- ``quadrature``: the one fixed quadrature ``GRID`` (graded Gauss-Legendre panels, spectral running
  integrals), on which every density is held as log p at the nodes;
- ``tilted``: tilted policies, KL, win rates W_T and ``beta_for_kl`` (vectorised over policies);
- ``families``: ``best_t``, the t of ``exp`` / ``negexp`` (the registry of core.transforms) that
  maximises W_T at a KL;
- ``optimum``: the fixed-point optimum of W_T - beta KL for any procedure;
- ``specs``: ``frontier``, ``resolve_transform`` (``exp:auto``, ``optimal``, ``@KL`` pins) and
  ``recommend``.
"""

from infalign.theory.families import T_RANGE, best_t
from infalign.theory.optimum import OptimalPolicy, optimal_policy
from infalign.theory.quadrature import GRID, Quadrature
from infalign.theory.specs import (
    FrontierRow,
    Recommendation,
    frontier,
    needs_theory,
    recommend,
    resolve_transform,
    split_target,
)
from infalign.theory.tilted import MAX_KL, CalibratedPolicy, TiltedPolicy, beta_for_kl

__all__ = [
    "GRID",
    "MAX_KL",
    "T_RANGE",
    "CalibratedPolicy",
    "FrontierRow",
    "OptimalPolicy",
    "Quadrature",
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
