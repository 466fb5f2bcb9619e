"""Evaluation statistics: all-subsets win rate vs brute force and closed forms, bootstrap, KL."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from infalign.core.evaluation import (
    KLEstimate,
    WinRate,
    bootstrap_interval,
    inference_win_rate,
    kl_estimate,
    subset_weights,
)
from infalign.core.procedures import (
    BestOfN,
    CdfMap,
    KthBestOfN,
    Procedure,
    Sample,
    WorstOfN,
    parse_procedure,
)

SPECS = ["sample", "bon:2", "bon:3", "won:3", "kth:2:3"]


def brute_win(a: list[float], b: list[float], spec: str) -> float:
    """Average over every n-subset of each side of 1{served a > served b} + 1/2 1{equal}."""
    proc = parse_procedure(spec)
    n, r = proc.n, proc.rank
    served_a = [sorted(s)[r] for s in itertools.combinations(a, n)]
    served_b = [sorted(s)[r] for s in itertools.combinations(b, n)]
    total = sum((x > y) + 0.5 * (x == y) for x in served_a for y in served_b)
    return total / (len(served_a) * len(served_b))


def pairwise_win(a: torch.Tensor, b: torch.Tensor, spec: str) -> torch.Tensor:
    """O(M M') oracle: sum_i sum_k w_i w'_k (1{a_i > b_k} + 1/2 1{a_i = b_k}) on sorted rows."""
    proc = parse_procedure(spec)
    a, b = torch.sort(a.double(), 1).values, torch.sort(b.double(), 1).values
    w = subset_weights(a.shape[1], proc.n, proc.rank)
    wr = subset_weights(b.shape[1], proc.n, proc.rank)
    cmp = (a[:, :, None] > b[:, None, :]).double() + 0.5 * (a[:, :, None] == b[:, None, :]).double()
    return torch.einsum("i,pik,k->p", w, cmp, wr)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("m,mr", [(3, 3), (4, 6), (6, 4), (7, 5)])
def test_all_subsets_equals_brute_force_with_ties(spec: str, m: int, mr: int) -> None:
    gen = torch.Generator().manual_seed(1000 * m + mr)
    P = 6
    a = torch.randint(0, 4, (P, m), generator=gen).double()  # few values: many ties
    b = torch.randint(0, 4, (P, mr), generator=gen).double()
    res = inference_win_rate(a, b, spec, bootstrap=0)
    expect = torch.tensor(
        [brute_win(a[p].tolist(), b[p].tolist(), spec) for p in range(P)], dtype=torch.float64
    )
    torch.testing.assert_close(res.per_prompt, expect.double(), rtol=0, atol=1e-12)
    assert res.mean == pytest.approx(float(expect.mean()), abs=1e-12)
    # and the O(M M') weighted-pairwise oracle agrees
    torch.testing.assert_close(pairwise_win(a, b, spec), expect.double(), rtol=0, atol=1e-12)


def test_group_of_exactly_n_is_the_plain_comparison() -> None:
    """With M = M' = n there is one subset per side: compare the served rewards directly."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 5, (50, 4), generator=gen).float()
    b = torch.randint(0, 5, (50, 4), generator=gen).float()
    for proc in [BestOfN(4), WorstOfN(4), KthBestOfN(2, 4), KthBestOfN(3, 4)]:
        sa = a.gather(1, proc.select(a, generator=0)).squeeze(1)
        sb = b.gather(1, proc.select(b, generator=1)).squeeze(1)
        expect = (sa > sb).double() + 0.5 * (sa == sb).double()
        res = inference_win_rate(a, b, proc, bootstrap=0)
        torch.testing.assert_close(res.per_prompt, expect, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- subset weights


@pytest.mark.parametrize("m,n", [(1, 1), (5, 1), (5, 2), (6, 3), (7, 4), (5, 5)])
def test_subset_weights_match_enumeration(m: int, n: int) -> None:
    subsets = list(itertools.combinations(range(m), n))  # sorted positions, ascending
    for rank in range(n):
        freq = np.zeros(m)
        for s in subsets:
            freq[s[rank]] += 1
        w = subset_weights(m, n, rank)
        assert w.dtype == torch.float64 and w.shape == (m,)
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-14)
        np.testing.assert_allclose(w.numpy(), freq / len(subsets), rtol=0, atol=1e-14)


def test_subset_weights_named_procedures() -> None:
    m, n = 9, 3
    i = np.arange(1, m + 1)
    bon = np.array([math.comb(k - 1, n - 1) for k in i]) / math.comb(m, n)
    won = np.array([math.comb(m - k, n - 1) for k in i]) / math.comb(m, n)
    np.testing.assert_allclose(subset_weights(m, n, BestOfN(n).rank).numpy(), bon, atol=1e-15)
    np.testing.assert_allclose(subset_weights(m, n, WorstOfN(n).rank).numpy(), won, atol=1e-15)
    np.testing.assert_allclose(subset_weights(m, 1, Sample().rank).numpy(), np.full(m, 1 / m))


@pytest.mark.parametrize("rank", [0, 31, 63])
def test_subset_weights_accurate_at_large_m(rank: int) -> None:
    m, n = 4096, 64
    j = rank + 1
    denom = math.comb(m, n)
    exact = np.array(
        [math.comb(i - 1, j - 1) * math.comb(m - i, n - j) / denom for i in range(1, m + 1)]
    )
    w = subset_weights(m, n, rank).numpy()
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    big = exact > 1e-200
    np.testing.assert_allclose(w[big], exact[big], rtol=1e-9)
    assert np.all(w[~big] < 1e-190)


def test_subset_weights_errors() -> None:
    with pytest.raises(ValueError, match="m >= n"):
        subset_weights(3, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        subset_weights(5, 2, 2)


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("spec", [*SPECS, "bon:8", "won:16"])
def test_identical_rewards_give_one_half(spec: str) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randint(0, 6, (20, 32), generator=gen).double()
    res = inference_win_rate(a, a.clone(), spec, bootstrap=50)
    torch.testing.assert_close(res.per_prompt, torch.full((20,), 0.5, dtype=torch.float64))
    assert res.mean == pytest.approx(0.5, abs=1e-12)
    assert res.low == pytest.approx(0.5, abs=1e-12) and res.high == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_swapping_sides_gives_complement(spec: str) -> None:
    gen = torch.Generator().manual_seed(11)
    a = torch.randint(0, 5, (30, 12), generator=gen).float()
    b = torch.randn(30, 9, generator=gen).round()
    ab = inference_win_rate(a, b, spec, bootstrap=0).per_prompt
    ba = inference_win_rate(b, a, spec, bootstrap=0).per_prompt
    torch.testing.assert_close(ab + ba, torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-12)


def test_invariant_to_increasing_map_and_sample_order() -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = torch.rand(10, 16, generator=gen), torch.rand(10, 16, generator=gen)
    base = inference_win_rate(a, b, "bon:4", bootstrap=0).per_prompt
    perm = torch.randperm(16, generator=gen)
    moved = inference_win_rate(torch.exp(3 * a[:, perm]), torch.exp(3 * b), "bon:4", bootstrap=0)
    torch.testing.assert_close(moved.per_prompt, base, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- closed form


def calibrated_win(proc: Procedure, F: Callable[[float], float]) -> float:
    """W_T = 1 - int_0^1 G(F(u)) G'(u) du for a continuous policy CDF F vs Uniform reference."""
    val, _ = integrate.quad(
        lambda u: proc.cdf_map(F(u)) * proc.cdf_map_derivative(u), 0, 1, limit=200
    )
    return 1.0 - val


@pytest.mark.parametrize("spec", ["sample", "bon:4", "won:3", "kth:2:4", "bon:16"])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_matches_calibrated_space_closed_form(spec: str, alpha: float) -> None:
    """Policy ~ Beta(alpha, 1) (F(u) = u^alpha) vs reference ~ Uniform(0, 1)."""
    proc = parse_procedure(spec)
    truth = calibrated_win(proc, lambda u: u**alpha)
    if isinstance(proc, BestOfN):  # BoN_n: 1 - n int u^(n-1) u^(alpha n) du = alpha / (1 + alpha)
        assert truth == pytest.approx(alpha / (1 + alpha), abs=1e-10)
    gen = torch.Generator().manual_seed(int(100 * alpha) + proc.n)
    P, M = 2000, 32
    a = torch.rand(P, M, generator=gen, dtype=torch.float64) ** (1 / alpha)
    b = torch.rand(P, M, generator=gen, dtype=torch.float64)
    res = inference_win_rate(a, b, proc, bootstrap=0)
    assert abs(res.mean - truth) < 4 * res.stderr, (res.mean, truth, res.stderr)
    assert res.stderr < 0.01


def test_bootstrap_coverage() -> None:
    """Heterogeneous prompts with known mean truth: 95% intervals cover it in ~95% of 300 reps."""
    alphas = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    truth = float((alphas / (1 + alphas)).mean())  # BoN_n win of Beta(alpha, 1) vs U(0, 1)
    reps, P, M = 300, 100, 8
    gen = torch.Generator().manual_seed(2024)
    covered, widths = 0, []
    for r in range(reps):
        al = alphas[torch.randint(0, 4, (P, 1), generator=gen)]
        a = torch.rand(P, M, generator=gen, dtype=torch.float64) ** (1 / al)
        b = torch.rand(P, M, generator=gen, dtype=torch.float64)
        res = inference_win_rate(a, b, "bon:2", bootstrap=400, seed=r)
        covered += res.low <= truth <= res.high
        widths.append(res.high - res.low)
        assert res.low < res.mean < res.high
    assert 0.90 * reps <= covered <= 0.99 * reps, covered  # 278 of 300 with these seeds
    # the percentile interval has about the normal width 2 * 1.96 * stderr
    assert np.mean(widths) == pytest.approx(2 * 1.96 * res.stderr, rel=0.25)


def test_bootstrap_interval_reproducible_and_normal_fallback() -> None:
    x = torch.rand(500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert bootstrap_interval(x, seed=3) == bootstrap_interval(x, seed=3)
    assert bootstrap_interval(x, seed=3) != bootstrap_interval(x, seed=4)
    lo, hi = bootstrap_interval(x, 0.9, bootstrap=0)
    half = 1.6448536269514722 * float(x.std()) / math.sqrt(500)
    assert (lo, hi) == pytest.approx((float(x.mean()) - half, float(x.mean()) + half))
    blo, bhi = bootstrap_interval(x, 0.9, bootstrap=2000)
    assert (blo, bhi) == pytest.approx((lo, hi), abs=0.15 * half)


def test_win_rate_result_fields() -> None:
    gen = torch.Generator().manual_seed(0)
    res = inference_win_rate(
        torch.rand(40, 8, generator=gen), torch.rand(40, 6, generator=gen), "won:2"
    )
    assert isinstance(res, WinRate)
    assert res.procedure == "won:2" and res.num_prompts == 40
    assert (res.num_policy_samples, res.num_reference_samples) == (8, 6)
    assert res.per_prompt.shape == (40,) and res.confidence == 0.95
    assert res.stderr == pytest.approx(float(res.per_prompt.std()) / math.sqrt(40))
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mean"] == res.mean and "per_prompt" not in d
    assert len(res.to_dict(per_prompt=True)["per_prompt"]) == 40
    one = inference_win_rate(torch.rand(1, 4), torch.rand(1, 4), "bon:2")
    assert math.isnan(one.stderr) and one.low == one.high == one.mean


# ----------------------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from(SPECS),
    st.lists(st.integers(-3, 3), min_size=5, max_size=5),
    st.lists(st.integers(-3, 3), min_size=4, max_size=4),
    st.floats(0.0, 3.0),
)
def test_property_bounded_and_monotone_in_shift(
    p: int, spec: str, a0: list[int], b0: list[int], shift: float
) -> None:
    gen = torch.Generator().manual_seed(p)
    a = torch.tensor(a0, dtype=torch.float64) + torch.randint(-2, 3, (p, 5), generator=gen)
    b = torch.tensor(b0, dtype=torch.float64) + torch.randint(-2, 3, (p, 4), generator=gen)
    base = inference_win_rate(a, b, spec, bootstrap=0).per_prompt
    up = inference_win_rate(a + shift, b, spec, bootstrap=0).per_prompt
    assert bool(((base >= 0) & (base <= 1)).all())
    assert bool((up >= base - 1e-12).all())


# ----------------------------------------------------------------------------- errors


def test_errors() -> None:
    a, b = torch.rand(3, 4), torch.rand(3, 5)
    with pytest.raises(ValueError, match=r"policy_rewards: 4 samples .* n=8"):
        inference_win_rate(a, b, "bon:8")
    with pytest.raises(ValueError, match=r"reference_rewards: 3 samples .* n=4"):
        inference_win_rate(torch.rand(3, 6), torch.rand(3, 3), "won:4")
    bad = a.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="policy_rewards: non-finite value nan at prompt 2"):
        inference_win_rate(bad, b, "bon:2")
    bad_b = b.clone()
    bad_b[1, 0] = float("inf")
    with pytest.raises(ValueError, match="reference_rewards: non-finite value inf at prompt 1"):
        inference_win_rate(a, bad_b, "sample")
    with pytest.raises(ValueError, match=r"3 prompts but reference_rewards has 2"):
        inference_win_rate(a, torch.rand(2, 5), "bon:2")
    with pytest.raises(ValueError, match="must be \\(prompts, samples\\)"):
        inference_win_rate(torch.rand(4), b, "bon:2")
    with pytest.raises(ValueError, match="unknown procedure 'best:4'"):
        inference_win_rate(a, b, "best:4")
    custom = CdfMap(lambda F: F**2, lambda F: 2 * F, label="square")
    with pytest.raises(ValueError, match="square has no sample-level rank"):
        inference_win_rate(a, b, custom)
    with pytest.raises(ValueError, match="confidence"):
        inference_win_rate(a, b, "bon:2", confidence=1.5)
    with pytest.raises(ValueError, match="bootstrap"):
        inference_win_rate(a, b, "bon:2", bootstrap=-1)


# ----------------------------------------------------------------------------- KL


def test_kl_naive_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    lp = rng.normal(-50, 5, size=1000)
    lr = lp - rng.normal(0.3, 1.0, size=1000)
    res = kl_estimate(torch.from_numpy(lp), torch.from_numpy(lr), confidence=0.9)
    d = lp - lr
    assert isinstance(res, KLEstimate) and not res.clustered
    assert res.mean == pytest.approx(d.mean(), rel=1e-12)
    assert res.stderr == pytest.approx(d.std(ddof=1) / np.sqrt(1000), rel=1e-12)
    assert res.high - res.mean == pytest.approx(1.6448536269514722 * res.stderr, rel=1e-9)
    assert res.n == 1000 and res.num_clusters == 1000
    # any shape is flattened when not clustered
    res3 = kl_estimate(
        torch.from_numpy(lp).reshape(10, 10, 10), torch.from_numpy(lr).reshape(10, 10, 10)
    )
    assert res3.stderr == pytest.approx(res.stderr) and not res3.clustered
    assert json.loads(json.dumps(res.to_dict()))["n"] == 1000


def test_kl_clustered_by_prompt() -> None:
    rng = np.random.default_rng(1)
    P, M = 200, 16
    offset = rng.normal(0, 1.0, size=(P, 1))  # per-prompt KL level shared by its samples
    d = 0.5 + offset + rng.normal(0, 0.5, size=(P, M))
    lr = rng.normal(-30, 3, size=(P, M))
    lp = lr + d
    res = kl_estimate(torch.from_numpy(lp), torch.from_numpy(lr))
    naive = kl_estimate(torch.from_numpy(lp), torch.from_numpy(lr), clustered=False)
    assert res.clustered and res.num_clusters == P and res.n == P * M
    assert res.mean == pytest.approx(d.mean(), rel=1e-12) == naive.mean
    assert res.stderr == pytest.approx(d.mean(1).std(ddof=1) / np.sqrt(P), rel=1e-12)
    assert res.stderr > 2 * naive.stderr  # correlated samples: naive stderr is far too small
    assert res.low < 0.5 < res.high


def test_kl_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(torch.zeros(3, 4), torch.zeros(3, 5))
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="policy_logprobs: non-finite value nan at prompt 1"):
        kl_estimate(bad, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="clustered"):
        kl_estimate(torch.zeros(12), torch.zeros(12), clustered=True)
