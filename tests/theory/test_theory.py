"""The calibrated-space engine against closed forms, brute-force quadrature and its own optimum."""

import math

import numpy as np
import pytest
from scipy import integrate

from infalign import theory
from infalign.core.procedures import BestOfN, CdfMap, KthBestOfN, Sample, WorstOfN
from infalign.core.transforms import Exp, Identity, Log, NegExp, Tabulated
from infalign.theory import (
    GRID,
    TiltedPolicy,
    best_t,
    beta_for_kl,
    frontier,
    optimal_policy,
    recommend,
    resolve_transform,
)

PROCS = [Sample(), BestOfN(2), BestOfN(4), BestOfN(16), WorstOfN(4), WorstOfN(8), KthBestOfN(2, 4)]


def test_quadrature_integrates_and_accumulates_exactly():
    f = 7 * GRID.nodes**6
    assert GRID.integrate(f) == pytest.approx(1.0, abs=1e-13)
    assert np.allclose(GRID.cumulative(f), GRID.nodes**7, atol=1e-13)
    spike = np.exp(-((1 - GRID.nodes) / 1e-6))  # width 1e-6 at u = 1
    assert GRID.integrate(spike) == pytest.approx(1e-6, rel=1e-9)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_log_transform_is_bon_policy(n):
    """p ∝ u^(N-1) is the BoN_N policy: KL = log N - (N-1)/N, E[U] = N/(N+1)."""
    pol = TiltedPolicy(Log(), 1.0 / (n - 1))
    assert pol.kl() == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-6)
    assert pol.standard_win_rate() == pytest.approx(n / (n + 1), abs=1e-6)
    # F = u^N, so its BoN_N win rate is 1 - N / (N + N^2) = 1 - 1/(N + 1).
    assert pol.win_rate(BestOfN(n)) == pytest.approx(1 - 1 / (n + 1), abs=1e-9)


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0, 10.0, 60.0])
def test_identity_closed_form(lam):
    c = lam / (1 - math.exp(-lam))
    pol = TiltedPolicy(Identity(), 1.0 / lam)
    assert pol.kl() == pytest.approx(c - 1 - lam + math.log(c), abs=1e-6)
    assert pol.standard_win_rate() == pytest.approx(1 / (1 - math.exp(-lam)) - 1 / lam, abs=1e-6)


def test_spec_numbers_for_identity_at_lambda_2():
    pol = TiltedPolicy(Identity(), 0.5)
    assert pol.kl() == pytest.approx(0.151596, abs=1e-6)
    assert pol.standard_win_rate() == pytest.approx(0.656518, abs=1e-6)


@pytest.mark.parametrize("proc", PROCS, ids=str)
def test_reference_wins_half_for_every_procedure(proc):
    ref = TiltedPolicy(Identity(), 1e12)  # p = 1 to 1e-12
    assert ref.kl() == pytest.approx(0.0, abs=1e-12)
    assert ref.win_rate(proc) == pytest.approx(0.5, abs=1e-10)


@pytest.mark.parametrize("proc", PROCS, ids=str)
@pytest.mark.parametrize("tf, beta", [(Exp(6.0), 0.2), (NegExp(5.0), 0.3), (Log(), 0.5)], ids=str)
def test_win_rate_matches_adaptive_quadrature(proc, tf, beta):
    """W_T = 1 - ∫ G(F(u)) G'(u) du, recomputed independently with scipy.quad."""
    z = integrate.quad(lambda u: math.exp(tf(u) / beta), 0, 1, limit=200)[0]

    def F(u):
        return integrate.quad(lambda v: math.exp(tf(v) / beta) / z, 0, u, limit=200)[0]

    def integrand(u):
        return float(proc.cdf_map(F(u)) * proc.cdf_map_derivative(u))

    expected = 1 - integrate.quad(integrand, 0, 1, limit=100, epsabs=1e-10)[0]
    assert TiltedPolicy(tf, beta).win_rate(proc) == pytest.approx(expected, abs=1e-7)


def test_bon_and_won_formulas_of_the_spec():
    pol = TiltedPolicy(Exp(8.0), 0.25)
    u = GRID.nodes
    F = pol.cdf(u)
    for n in (2, 4, 8):
        bon = 1 - n * GRID.integrate(u ** (n - 1) * F**n)
        won = n * GRID.integrate((1 - u) ** (n - 1) * (1 - F) ** n)
        assert pol.win_rate(BestOfN(n)) == pytest.approx(bon, abs=1e-9)
        assert pol.win_rate(WorstOfN(n)) == pytest.approx(won, abs=1e-9)


def test_density_and_cdf_are_consistent():
    pol = TiltedPolicy(Exp(20.0), 0.1)
    u = np.linspace(0, 1, 11)
    assert pol.cdf(0.0) == 0.0 and pol.cdf(1.0) == 1.0
    assert np.all(np.diff(pol.cdf(u)) >= 0)
    for a, b in [(0.2, 0.6), (0.9, 0.99), (0.999, 1.0)]:
        mass = integrate.quad(pol.density, a, b, limit=200, points=[1 - 1e-3])[0]
        assert pol.cdf(b) - pol.cdf(a) == pytest.approx(mass, abs=1e-6)


@pytest.mark.parametrize("tf", [Identity(), Log(), Exp(12.0), NegExp(8.0), Exp(50.0)], ids=str)
@pytest.mark.parametrize("kl", [0.01, 0.5, 3.0])
def test_beta_for_kl_hits_the_target(tf, kl):
    beta = beta_for_kl(tf, kl)
    assert TiltedPolicy(tf, beta).kl() == pytest.approx(kl, rel=1e-8)
    assert TiltedPolicy(tf, beta * 1.1).kl() < kl  # KL decreases in beta


def test_kl_and_win_rate_are_monotone_in_beta():
    betas = np.geomspace(0.01, 10, 12)
    kls = [TiltedPolicy(Exp(10.0), b).kl() for b in betas]
    wins = [TiltedPolicy(Exp(10.0), b).win_rate(BestOfN(4)) for b in betas]
    assert np.all(np.diff(kls) < 0) and np.all(np.diff(wins) < 0)


def test_bon4_at_kl_half_matches_the_spec():
    kl = 0.5
    identity = TiltedPolicy(Identity(), beta_for_kl(Identity(), kl)).win_rate("bon:4")
    t = best_t("exp", "bon:4", kl)
    best_exp = TiltedPolicy(Exp(t), beta_for_kl(Exp(t), kl)).win_rate("bon:4")
    opt = optimal_policy("bon:4", kl=kl)
    assert identity == pytest.approx(0.800, abs=1e-3)
    assert best_exp == pytest.approx(0.873, abs=1e-3)
    assert 10 < t < 15
    assert opt.kl() == pytest.approx(kl, abs=1e-8)
    assert best_exp <= opt.win_rate("bon:4") <= best_exp + 0.002


def test_best_t_is_a_maximum():
    kl = 0.8
    t = best_t(Exp, BestOfN(4), kl)

    def win(tt):
        return TiltedPolicy(Exp(tt), beta_for_kl(Exp(tt), kl)).win_rate(BestOfN(4))

    assert win(t) >= win(t * 0.8) and win(t) >= win(t * 1.25)


@pytest.mark.parametrize("kl", [0.1, 0.5, 1.5])
def test_optimum_for_sampling_is_identity(kl):
    opt = optimal_policy(Sample(), kl=kl)
    ident = TiltedPolicy(Identity(), beta_for_kl(Identity(), kl))
    assert np.allclose(opt.logp, ident.logp, atol=1e-7)
    assert opt.win_rate() == pytest.approx(ident.win_rate(), abs=1e-9)
    assert opt.beta == pytest.approx(ident.beta, rel=1e-6)


@pytest.mark.parametrize(
    "proc", [BestOfN(2), BestOfN(4), BestOfN(8), WorstOfN(4), KthBestOfN(2, 4)], ids=str
)
def test_optimum_is_never_beaten(proc):
    """At equal KL no Exp, NegExp, Identity or Log policy beats the fixed-point optimum."""
    kls = [0.1, 0.5, 1.5]
    rows = frontier(proc, ["identity", "log", "exp:auto", "negexp:auto", "optimal"], kls)
    for kl in kls:
        at = [r for r in rows if abs(r.kl - kl) < 1e-6]
        best = max(r.win_rate for r in at if r.transform == "optimal")
        others = [r.win_rate for r in at if r.transform != "optimal"]
        assert others and max(others) <= best + 1e-7, (kl, max(others), best)


def test_optimal_transform_carries_the_policy():
    opt = optimal_policy(BestOfN(4), kl=1.0)
    assert isinstance(opt.transform, Tabulated)
    assert opt.transform(0.0) == 0.0 and opt.transform(1.0) == 1.0
    again = TiltedPolicy(opt.transform, opt.beta)
    assert again.kl() == pytest.approx(1.0, abs=1e-8)
    assert again.win_rate(BestOfN(4)) == pytest.approx(opt.win_rate(BestOfN(4)), abs=1e-9)
    # The fixed point: p* ∝ exp(Phi_{F*} / lagrange_beta) with the spec's Phi.
    by_beta = optimal_policy(BestOfN(4), beta=opt.lagrange_beta)
    assert by_beta.kl() == pytest.approx(1.0, abs=1e-6)


def test_bon_optimum_shape_near_the_reference():
    """For large beta the BoN_N optimum's Phi is v^(2N-1) (spec section 4)."""
    opt = optimal_policy(BestOfN(3), kl=1e-6)
    v = np.array([0.3, 0.6, 0.9])
    assert np.allclose(opt.transform(v), v**5, atol=5e-4)


def test_custom_cdf_map_equals_builtin():
    custom = CdfMap(lambda F: F**3, lambda F: 3 * F**2, "cube")
    pol = TiltedPolicy(Exp(5.0), 0.3)
    assert pol.win_rate(custom) == pytest.approx(pol.win_rate(BestOfN(3)), abs=1e-12)


def test_recommend_picks_the_family_of_the_procedure():
    rec = recommend("bon:4", 0.5)
    assert rec.transform.startswith("exp:") and rec.win_rate == pytest.approx(0.873, abs=1e-3)
    assert rec.identity_win_rate == pytest.approx(0.800, abs=1e-3)
    assert rec.win_rate <= rec.optimal_win_rate <= rec.win_rate + 0.002
    assert TiltedPolicy(Exp(rec.t), rec.beta).kl() == pytest.approx(0.5, abs=1e-8)
    assert recommend("won:4", 0.5).transform.startswith("negexp:")
    assert recommend("sample", 0.5).transform == "identity"


def test_resolve_transform():
    assert resolve_transform("identity", "bon:4", 0.5) == Identity()
    assert isinstance(resolve_transform("exp:auto", "bon:4", 0.5), Exp)
    assert isinstance(resolve_transform("negexp:auto", "won:4", 0.5), NegExp)
    assert isinstance(resolve_transform("optimal", "bon:4", 0.5), Tabulated)


def test_frontier_rows_and_unreachable_targets():
    rows = frontier("bon:4", ["identity", "exp:auto"], [0.2, 1.0])
    assert [(r.transform, round(r.kl, 6)) for r in rows] == [
        ("identity", 0.2),
        ("identity", 1.0),
        ("exp:auto", 0.2),
        ("exp:auto", 1.0),
    ]
    assert all(0.5 < r.win_rate < 1 and r.beta > 0 for r in rows)
    # negexp with a huge t saturates: KL 3 is out of its reach, so no row for it.
    assert frontier("bon:4", ["negexp:400"], [3.0]) == []
    with pytest.raises(ValueError, match="cannot reach"):
        beta_for_kl(NegExp(400.0), 3.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 100.0])
def test_bad_kl_is_an_error(bad):
    with pytest.raises(ValueError, match="kl"):
        beta_for_kl(Identity(), bad)


def test_bad_arguments():
    with pytest.raises(ValueError):
        TiltedPolicy(Identity(), 0.0)
    with pytest.raises(ValueError):
        best_t("log", "bon:4", 0.5)
    with pytest.raises(ValueError):
        optimal_policy("bon:4")
    with pytest.raises(ValueError):
        optimal_policy("bon:4", kl=0.5, beta=0.1)
    with pytest.raises(ValueError):
        theory.frontier("bon:x", ["identity"], [0.5])


def test_optimum_out_of_reach_is_a_clear_error_and_skipped_in_frontier():
    rows = frontier("won:4", ["optimal"], [1.0, 6.0])
    assert [round(r.kl, 6) for r in rows] == [1.0]
    with pytest.raises(ValueError, match="out of reach"):
        optimal_policy("won:4", kl=6.0)


def test_pinned_kl_suffix_resolves_at_that_kl() -> None:
    from infalign.theory import best_t, split_target

    assert split_target("exp:auto@0.3") == ("exp:auto", 0.3)
    assert split_target("identity") == ("identity", None)
    from infalign.theory import needs_theory

    assert needs_theory("exp:auto@0.3") and needs_theory("optimal") and needs_theory("negexp:auto")
    assert not needs_theory("identity") and not needs_theory("exp:3") and not needs_theory("raw")
    pinned = resolve_transform("exp:auto@0.3", "bon:4", 2.0)
    assert isinstance(pinned, Exp) and pinned.t == best_t(Exp, "bon:4", 0.3)
    assert pinned != resolve_transform("exp:auto", "bon:4", 2.0)
    opt = resolve_transform("optimal@1", "won:4", 0.1)
    assert opt == resolve_transform("optimal", "won:4", 1.0)
    for bad, why in [
        ("identity@0.3", "only follows"),
        ("exp:auto@x", "not a number"),
        ("exp:auto@0", "must be in"),
        ("optimal@99", "must be in"),
    ]:
        with pytest.raises(ValueError, match=why):
            split_target(bad)
