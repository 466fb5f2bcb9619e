"""Procedures T (spec section 3): CDF maps G and G' against closed forms, finite differences and Monte
Carlo order statistics; sample-level selection (which index is served, uniform tie-breaking); specs."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from infalign.core.procedures import (
    BestOfN,
    CdfMap,
    KthBestOfN,
    Procedure,
    Sample,
    WorstOfN,
    parse_procedure,
)

FAST = settings(max_examples=40, deadline=None)

U = np.linspace(0.0, 1.0, 201)

PROCEDURES: list[Procedure] = [
    Sample(),
    BestOfN(1),
    BestOfN(2),
    BestOfN(4),
    BestOfN(16),
    WorstOfN(1),
    WorstOfN(3),
    WorstOfN(8),
    KthBestOfN(1, 1),
    KthBestOfN(1, 4),
    KthBestOfN(2, 4),
    KthBestOfN(3, 4),
    KthBestOfN(4, 4),
    KthBestOfN(3, 7),
    CdfMap(lambda F: F**2 * (3 - 2 * F), lambda F: 6 * F * (1 - F), "smoothstep"),
]
IDS = [str(p) for p in PROCEDURES]


# ------------------------------------------------------------------------------------ cdf maps


def closed_form(proc: Procedure, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, G') written out independently of the module."""
    if isinstance(proc, Sample):
        return F, np.ones_like(F)
    if isinstance(proc, BestOfN):
        n = proc.n
        return F**n, n * F ** (n - 1)
    if isinstance(proc, WorstOfN):
        n = proc.n
        return 1 - (1 - F) ** n, n * (1 - F) ** (n - 1)
    if isinstance(proc, KthBestOfN):
        # the k-th best of n is the j-th smallest, j = n - k + 1: P(X_(j) <= F) = P(Bin(n, F) >= j);
        # its density is the Beta(j, n - j + 1) density
        j = proc.n - proc.k + 1
        return stats.binom.sf(j - 1, proc.n, F), stats.beta.pdf(F, j, proc.n - j + 1)
    raise TypeError(proc)


@pytest.mark.parametrize("proc", [p for p in PROCEDURES if not isinstance(p, CdfMap)], ids=IDS[:-1])
def test_cdf_map_matches_closed_form(proc):
    G, dG = closed_form(proc, U)
    np.testing.assert_allclose(proc.cdf_map(U), G, rtol=1e-12, atol=1e-14)
    inner = (U > 0) & (U < 1)  # scipy's Beta pdf is singular-valued at 0/1 for j=1 or j=n
    np.testing.assert_allclose(proc.cdf_map_derivative(U)[inner], dG[inner], rtol=1e-10, atol=1e-12)


def test_specific_values():
    assert BestOfN(4).cdf_map(0.5) == 0.0625
    assert WorstOfN(4).cdf_map(0.5) == 1 - 0.0625
    assert KthBestOfN(2, 3).cdf_map(0.5) == pytest.approx(0.5)  # the median of 3
    assert KthBestOfN(2, 3).cdf_map_derivative(0.5) == pytest.approx(1.5)
    assert BestOfN(3).cdf_map_derivative(0.5) == 0.75


@pytest.mark.parametrize("proc", PROCEDURES, ids=IDS)
def test_endpoints_monotone_and_derivative_matches_finite_differences(proc):
    assert proc.cdf_map(np.array([0.0]))[0] == pytest.approx(0.0, abs=1e-15)
    assert proc.cdf_map(np.array([1.0]))[0] == pytest.approx(1.0, abs=1e-15)
    G = proc.cdf_map(U)
    assert np.all(np.diff(G) >= -1e-15)
    x = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    fd = (proc.cdf_map(x + h) - proc.cdf_map(x - h)) / (2 * h)
    np.testing.assert_allclose(proc.cdf_map_derivative(x), fd, rtol=1e-6, atol=1e-6)
    # and the derivative integrates back to G (catches a derivative off by a constant factor)
    fine = np.linspace(0, 1, 20001)
    dg = proc.cdf_map_derivative(fine) * np.ones_like(fine)
    cum = np.concatenate([[0.0], np.cumsum((dg[1:] + dg[:-1]) / 2 * np.diff(fine))])
    np.testing.assert_allclose(cum, proc.cdf_map(fine), atol=1e-6)


@pytest.mark.parametrize("proc", PROCEDURES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cdf_map_on_torch_matches_numpy(proc, dtype):
    t = torch.tensor(U, dtype=dtype)
    g, dg = proc.cdf_map(t), proc.cdf_map_derivative(t)
    assert isinstance(g, torch.Tensor) and g.dtype == dtype and dg.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(g.double().numpy(), proc.cdf_map(U), rtol=tol, atol=tol)
    np.testing.assert_allclose(dg.double().numpy(), proc.cdf_map_derivative(U), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_kth_extremes_are_best_and_worst_of_n(n):
    for f in ("cdf_map", "cdf_map_derivative"):
        np.testing.assert_allclose(
            getattr(KthBestOfN(1, n), f)(U), getattr(BestOfN(n), f)(U), rtol=1e-12, atol=1e-13
        )
        np.testing.assert_allclose(
            getattr(KthBestOfN(n, n), f)(U), getattr(WorstOfN(n), f)(U), rtol=1e-12, atol=1e-13
        )


@pytest.mark.parametrize(("k", "n"), [(1, 4), (2, 4), (3, 4), (4, 4), (2, 5), (4, 7)])
def test_kth_cdf_is_empirical_cdf_of_kth_best_uniform(k, n):
    gen = np.random.default_rng(100 * k + n)
    samples = np.sort(gen.random((40000, n)), axis=1)[:, n - k]  # k-th best = (n-k)-th ascending
    x = np.linspace(0, 1, 41)
    empirical = (samples[:, None] <= x[None, :]).mean(axis=0)
    np.testing.assert_allclose(KthBestOfN(k, n).cdf_map(x), empirical, atol=0.01)
    # the same check distinguishes neighbouring k (it can fail)
    if k < n:
        assert np.max(np.abs(KthBestOfN(k + 1, n).cdf_map(x) - empirical)) > 0.05


def test_sample_derivative_has_input_shape():
    assert Sample().cdf_map_derivative(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert Sample().cdf_map_derivative(torch.zeros(2, 2)).shape == (2, 2)


# -------------------------------------------------------------------------------------- CdfMap


def test_cdf_map_accepts_valid_and_rejects_invalid_maps():
    ok = CdfMap(lambda F: F**2, lambda F: 2 * F, "square")
    assert str(ok) == "square" and ok.cdf_map(0.5) == 0.25
    with pytest.raises(ValueError, match=r"G\(1\)=1"):
        CdfMap(lambda F: 0.9 * F, lambda F: 0.9 + 0 * F, "short")
    with pytest.raises(ValueError, match=r"G\(0\)=0"):
        CdfMap(lambda F: 0.1 + 0.9 * F, lambda F: 0.9 + 0 * F, "offset")
    with pytest.raises(ValueError, match="increasing"):  # G(0)=0, G(1)=1 but dips in between
        CdfMap(
            lambda F: F + 0.2 * np.sin(2 * np.pi * F),
            lambda F: 1 + 0.4 * np.pi * np.cos(2 * np.pi * F),
            "wiggle",
        )
    with pytest.raises(ValueError, match=r"bad.*increasing"):  # G fine, G' negative somewhere
        CdfMap(lambda F: F, lambda F: 1 - 2 * (F > 0.5), "bad")


def test_cdf_map_select_raises():
    proc = CdfMap(lambda F: F**2, lambda F: 2 * F, "square")
    with pytest.raises(NotImplementedError, match="no sample-level selection"):
        proc.select(torch.randn(2, 4))


# ------------------------------------------------------------------------------------- select


SELECTORS = [Sample(), BestOfN(1), BestOfN(4), WorstOfN(4), KthBestOfN(2, 4), KthBestOfN(3, 5)]


def reference_choice(proc: Procedure, group: list[float]) -> set[int]:
    """All local indices a correct selector may serve (the tied candidates at the target rank)."""
    n = len(group)
    if isinstance(proc, Sample):
        return {0}
    k = {BestOfN: 1, WorstOfN: n}.get(type(proc), getattr(proc, "k", None))
    target = sorted(group, reverse=True)[k - 1]  # the k-th best value
    return {i for i, r in enumerate(group) if r == target}


@FAST
@given(
    st.sampled_from(SELECTORS),
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.data(),
)
def test_select_serves_the_right_rank_in_the_right_group(proc, P, groups, seed, data):
    n = proc.n
    M = n * groups
    # small integers: plenty of ties
    vals = data.draw(st.lists(st.integers(-2, 2), min_size=P * M, max_size=P * M))
    rewards = torch.tensor(vals, dtype=torch.float64).reshape(P, M)
    idx = proc.select(rewards, generator=seed)
    assert idx.shape == (P, groups) and idx.dtype == torch.long
    assert torch.equal(idx // n, torch.arange(groups).expand(P, groups))  # in its own group
    for p in range(P):
        for g in range(groups):
            group = rewards[p, g * n : (g + 1) * n].tolist()
            assert int(idx[p, g]) - g * n in reference_choice(proc, group)
    # deterministic for a fixed seed, also through an explicit generator
    assert torch.equal(idx, proc.select(rewards, generator=seed))
    gen = torch.Generator().manual_seed(seed)
    assert torch.equal(idx, proc.select(rewards, generator=gen))


def test_select_without_ties_exact_values():
    r = torch.tensor([[0.3, 0.9, 0.1, 0.5, 2.0, 1.0, 3.0, 0.0]])
    assert BestOfN(4).select(r).tolist() == [[1, 6]]
    assert WorstOfN(4).select(r).tolist() == [[2, 7]]
    assert KthBestOfN(2, 4).select(r).tolist() == [[3, 4]]
    assert KthBestOfN(3, 4).select(r).tolist() == [[0, 5]]
    assert Sample().select(r).tolist() == [list(range(8))]
    assert BestOfN(2).select(r).tolist() == [[1, 3, 4, 6]]
    # explicit group_size equal to n is accepted
    assert BestOfN(4).select(r, group_size=4).tolist() == [[1, 6]]


def test_sample_select_is_identity():
    r = torch.randn(3, 7)
    assert torch.equal(Sample().select(r), torch.arange(7).expand(3, 7))


@pytest.mark.parametrize(
    ("proc", "group", "tied"),
    [
        (BestOfN(4), [1.0, 3.0, 3.0, 3.0], [1, 2, 3]),
        (BestOfN(4), [2.0, 0.0, 2.0, 1.0], [0, 2]),
        (WorstOfN(4), [0.0, 5.0, 0.0, 0.0], [0, 2, 3]),
        (WorstOfN(3), [7.0, 7.0, 7.0], [0, 1, 2]),
        (KthBestOfN(2, 4), [5.0, 5.0, 5.0, 1.0], [0, 1, 2]),
        (KthBestOfN(3, 4), [4.0, 2.0, 9.0, 2.0], [1, 3]),
    ],
)
def test_ties_broken_uniformly_over_seeds(proc, group, tied):
    r = torch.tensor([group])
    seeds = 1500
    picks = [int(proc.select(r, generator=s)[0, 0]) for s in range(seeds)]
    assert set(picks) == set(tied)
    counts = np.array([picks.count(i) for i in tied])
    assert stats.chisquare(counts).pvalue > 1e-3
    np.testing.assert_allclose(counts / seeds, 1 / len(tied), atol=0.05)


def test_ties_broken_uniformly_across_groups_in_one_call():
    """Every group draws its own permutation: within one call, the tied index is uniform too."""
    n, groups = 4, 6000
    r = torch.tensor([[1.0, 3.0, 3.0, 3.0] * groups])
    local = (BestOfN(n).select(r, generator=0) % n).flatten().numpy()
    counts = np.bincount(local, minlength=n)
    assert counts[0] == 0
    assert stats.chisquare(counts[1:]).pvalue > 1e-3
    # and it does depend on the seed
    assert not torch.equal(BestOfN(n).select(r, generator=0), BestOfN(n).select(r, generator=1))


@pytest.mark.parametrize("proc", [BestOfN(4), WorstOfN(3), KthBestOfN(2, 5)], ids=str)
def test_m_not_a_multiple_of_n(proc):
    M = proc.n + 1
    with pytest.raises(ValueError, match=rf"M={M} must be a positive multiple of n={proc.n}"):
        proc.select(torch.randn(2, M))
    with pytest.raises(ValueError, match="positive multiple"):
        proc.select(torch.randn(2, proc.n - 1))


def test_group_size_mismatch_and_bad_shapes():
    with pytest.raises(ValueError, match=r"group_size=2 does not match procedure bon:4"):
        BestOfN(4).select(torch.randn(2, 8), group_size=2)
    with pytest.raises(ValueError, match=r"group_size=4 does not match procedure sample"):
        Sample().select(torch.randn(2, 8), group_size=4)
    with pytest.raises(ValueError, match="prompts, responses"):
        BestOfN(4).select(torch.randn(8))


# -------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sample", Sample()),
        ("bon:4", BestOfN(4)),
        ("won:8", WorstOfN(8)),
        ("kth:2:4", KthBestOfN(2, 4)),
    ],
)
def test_parse_round_trip(spec, expected):
    proc = parse_procedure(spec)
    assert proc == expected and type(proc) is type(expected)
    assert str(proc) == spec == proc.spec()
    assert parse_procedure(str(proc)) == proc
    assert parse_procedure(proc) is proc
    assert parse_procedure(spec.upper()) == proc


@FAST
@given(st.integers(1, 64), st.data())
def test_parse_round_trip_any_n(n, data):
    k = data.draw(st.integers(1, n))
    for proc in (BestOfN(n), WorstOfN(n), KthBestOfN(k, n)):
        assert parse_procedure(str(proc)) == proc
        assert hash(parse_procedure(str(proc))) == hash(proc)


@pytest.mark.parametrize(
    "spec",
    ["bon", "bon:0", "bon:x", "kth:5:4", "best", "won:-1", "kth:0:4", "kth:2", "", "sample:2"],
)
def test_parse_errors_name_the_spec(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        parse_procedure(spec)


def test_procedures_are_frozen_and_distinct():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BestOfN(4).n = 5  # type: ignore[misc]
    assert BestOfN(4) != WorstOfN(4) and BestOfN(1) != Sample()
    assert len({BestOfN(4), BestOfN(4), WorstOfN(4), KthBestOfN(1, 4)}) == 3
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError):
            BestOfN(bad)  # type: ignore[arg-type]


def test_reference_win_rate_is_one_half_for_every_g():
    """Spec section 3 check: W_T(uniform) = 1 - int_0^1 G(u) G'(u) du = 1/2 for every G."""
    x, w = np.polynomial.legendre.leggauss(64)
    u, w = (x + 1) / 2, w / 2
    for proc in PROCEDURES:
        assert math.isclose(
            1 - np.sum(w * proc.cdf_map(u) * proc.cdf_map_derivative(u)), 0.5, abs_tol=1e-12
        ), proc
