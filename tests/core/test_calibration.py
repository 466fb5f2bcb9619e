"""EmpiricalCalibration (spec section 2): the tie-aware per-prompt quantile of a reward among the
reference rewards, C_hat = (#{s_k < r} + 1/2 #{s_k = r}) / K_p, and its mid-rank smoothing."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from infalign.core.calibration import EmpiricalCalibration

FAST = settings(max_examples=60, deadline=None)


def brute_force(ref: np.ndarray, queries: np.ndarray, smoothed: bool = False) -> np.ndarray:
    """Python loops over (p, m, k): (#less + 0.5 #equal) / K_p over the finite references."""
    P, M = queries.shape
    out = np.empty((P, M))
    for p in range(P):
        finite = [float(s) for s in ref[p] if not math.isnan(s)]
        K = len(finite)
        for m in range(M):
            r = float(queries[p, m])
            less = equal = 0
            for s in finite:
                if s < r:
                    less += 1
                elif s == r:
                    equal += 1
            c = (less + 0.5 * equal) / K
            out[p, m] = (K * c + 0.5) / (K + 1) if smoothed else c
    return out


@st.composite
def tied_problems(draw):
    """Small-integer rewards (many ties), NaN-missing reference entries (prompts with different K)."""
    P = draw(st.integers(1, 5))
    K = draw(st.integers(2, 12))
    M = draw(st.integers(1, 8))
    ref = draw(hnp.arrays(np.float64, (P, K), elements=st.integers(-3, 3).map(float)))
    missing = draw(hnp.arrays(np.bool_, (P, K)))
    for p in range(P):  # keep >= 2 finite entries per prompt
        keep = draw(st.permutations(range(K)))[:2]
        missing[p, list(keep)] = False
    ref[missing] = np.nan
    queries = draw(hnp.arrays(np.float64, (P, M), elements=st.integers(-4, 4).map(float)))
    return ref, queries


@FAST
@given(tied_problems(), st.booleans())
def test_matches_brute_force_with_ties_and_missing(problem, smoothed):
    ref, queries = problem
    cal = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=smoothed)
    got = cal(torch.from_numpy(queries))
    assert got.dtype == torch.float64
    assert got.shape == queries.shape
    np.testing.assert_allclose(got.numpy(), brute_force(ref, queries, smoothed), rtol=0, atol=1e-15)


def test_brute_force_fixed_example_with_missing():
    """A hand-checked case: prompt 1 has K=3 (one missing), ties count 1/2."""
    ref = torch.tensor([[1.0, 2.0, 2.0, 3.0], [5.0, float("nan"), 5.0, 7.0]])
    q = torch.tensor([[2.0, 0.0, 3.0], [5.0, 8.0, 6.0]])
    cal = EmpiricalCalibration.fit(ref)
    expected = torch.tensor([[2 / 4, 0.0, 3.5 / 4], [1 / 3, 1.0, 2 / 3]], dtype=torch.float64)
    torch.testing.assert_close(cal(q), expected, rtol=0, atol=1e-15)
    smooth = EmpiricalCalibration.fit(ref, smoothed=True)
    K = torch.tensor([[4.0], [3.0]], dtype=torch.float64)
    torch.testing.assert_close(smooth(q), (K * expected + 0.5) / (K + 1), rtol=0, atol=1e-15)
    assert cal.counts.tolist() == [4, 3]


def _uniformity_pvalue(shift: float) -> float:
    """Pool C_hat of fresh draws from each prompt's reference distribution (shifted by ``shift``
    times the prompt's scale) and KS-test them against U(0, 1)."""
    gen = np.random.default_rng(1234)
    P, K, M = 40, 2000, 250  # M << K keeps the correlation through the shared reference small
    h = P // 2
    loc = gen.normal(0.0, 5.0, size=(P, 1))
    scale = gen.uniform(0.1, 3.0, size=(P, 1))

    def draw(n: int) -> np.ndarray:
        # a different family for each half of the prompts: calibration is per prompt
        z = np.concatenate([gen.standard_normal((h, n)), gen.standard_exponential((P - h, n))])
        return loc + scale * z

    ref, fresh = draw(K), draw(M) + shift * scale
    c = EmpiricalCalibration.fit(torch.from_numpy(ref))(torch.from_numpy(fresh)).numpy().ravel()
    assert np.all((c >= 0) & (c <= 1))
    return float(stats.kstest(c, "uniform").pvalue)


def test_fresh_reference_samples_are_uniform():
    assert _uniformity_pvalue(0.0) > 0.01


def test_uniformity_test_detects_a_shifted_distribution():
    assert _uniformity_pvalue(0.2) < 1e-6


def _midrank_cells(ref: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    K = ref.shape[1]
    c = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=True)(torch.from_numpy(fresh))
    j = np.rint(c.numpy() * (K + 1) - 0.5).astype(int).ravel()
    np.testing.assert_allclose(c.numpy().ravel(), (j + 0.5) / (K + 1), rtol=0, atol=1e-12)
    return np.bincount(j, minlength=K + 1)


def test_small_k_fresh_samples_are_discrete_uniform():
    """At small K the resolution 1/K matters: with continuous rewards a fresh draw's rank is uniform
    on {0..K}, so smoothed C_hat is uniform on the K+1 mid-points (j + 1/2)/(K + 1): chi-square."""
    gen = np.random.default_rng(7)
    # one fresh draw per prompt: draws sharing a reference are correlated (over-dispersed cells)
    P, K, M = 20000, 9, 1
    scale = gen.uniform(0.5, 2.0, (P, 1))
    ref = scale * gen.standard_normal((P, K))
    fresh = scale * gen.standard_normal((P, M))
    counts = _midrank_cells(ref, fresh)
    assert counts.size == K + 1
    assert stats.chisquare(counts).pvalue > 0.01
    assert stats.chisquare(_midrank_cells(ref, fresh + 0.3 * scale)).pvalue < 1e-6


@pytest.mark.parametrize("family", ["cubic", "exp"])
@pytest.mark.parametrize("smoothed", [False, True])
def test_invariant_under_strictly_increasing_per_prompt_maps(family, smoothed):
    gen = np.random.default_rng(3)
    P, K, M = 30, 64, 40
    # continuous rewards plus a block of small-integer ties
    ref = np.concatenate([gen.standard_normal((P, K // 2)), gen.integers(-2, 3, (P, K // 2))], 1)
    q = np.concatenate([gen.standard_normal((P, M // 2)), gen.integers(-3, 4, (P, M // 2))], 1)
    ref[0, :5] = np.nan  # a prompt with fewer references
    q[:, 0] = ref[:, -1]  # exact ties with a reference entry
    if family == "cubic":
        a, b = gen.uniform(0.1, 10, (P, 1)), gen.uniform(-5, 5, (P, 1))

        def f(x):
            return a * (x**3 + x) + b
    else:
        c, d = gen.uniform(0.1, 2, (P, 1)), gen.uniform(-5, 5, (P, 1))

        def f(x):
            return np.exp(c * x) + d

    base = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=smoothed)
    mapped = EmpiricalCalibration.fit(torch.from_numpy(f(ref)), smoothed=smoothed)
    before = base(torch.from_numpy(q))
    after = mapped(torch.from_numpy(f(q)))
    assert torch.equal(before, after)
    # and the invariance is not vacuous: a decreasing map changes the values
    flipped = EmpiricalCalibration.fit(torch.from_numpy(-ref), smoothed=smoothed)(
        torch.from_numpy(-q)
    )
    assert not torch.equal(before, flipped)


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def ref_and_queries(draw, elements=finite_floats):
    K = draw(st.integers(2, 20))
    ref = draw(hnp.arrays(np.float64, (1, K), elements=elements))
    q = draw(hnp.arrays(np.float64, (1, draw(st.integers(1, 20))), elements=elements))
    return ref, q


@FAST
@given(ref_and_queries(), st.booleans())
def test_values_lie_in_unit_interval(problem, smoothed):
    ref, q = problem
    c = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=smoothed)(torch.from_numpy(q))
    assert torch.all((c >= 0) & (c <= 1))
    if smoothed:
        assert torch.all((c > 0) & (c < 1))
        K = ref.shape[1]
        assert torch.all(c >= 0.5 / (K + 1)) and torch.all(c <= 1 - 0.5 / (K + 1))


@FAST
@given(ref_and_queries(), st.booleans())
def test_monotone_in_query_reward(problem, smoothed):
    ref, q = problem
    q = np.sort(q, axis=1)
    c = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=smoothed)(torch.from_numpy(q))
    assert torch.all(torch.diff(c, dim=1) >= 0)


@FAST
@given(finite_floats, st.integers(2, 50), st.booleans())
def test_query_equal_to_every_reference_is_one_half(value, K, smoothed):
    ref = torch.full((1, K), value, dtype=torch.float64)
    c = EmpiricalCalibration.fit(ref, smoothed=smoothed)(
        torch.tensor([[value]], dtype=torch.float64)
    )
    assert c.item() == 0.5  # smoothed: (K/2 + 1/2)/(K + 1) = 1/2 exactly too


@FAST
@given(
    st.integers(0, 10),
    st.integers(1, 10),
    st.integers(0, 10),
    finite_floats.filter(lambda x: abs(x) < 1e300),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_ties_count_one_half(n_less, n_equal, n_greater, r, rnd, smoothed):
    K = n_less + n_equal + n_greater
    assume(K >= 2)
    below = r - max(1.0, abs(r)) * 0.5
    above = r + max(1.0, abs(r)) * 0.5
    vals = [below] * n_less + [r] * n_equal + [above] * n_greater
    rnd.shuffle(vals)
    cal = EmpiricalCalibration.fit(torch.tensor([vals], dtype=torch.float64), smoothed=smoothed)
    c = cal(torch.tensor([[r]], dtype=torch.float64)).item()
    expected = (n_less + 0.5 * n_equal) / K
    if smoothed:
        expected = (K * expected + 0.5) / (K + 1)
    assert c == pytest.approx(expected, rel=0, abs=1e-15)


# ---------------------------------------------------------------------------------------- errors


def test_non_finite_query_names_the_prompt():
    cal = EmpiricalCalibration.fit(torch.randn(4, 8, dtype=torch.float64))
    for bad in (float("nan"), float("inf"), float("-inf")):
        q = torch.zeros(4, 3, dtype=torch.float64)
        q[2, 1] = bad
        with pytest.raises(ValueError, match=r"rewards\[2, 1\].*not finite.*prompt 2"):
            cal(q)


def test_prompt_with_fewer_than_two_finite_references_is_named():
    ref = torch.randn(5, 6, dtype=torch.float64)
    ref[3, 1:] = float("nan")  # one finite entry
    with pytest.raises(ValueError, match=r"prompt 3 has 1 finite reference rewards"):
        EmpiricalCalibration.fit(ref)
    ref[3, :] = float("nan")
    with pytest.raises(ValueError, match=r"prompt 3 has 0 finite"):
        EmpiricalCalibration.fit(ref)
    ref = torch.randn(2, 1, dtype=torch.float64)  # K = 1 everywhere
    with pytest.raises(ValueError, match=r"prompt 0 has 1 finite"):
        EmpiricalCalibration.fit(ref)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_reference_is_rejected(bad):
    ref = torch.randn(3, 5, dtype=torch.float64)
    ref[1, 4] = bad
    with pytest.raises(ValueError, match=r"reference_rewards\[1, 4\].*infinite \(prompt 1\)"):
        EmpiricalCalibration.fit(ref)


def test_prompt_count_mismatch():
    cal = EmpiricalCalibration.fit(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"3 prompts .* fitted on 4"):
        cal(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"5 prompts .* fitted on 4"):
        cal(torch.randn(5, 2))


def test_one_dimensional_inputs_are_rejected():
    with pytest.raises(ValueError, match=re.escape("reference_rewards must be a 2-D")):
        EmpiricalCalibration.fit(torch.randn(8))
    with pytest.raises(ValueError, match=re.escape("reference_rewards must be a 2-D")):
        EmpiricalCalibration.fit(torch.randn(2, 3, 4))
    cal = EmpiricalCalibration.fit(torch.randn(1, 8))
    with pytest.raises(ValueError, match=re.escape("rewards must be a 2-D")):
        cal(torch.randn(8))


def test_no_prompts_is_rejected():
    with pytest.raises(ValueError, match="no prompts"):
        EmpiricalCalibration.fit(torch.empty(0, 4))


# ---------------------------------------------------------------------------------------- dtypes


def test_float32_references_with_float64_queries():
    gen = np.random.default_rng(11)
    ref32 = torch.from_numpy(gen.integers(-3, 4, (6, 16)).astype(np.float32) * np.float32(0.1))
    # queries: the float32 reference values themselves (exact ties after promotion) and others
    q64 = torch.cat([ref32[:, :5].to(torch.float64), torch.randn(6, 5, dtype=torch.float64)], 1)
    cal = EmpiricalCalibration.fit(ref32)
    assert cal.sorted_rewards.dtype == torch.float32
    got = cal(q64)
    assert got.dtype == torch.float64
    expected = brute_force(ref32.to(torch.float64).numpy(), q64.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-15)
    # the other way round: float64 references, float32 queries
    cal64 = EmpiricalCalibration.fit(ref32.to(torch.float64))
    np.testing.assert_allclose(
        cal64(q64.to(torch.float32)).numpy(),
        brute_force(ref32.double().numpy(), q64.float().double().numpy()),
        rtol=0,
        atol=1e-15,
    )


def test_integer_and_list_inputs_are_calibrated_in_float64():
    ref = [[0.1, 0.1 + 1e-12, 0.3], [1.0, 2.0, 3.0]]
    q = torch.tensor([[0.1 + 1e-12, 0.2], [2.0, 0.0]], dtype=torch.float64)
    got = EmpiricalCalibration.fit(ref)(q)
    np.testing.assert_allclose(got.numpy(), brute_force(np.array(ref), q.numpy()), atol=1e-15)
    ints = EmpiricalCalibration.fit(torch.tensor([[1, 2, 2, 3]]))
    assert ints(torch.tensor([[2]])).item() == 0.5
