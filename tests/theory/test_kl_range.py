"""The theory across its whole documented KL range (0, MAX_KL]: the optimum converges at every KL,
every recommendation is consistent with itself, and best t is never a grid edge in disguise."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infalign import theory
from infalign.core.procedures import BestOfN, KthBestOfN
from infalign.core.transforms import Exp, parse_transform
from infalign.theory import MAX_KL, TiltedPolicy, best_t, beta_for_kl, frontier, recommend

# geometric from 0.01 to MAX_KL, plus the KLs that used to fail (7, 11.5, 12)
DENSE = np.unique(np.concatenate([np.geomspace(0.01, MAX_KL, 14), [7.0, 11.5, 12.0]]))


@pytest.mark.parametrize("proc", [BestOfN(4), KthBestOfN(2, 4)], ids=str)
def test_optimum_converges_on_a_dense_kl_grid(proc):
    rows = frontier(proc, ["optimal", "identity"], DENSE)
    opt = [r for r in rows if r.transform == "optimal"]
    ident = {round(r.kl, 6): r.win_rate for r in rows if r.transform == "identity"}
    assert [r.kl for r in opt] == pytest.approx(DENSE.tolist(), rel=1e-8)  # every KL, hit exactly
    wins = np.array([r.win_rate for r in opt])
    assert np.all(np.diff(wins) >= -1e-9) and np.all(wins <= 1.0)  # more KL never loses
    for r in opt:  # the optimum is an upper bound for identity at the same KL
        assert r.win_rate >= ident[round(r.kl, 6)] - 1e-9


@settings(max_examples=6, deadline=None, derandomize=True)
@given(kl=st.floats(min_value=4.0, max_value=MAX_KL))
def test_optimum_at_any_high_kl_is_a_fixed_point_at_that_kl(kl):
    opt = theory.optimal_policy("bon:4", kl=kl)
    again = TiltedPolicy(opt.transform, opt.beta)
    assert opt.kl() == pytest.approx(kl, rel=1e-8)
    assert again.kl() == pytest.approx(kl, rel=1e-6)
    assert again.win_rate("bon:4") == pytest.approx(opt.win_rate("bon:4"), abs=1e-7)


@pytest.mark.parametrize(
    "proc, kls", [("bon:4", [0.05, 0.5, 1.0, 3.0, 7.0, 12.0]), ("won:4", [0.05, 0.5, 2.0])]
)
def test_each_recommendation_is_consistent_at_its_kl(proc, kls):
    for kl in kls:
        rec = recommend(proc, kl)
        tf = parse_transform(rec.transform)
        pol = TiltedPolicy(tf, rec.beta)
        assert rec.kl == kl
        assert pol.kl() == pytest.approx(kl, rel=1e-6)  # the transform and beta are at this KL
        assert pol.win_rate(proc) == pytest.approx(rec.win_rate, abs=1e-9)
        assert rec.identity_win_rate <= rec.win_rate <= rec.optimal_win_rate + 1e-9, kl
        # the robust t: a member of the same family at this KL, within 0.005 of the best
        rob = TiltedPolicy(parse_transform(rec.robust_transform), rec.robust_beta)
        assert rec.robust_transform.split(":")[0] == rec.transform.split(":")[0]
        assert rob.kl() == pytest.approx(kl, rel=1e-6)
        assert rob.win_rate(proc) == pytest.approx(rec.robust_win_rate, abs=1e-9)
        assert rec.win_rate - 0.005 - 1e-6 <= rec.robust_win_rate <= rec.win_rate + 1e-9, kl
        assert parse_transform(rec.robust_transform).t <= rec.t * (1 + 1e-9)


def test_robust_t_is_the_smallest_within_the_tolerance():
    """worst-of-4 at KL 1: the best t needs beta ~2e-5; the smallest t within 0.005 has a beta over
    1000x larger, and a t 3 % smaller falls outside the tolerance (the grid's 1.2 % step)."""
    rec = recommend("won:4", 1.0)
    assert rec.robust_beta > 1000 * rec.beta
    t = parse_transform(rec.robust_transform).t
    smaller = theory.frontier("won:4", [f"negexp:{t / 1.03:.6g}"], [1.0])[0]
    assert smaller.win_rate < rec.win_rate - 0.005
    assert recommend("sample", 0.5).robust_transform is None  # identity has no t


def test_recommend_takes_one_kl():
    with pytest.raises(ValueError, match="one number"):
        recommend("bon:4", [0.5, 1.0])


def test_best_t_past_the_first_scan_is_found_and_is_a_maximum():
    """bon:100 at KL 0.05 peaks at t ~ 470, past the first scan's 400."""
    kl = 0.05
    t = best_t(Exp, "bon:100", kl)

    def win(tt):
        return TiltedPolicy(Exp(tt), beta_for_kl(Exp(tt), kl)).win_rate("bon:100")

    assert t > 400
    assert win(t) >= win(t / 1.25) and win(t) >= win(t * 1.25)
    assert win(t) >= win(400.0)


def test_a_best_t_that_is_a_limit_is_an_error_not_a_grid_edge():
    """exp for best-of-1000: the win rate still rises at t = 1e6, so no t is best."""
    with pytest.raises(ValueError, match="limit of the family"):
        best_t("exp", "bon:1000", 0.5)
    with pytest.raises(ValueError, match="optimal"):
        recommend("bon:1000", 0.5)
    assert frontier("bon:1000", ["exp:auto"], [0.5]) == []
