"""The claims sweep's statistics (benchmarks/claims_report.py): log-KL interpolation and the paired,
per-seed difference behind every ``diffs`` cell of docs/results/claims-*.json."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from claims_report import interp, paired_diff


def _curve(kl: list[float], won: list[float], sample: list[float]) -> np.ndarray:
    return np.column_stack([kl, won, sample]).astype(float)


def test_interp_is_linear_in_log_kl_and_nan_outside_the_range() -> None:
    c = _curve([1.0, 0.1], [0.8, 0.6], [0.7, 0.5])  # unsorted on purpose
    assert interp(c, math.sqrt(0.1), 1) == pytest.approx(0.7)  # geometric midpoint
    assert interp(c, 0.1, 2) == pytest.approx(0.5)
    assert math.isnan(interp(c, 1.5, 1))
    assert math.isnan(interp(c, 0.05, 1))
    assert math.isnan(interp(c[:1], 0.1, 1))  # one point: no range to interpolate in


def test_paired_diff_is_the_t_interval_of_per_seed_differences() -> None:
    kl = [0.1, 0.3, 1.0]
    deltas = [0.01, 0.03, 0.08]
    rng = np.random.default_rng(0)
    per_seed = []
    for d in deltas:
        b = rng.uniform(0.5, 0.7, size=3)
        s = rng.uniform(0.5, 0.7, size=3)
        per_seed.append(
            {"a": _curve(kl, list(b + d), list(s - d)), "b": _curve(kl, list(b), list(s))}
        )
    per_seed.append({"b": _curve(kl, [0.5] * 3, [0.5] * 3)})  # a seed without "a" is left out
    at = [0.2, 0.5, 2.0]
    won = paired_diff(per_seed, "a", "b", at, 1)
    sample = paired_diff(per_seed, "a", "b", at, 2)
    h = stats.t.ppf(0.975, 2) * np.std(deltas, ddof=1) / math.sqrt(3)
    for j in range(2):  # inside every seed's range: the differences are exactly the deltas
        m, lo, hi, n = won[j]
        assert n == 3
        assert m == pytest.approx(np.mean(deltas))
        assert (lo, hi) == pytest.approx((m - h, m + h))
        assert sample[j][0] == pytest.approx(-np.mean(deltas))
    m, lo, hi, n = won[2]  # KL 2 is outside every seed's range
    assert n == 0 and math.isnan(m) and math.isnan(lo) and math.isnan(hi)
