"""Measured t guidance (``infalign.theory.guidance``): the shipped file is strict JSON and
consistent with itself, lookups snap to the nearest grid KL within a factor of 2, and ``solve``
prints / returns it beside the exact answer."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest

from infalign.cli import main
from infalign.theory import guidance

SYNTH = {
    "bon:4": {
        "task": "helpful",
        "family": "exp",
        "algorithm": "regression",
        "seeds": [0, 1],
        "at_kl": [0.25, 1.0],
        "vs_identity": {
            "2": [[0.01, -0.02, 0.04, 2], [0.05, 0.01, 0.09, 2]],
            "theory": [[0.02, None, None, 1], [None, None, None, 0]],
        },
        "best": {"0.25": "theory", "1": "2"},
        "theory_t": {"0.25": 10.6, "1": 17.3},
    }
}


@pytest.fixture
def synth(monkeypatch):
    monkeypatch.setattr(guidance, "_table", lambda: SYNTH)


def test_shipped_file_is_strict_json_and_its_best_t_is_the_largest_mean():
    f = resources.files("infalign").joinpath("assets/measured/t_guidance.json")

    def no_nan(x):
        raise ValueError(f"non-finite {x} in {f}")

    table = json.loads(f.read_text(), parse_constant=no_nan)
    assert table, "ablation results are shipped"
    for proc, g in table.items():
        for j, k in enumerate(g["at_kl"]):
            means = {n: d[j][0] for n, d in g["vs_identity"].items() if d[j][0] is not None}
            best = max(means, key=means.get) if means else None
            assert g["best"][f"{k:g}"] == best, (proc, k)
            row = guidance.measured_t(proc, k)
            assert (row is None) == (best is None)
            if row is not None:
                assert row["kl"] == k and row["best"] == best


def test_lookup_snaps_to_the_nearest_grid_kl_within_a_factor_of_two(synth):
    assert guidance.measured_t("bon:4", 0.3)["kl"] == 0.25
    assert guidance.measured_t("BoN:4", 0.8)["kl"] == 1.0  # parsed, so any spelling
    assert guidance.measured_t("bon:4", 0.1) is None  # 2.5x below the grid
    assert guidance.measured_t("bon:4", 2.5) is None
    assert guidance.measured_t("won:4", 0.25) is None  # nothing measured
    assert guidance.measured_t_lines("won:4", 0.25) == []


def test_lines_state_each_t_and_the_best(synth):
    lines = guidance.measured_t_lines("bon:4", 1.0)
    assert lines[0].startswith("measured, not exact:") and "seeds [0, 1]" in lines[0]
    assert lines[1] == "  exp:2 +0.050 [+0.010, +0.090] (n=2)"
    assert lines[2] == "  exp:auto (t 17.3) no run reached this KL"
    assert "best measured: t = 2" in lines[3]
    assert "the theory's t (10.6)" in guidance.measured_t_lines("bon:4", 0.25)[-1]
    assert "on the top quantiles" in lines[3]  # exp tilts the top; negexp the bottom
    neg = {"won:4": {**SYNTH["bon:4"], "task": "harmless", "family": "negexp"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guidance, "_table", lambda: neg)
        last = guidance.measured_t_lines("won:4", 1.0)[-1]
    assert "on the bottom quantiles" in last


def test_solve_prints_and_returns_the_guidance(synth, capsys):
    assert main(["solve", "--procedure", "bon:4", "--kl", "1"]) == 0
    out = capsys.readouterr().out
    assert "optimum's win rate" in out and "best measured: t = 2" in out
    assert main(["solve", "--procedure", "bon:4", "--kl", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["measured"]["best"] == "2" and math.isclose(d["measured"]["kl"], 1.0)
    assert main(["solve", "--procedure", "won:4", "--kl", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["measured"] is None
