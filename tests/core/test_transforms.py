"""Transforms Phi of the calibrated reward (spec section 4): monotone maps of [0, 1], numpy/torch
agreement, the exp families' shape, exact endpoints, spec/dict round trips, Tabulated interpolation."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infalign.core.transforms import (
    Chain,
    Exp,
    Identity,
    Log,
    NegExp,
    Tabulated,
    Transform,
    is_raw,
    parse_transform,
    transform_from_dict,
)

FAST = settings(max_examples=60, deadline=None)

ts = st.floats(min_value=1e-3, max_value=500.0)
unit = st.floats(min_value=0.0, max_value=1.0)
unit_arrays = hnp.arrays(np.float64, st.integers(1, 40), elements=unit).map(np.sort)


def families(t: float) -> list[Transform]:
    return [Exp(t), NegExp(t)]


def _all_backends(tf: Transform, u: np.ndarray) -> dict[str, np.ndarray]:
    """Apply ``tf`` to u as numpy float64 and torch float32/float64; return numpy float64 views."""
    out = {"numpy": np.asarray(tf(u), dtype=np.float64)}
    for dtype in (torch.float64, torch.float32):
        res = tf(torch.from_numpy(u).to(dtype))
        assert isinstance(res, torch.Tensor) and res.dtype == dtype
        out[str(dtype)] = res.to(torch.float64).numpy()
    return out


# ------------------------------------------------------------------- monotone, finite, backends


@FAST
@given(ts, unit_arrays)
def test_exp_families_monotone_finite_and_backend_consistent(t, u):
    for tf in families(t):
        res = _all_backends(tf, u)
        for name, v in res.items():
            assert np.all(np.isfinite(v)), (tf, name)
            assert np.all(np.diff(v) >= 0), (tf, name, u, v)
            assert np.all((v >= 0) & (v <= 1)), (tf, name)
        np.testing.assert_allclose(res["torch.float64"], res["numpy"], rtol=1e-12, atol=1e-13)
        # float32: u and t are rounded to float32, Phi is smooth: absolute error ~ (1 + t) * eps32
        np.testing.assert_allclose(res["torch.float32"], res["numpy"], rtol=0, atol=2e-6 * (1 + t))


@FAST
@given(unit_arrays, st.floats(min_value=1e-300, max_value=0.5))
def test_identity_and_log_monotone_finite_and_backend_consistent(u, eps):
    for tf in (Identity(), Log(), Log(eps)):
        res = _all_backends(tf, u)
        for name, v in res.items():
            assert np.all(np.isfinite(v)), (tf, name)
            assert np.all(np.diff(v) >= 0), (tf, name)
        np.testing.assert_allclose(res["torch.float64"], res["numpy"], rtol=1e-14)
    np.testing.assert_array_equal(Identity()(u), u)
    np.testing.assert_allclose(Log(eps)(u), np.log(np.maximum(u, eps)), rtol=1e-15)


@FAST
@given(ts)
def test_exp_families_map_endpoints_exactly(t):
    u = np.array([0.0, 1.0])
    for tf in families(t):
        assert tf(0.0) == 0.0 and tf(1.0) == 1.0
        assert tf(u).tolist() == [0.0, 1.0]
        for dtype in (torch.float32, torch.float64):
            assert tf(torch.tensor(u, dtype=dtype)).tolist() == [0.0, 1.0], (tf, dtype)


def test_exp_families_map_endpoints_exactly_dense_t_sweep():
    t_values = np.concatenate([np.geomspace(1e-3, 500.0, 600), np.linspace(29.0, 40.0, 200)])
    for t in t_values.tolist():
        for tf in families(t):
            assert tf(np.array([0.0, 1.0])).tolist() == [0.0, 1.0], tf
            for dtype in (torch.float32, torch.float64):
                assert tf(torch.tensor([0.0, 1.0], dtype=dtype)).tolist() == [0.0, 1.0], (tf, dtype)


@pytest.mark.parametrize("t", [50.0, 500.0])
@pytest.mark.parametrize("cls", [Exp, NegExp])
def test_no_overflow_at_large_t(cls, t):
    tf = cls(t)
    u = np.array([0.0, 1e-300, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-16, 1.0])
    with np.errstate(all="raise"):
        v = tf(u)
    assert np.all(np.isfinite(v)) and v[0] == 0.0 and v[-1] == 1.0
    assert np.all(np.diff(v) >= 0)
    for dtype in (torch.float32, torch.float64):
        w = tf(torch.tensor(u, dtype=dtype))
        assert torch.all(torch.isfinite(w)) and w[0] == 0 and w[-1] == 1


def test_scalar_in_scalar_out():
    assert isinstance(Exp(3.0)(0.5), float)
    assert isinstance(NegExp(3.0)(1), float)
    assert Identity()(0.25) == 0.25
    assert Log()(0.0) == pytest.approx(math.log(1e-12))


# ------------------------------------------------------------------ the families' actual shape


@FAST
@given(st.floats(min_value=1e-3, max_value=30.0), unit_arrays)
def test_exp_is_increasing_affine_function_of_exp_tu(t, u):
    v = Exp(t)(u)
    np.testing.assert_allclose(v * math.expm1(t) + 1.0, np.exp(t * u), rtol=1e-12, atol=0)


@FAST
@given(st.floats(min_value=1e-3, max_value=30.0), unit_arrays)
def test_negexp_is_increasing_affine_function_of_minus_exp_minus_tu(t, u):
    # Phi(u) = (1 - e^{-tu}) / (1 - e^{-t}):  Phi * (1 - e^{-t}) - 1 = -e^{-tu}
    v = NegExp(t)(u)
    lhs = v * -math.expm1(-t) - 1.0
    np.testing.assert_allclose(lhs, -np.exp(-t * u), rtol=1e-12, atol=1e-15)


def test_exp_and_negexp_are_mirror_images():
    u = np.linspace(0, 1, 101)
    np.testing.assert_allclose(Exp(7.0)(u), 1.0 - NegExp(7.0)(1.0 - u), atol=1e-15)


def test_small_t_approaches_identity():
    u = np.linspace(0, 1, 11)
    for tf in (Exp(1e-3), NegExp(1e-3)):
        np.testing.assert_allclose(tf(u), u, atol=1e-3 / 4)
        v32 = tf(torch.tensor(u, dtype=torch.float32)).double().numpy()
        np.testing.assert_allclose(v32, tf(u), atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [Exp, NegExp])
def test_bad_t_rejected(cls, bad):
    with pytest.raises(ValueError, match="t must be a finite number > 0"):
        cls(bad)


# ----------------------------------------------------------------------------- chains


def test_chain_composes_left_to_right_and_flattens():
    a, b, c = Exp(2.0), NegExp(3.0), Log()
    u = np.linspace(0, 1, 17)
    np.testing.assert_allclose((a | b)(u), b(a(u)), rtol=1e-15)
    np.testing.assert_allclose((a | b | c)(u), c(b(a(u))), rtol=1e-15)
    assert (a | b) | c == a | (b | c) == Chain((a, b, c))
    assert str(a | b | c) == "exp:2|negexp:3|log"
    with pytest.raises(ValueError, match="non-empty"):
        Chain(())


# ------------------------------------------------------------------------------ round trips

_parseable = st.one_of(
    st.just(Identity()),
    st.just(Log()),
    st.floats(min_value=1e-300, max_value=1.0, exclude_max=True).map(Log),
    ts.map(Exp),
    ts.map(NegExp),
    st.floats(min_value=1e-6, max_value=1e6).map(Exp),
)


@st.composite
def _tabulated(draw):
    # knots at least 1e-9 apart: np.interp (the reference below) overflows on a slope like
    # 4 / 2.2e-308 (a grid hypothesis found), where Tabulated itself returns the finite answer
    grid = draw(
        st.lists(unit, min_size=2, max_size=12, unique=True)
        .map(sorted)
        .filter(lambda g: float(np.min(np.diff(g))) > 1e-9)
    )
    steps = draw(st.lists(st.floats(0.0, 10.0), min_size=len(grid) - 1, max_size=len(grid) - 1))
    values = np.concatenate([[draw(st.floats(-5.0, 5.0))], steps]).cumsum()
    return Tabulated(tuple(grid), tuple(values.tolist()))


parseable_transforms = st.one_of(
    _parseable,
    st.lists(_parseable, min_size=2, max_size=3).map(lambda s: Chain(tuple(s))),
)
all_transforms = st.one_of(
    parseable_transforms,
    _tabulated(),
    st.lists(st.one_of(_parseable, _tabulated()), min_size=1, max_size=3).map(
        lambda s: Chain(tuple(s))
    ),
)


@FAST
@given(parseable_transforms)
def test_spec_string_round_trip(tf):
    back = parse_transform(str(tf))
    assert back == tf and hash(back) == hash(tf)
    assert parse_transform(tf) is tf


@FAST
@given(all_transforms)
def test_dict_round_trip_through_yaml_and_json(tf):
    d = tf.to_dict()
    assert transform_from_dict(d) == tf
    assert transform_from_dict(yaml.safe_load(yaml.safe_dump(d))) == tf
    assert transform_from_dict(json.loads(json.dumps(d))) == tf


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("identity", Identity()),
        ("log", Log()),
        ("log:1e-6", Log(1e-6)),
        ("exp:12", Exp(12.0)),
        ("EXP:12", Exp(12.0)),
        (" negexp:0.5 ", NegExp(0.5)),
        ("identity|exp:2", Chain((Identity(), Exp(2.0)))),
    ],
)
def test_parse_known_specs(spec, expected):
    assert parse_transform(spec) == expected


def test_str_keeps_short_specs_and_full_precision():
    assert str(Exp(12)) == "exp:12"
    assert str(NegExp(0.5)) == "negexp:0.5"
    assert str(Log()) == "log"
    assert str(Identity()) == "identity"
    assert parse_transform(str(Exp(1.2345678901234))) == Exp(1.2345678901234)


@pytest.mark.parametrize("spec", ["exp", "exp:0", "exp:-1", "negexp:abc", "foo", "", "log:2"])
def test_parse_errors_name_the_spec(spec):
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        parse_transform(spec)


@pytest.mark.parametrize("d", [{}, {"name": "nope"}, "exp:2"])
def test_bad_dicts_rejected(d):
    with pytest.raises(ValueError):
        transform_from_dict(d)


@FAST
@given(all_transforms)
def test_frozen_and_hashable(tf):
    field = dataclasses.fields(tf)[0].name if dataclasses.fields(tf) else "name"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(tf, field, None)
    clone = transform_from_dict(tf.to_dict())
    assert clone == tf and hash(clone) == hash(tf)
    table = {tf: 1}
    table[clone] = 2
    assert len(table) == 1 and table[tf] == 2


def test_equal_objects_hash_equal_across_constructions():
    keys = {Exp(2): "a", Exp(2.0): "b", parse_transform("exp:2"): "c", NegExp(2): "d"}
    assert len(keys) == 2 and keys[Exp(2)] == "c"
    assert Exp(2.0) != NegExp(2.0) and Log() == Log(1e-12)
    assert hash(Identity()) == hash(parse_transform("identity"))


# ----------------------------------------------------------------------------------- tabulated


@FAST
@given(_tabulated(), hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(-0.5, 1.5)))
def test_tabulated_equals_np_interp_and_clamps(tf, u):
    expected = np.interp(u, tf.grid, tf.values)
    np.testing.assert_array_equal(tf(u), expected)
    scale = 1.0 + max(abs(v) for v in tf.values)
    np.testing.assert_allclose(
        tf(torch.from_numpy(u)).numpy(), expected, rtol=1e-12, atol=1e-12 * scale
    )
    got32 = tf(torch.from_numpy(u).float())
    assert got32.dtype == torch.float32
    # float32 input rounds u by up to 6e-8 relative; the slope can be large on a fine grid
    u32 = torch.from_numpy(u).float().double().numpy()
    np.testing.assert_allclose(
        got32.double().numpy(), np.interp(u32, tf.grid, tf.values), rtol=1e-6, atol=1e-6 * scale
    )
    # clamping outside the grid
    below, above = u < tf.grid[0], u > tf.grid[-1]
    assert np.all(tf(u)[below] == tf.values[0]) and np.all(tf(u)[above] == tf.values[-1])


def test_tabulated_fixed_example():
    tf = Tabulated((0.0, 0.5, 1.0), (0.0, 1.0, 3.0))
    u = [-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0]
    expected = [0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert tf(np.array(u)).tolist() == expected
    assert tf(torch.tensor(u)).tolist() == expected
    inner = Tabulated((0.2, 0.8), (1.0, 2.0))
    assert inner(np.array([0.0, 0.5, 1.0])).tolist() == pytest.approx([1.0, 1.5, 2.0])
    assert inner(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([1.0, 1.5, 2.0])


def test_tabulated_grid_finer_than_float32():
    """The theory module tabulates Phi on a grid with gaps of 1e-10 next to 0 and 1; float32 inputs
    must still interpolate (no 0/0 from grid points that coincide in float32)."""
    gaps = 1e-10 * 1.6 ** np.arange(20)
    grid = np.unique(np.concatenate([[0.0], gaps, [0.5], 1 - gaps[::-1], [1.0]]))
    tf = Tabulated(tuple(grid), tuple(np.linspace(0.0, 1.0, grid.size)))
    u = np.array([0.0, 1e-12, 1e-9, 0.3, 0.5, 1 - 1e-7, 1.0])
    for dtype in (torch.float32, torch.float64):
        uu = torch.tensor(u, dtype=dtype)
        out = tf(uu)
        assert torch.all(torch.isfinite(out)), (dtype, out)
        np.testing.assert_allclose(
            out.double().numpy(), np.interp(uu.double().numpy(), grid, tf.values), atol=1e-6
        )
        assert out[0] == 0 and out[-1] == 1


@pytest.mark.parametrize(
    ("grid", "values", "match"),
    [
        ((0.0, 0.5, 0.5, 1.0), (0.0, 1.0, 2.0, 3.0), "strictly increasing"),
        ((0.0, 0.7, 0.5, 1.0), (0.0, 1.0, 2.0, 3.0), "strictly increasing"),
        ((0.0, 0.5, 1.0), (0.0, 2.0, 1.0), r"non-decreasing.*values\[2\]"),
        ((0.0, 0.5, 1.0), (0.0, 1.0), "equal length"),
        ((0.5,), (1.0,), "equal length >= 2"),
        ((-0.1, 1.0), (0.0, 1.0), "inside \\[0, 1\\]"),
        ((0.0, 1.5), (0.0, 1.0), "inside \\[0, 1\\]"),
        ((0.0, 1.0), (0.0, float("nan")), "finite"),
    ],
)
def test_tabulated_rejects_bad_tables(grid, values, match):
    with pytest.raises(ValueError, match=match):
        Tabulated(grid, values)


def test_raw_is_one_check_in_any_case():
    """None and "raw" in any case or padding mean the raw reward, everywhere (config, pipeline,
    trainer, advantages, TRL): the config check was case-sensitive and refused "Raw"."""
    from tiny_assets import RECIPE

    from infalign.run.recipe import load_config

    assert is_raw(None) and is_raw("raw") and is_raw(" Raw ") and is_raw("RAW")
    assert not is_raw("identity") and not is_raw(Identity()) and not is_raw("raw:1")
    cfg = load_config(RECIPE, {"methods": "[{name: m, transform: Raw}]"})
    assert cfg.methods[0].transform == "Raw"
