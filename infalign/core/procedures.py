"""Inference-time procedures T as maps on CDFs (spec section 3), and their selection on real samples.

A procedure built from n i.i.d. samples and the order of their rewards maps the policy's CDF F of the
calibrated reward to the CDF G(F) of what it serves:

=================== ================================= =============================================
spec                G(F)                              G'(F)
=================== ================================= =============================================
sample              F                                 1
bon:n               F^n                               n F^(n-1)
won:n               1 - (1 - F)^n                     n (1 - F)^(n-1)
kth:k:n (k-th best) sum_{i=n-k+1}^{n} C(n,i) F^i      n C(n-1, n-k) F^(n-k) (1-F)^(k-1)
                    (1-F)^(n-i)
CdfMap(G, dG)       any increasing G, G(0)=0, G(1)=1  given
=================== ================================= =============================================

``cdf_map`` and ``cdf_map_derivative`` work on numpy arrays and torch tensors alike. ``select`` picks,
for every group of ``n`` consecutive responses of a prompt, the one the procedure would serve
(ties broken uniformly at random with a seeded generator).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BestOfN",
    "CdfMap",
    "KthBestOfN",
    "Procedure",
    "Sample",
    "WorstOfN",
    "parse_procedure",
]


class Procedure:
    """Base class. ``n`` is the group size; ``rank`` the ascending position served within a group."""

    n: int = 1

    def cdf_map(self, F: Any) -> Any:
        raise NotImplementedError

    def cdf_map_derivative(self, F: Any) -> Any:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """0-based position, in ascending reward order within a group of n, of the served response."""
        raise NotImplementedError(f"procedure {self} has no sample-level selection rule")

    def select(
        self,
        rewards: torch.Tensor,
        group_size: int | None = None,
        generator: torch.Generator | int | None = None,
    ) -> torch.Tensor:
        """Indices of the served responses.

        Args:
            rewards: (P, M) rewards, M a multiple of the group size (default ``self.n``).
            group_size: responses per group; consecutive groups ``[g*n, (g+1)*n)`` of each row.
            generator: torch.Generator or int seed for the random tie-breaking.

        Returns:
            (P, M // n) long tensor of column indices into ``rewards``: for each group, the response
            at ascending rank ``self.rank`` (BoN: the max, WoN: the min), ties broken uniformly.
        """
        n = self.n if group_size is None else int(group_size)
        if n != self.n:
            raise ValueError(
                f"group_size={group_size} does not match procedure {self} (n={self.n})"
            )
        r = torch.as_tensor(rewards)
        if r.ndim != 2:
            raise ValueError(f"rewards must be (prompts, responses), got shape {tuple(r.shape)}")
        P, M = r.shape
        if M < n or M % n:
            raise ValueError(
                f"{self}: responses per prompt M={M} must be a positive multiple of n={n}"
            )
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        groups = r.reshape(P, M // n, n)
        # A uniformly random permutation inside each group, then a stable sort: equal rewards end
        # up in random order, so the served index among ties is uniform.
        keys = torch.rand(groups.shape, generator=generator)
        perm = torch.argsort(keys, dim=-1)
        permuted = torch.gather(groups, -1, perm.to(groups.device))
        order = torch.sort(permuted, dim=-1, stable=True).indices
        pos = order[..., self.rank : self.rank + 1]
        local = torch.gather(perm.to(groups.device), -1, pos).squeeze(-1)
        offsets = torch.arange(0, M, n, device=local.device)
        return local + offsets

    def spec(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Sample(Procedure):
    """Plain sampling: G(F) = F."""

    def cdf_map(self, F: Any) -> Any:
        return F

    def cdf_map_derivative(self, F: Any) -> Any:
        return F * 0 + 1

    @property
    def rank(self) -> int:
        return 0

    def __str__(self) -> str:
        return "sample"


def _check_n(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: n must be an integer >= 1, got {n!r}")
    return n


@dataclass(frozen=True)
class BestOfN(Procedure):
    """Best-of-n: serve the highest-reward of n samples; G(F) = F^n."""

    n: int = 4

    def __post_init__(self) -> None:
        _check_n(self.n, "bon")

    def cdf_map(self, F: Any) -> Any:
        return F**self.n

    def cdf_map_derivative(self, F: Any) -> Any:
        return self.n * F ** (self.n - 1)

    @property
    def rank(self) -> int:
        return self.n - 1

    def __str__(self) -> str:
        return f"bon:{self.n}"


@dataclass(frozen=True)
class WorstOfN(Procedure):
    """Worst-of-n (best-of-n jailbreaking): serve the lowest-reward of n; G(F) = 1 - (1 - F)^n."""

    n: int = 4

    def __post_init__(self) -> None:
        _check_n(self.n, "won")

    def cdf_map(self, F: Any) -> Any:
        return 1 - (1 - F) ** self.n

    def cdf_map_derivative(self, F: Any) -> Any:
        return self.n * (1 - F) ** (self.n - 1)

    @property
    def rank(self) -> int:
        return 0

    def __str__(self) -> str:
        return f"won:{self.n}"


@dataclass(frozen=True)
class KthBestOfN(Procedure):
    """Serve the k-th best of n (k=1 is best-of-n, k=n is worst-of-n).

    The served reward is the j-th smallest, j = n - k + 1, so
    G(F) = sum_{i=j}^{n} C(n, i) F^i (1-F)^(n-i) and G'(F) = n C(n-1, j-1) F^(j-1) (1-F)^(n-j).
    """

    k: int = 1
    n: int = 4

    def __post_init__(self) -> None:
        _check_n(self.n, "kth")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.n:
            raise ValueError(f"kth: k must be an integer in [1, n={self.n}], got {self.k!r}")

    def cdf_map(self, F: Any) -> Any:
        j = self.n - self.k + 1
        return sum(
            math.comb(self.n, i) * F**i * (1 - F) ** (self.n - i) for i in range(j, self.n + 1)
        )

    def cdf_map_derivative(self, F: Any) -> Any:
        j = self.n - self.k + 1
        return self.n * math.comb(self.n - 1, j - 1) * F ** (j - 1) * (1 - F) ** (self.n - j)

    @property
    def rank(self) -> int:
        return self.n - self.k

    def __str__(self) -> str:
        return f"kth:{self.k}:{self.n}"


@dataclass(frozen=True)
class CdfMap(Procedure):
    """Any procedure given by an increasing CDF map G with G(0) = 0, G(1) = 1 and its derivative.

    For the calibrated-space theory only: there is no sample-level ``select`` for a general G.
    """

    G: Callable[[Any], Any] = field(compare=False)
    dG: Callable[[Any], Any] = field(compare=False)
    label: str = "custom"

    def __post_init__(self) -> None:
        import numpy as np

        u = np.linspace(0.0, 1.0, 1001)
        g, dg = np.asarray(self.G(u), dtype=float), np.asarray(self.dG(u), dtype=float)
        if abs(g[0]) > 1e-9 or abs(g[-1] - 1) > 1e-9:
            raise ValueError(f"{self.label}: G must satisfy G(0)=0 and G(1)=1, got {g[0]}, {g[-1]}")
        if np.any(np.diff(g) < -1e-12) or np.any(dg < -1e-12):
            raise ValueError(f"{self.label}: G must be increasing on [0, 1] with G' >= 0")

    def cdf_map(self, F: Any) -> Any:
        return self.G(F)

    def cdf_map_derivative(self, F: Any) -> Any:
        return self.dG(F)

    def __str__(self) -> str:
        return self.label


def parse_procedure(spec: str | Procedure) -> Procedure:
    """Parse ``sample``, ``bon:N``, ``won:N`` or ``kth:K:N``; ValueError naming the spec otherwise."""
    if isinstance(spec, Procedure):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"procedure spec must be a string, got {spec!r}")
    parts = spec.strip().lower().split(":")
    try:
        if parts == ["sample"]:
            return Sample()
        if parts[0] in ("bon", "won") and len(parts) == 2:
            cls = BestOfN if parts[0] == "bon" else WorstOfN
            return cls(int(parts[1]))
        if parts[0] == "kth" and len(parts) == 3:
            return KthBestOfN(int(parts[1]), int(parts[2]))
    except ValueError as err:
        raise ValueError(f"procedure {spec!r}: {err}") from None
    raise ValueError(f"unknown procedure {spec!r}; expected sample, bon:N, won:N or kth:K:N")
