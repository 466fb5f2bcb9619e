"""Measured guidance on t, printed by ``infalign solve`` beside the exact answer.

The exact answer assumes the policy reaches the tilted optimum. A real optimiser realises only part
of the tilt, and exp(t u) with a large t puts its whole target on the top few quantiles, which an
imperfect fit loses first. ``benchmarks/claims.py ablate-t`` trains exp:t (negexp:t for worst-of-n)
for fixed t next to the theory's t and calibrated identity on the offline testbed, and
``benchmarks/claims.py summarize`` writes what it measured to ``infalign/assets/measured/
t_guidance.json``: per procedure and KL of its grid, each t's paired win-rate difference to identity
(mean, 95% interval, seeds) and the best t measured there. This module reads that file; it is data
about one small model and reward, so ``solve`` prints it as measured guidance, never as the answer.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import Any

from infalign.theory.specs import Recommendation, parse_procedure

__all__ = ["measured_t", "measured_t_lines", "robust_t_lines"]


@cache
def _table() -> dict[str, Any]:
    f = resources.files("infalign").joinpath("assets/measured/t_guidance.json")
    return dict(json.loads(f.read_text())) if f.is_file() else {}


def measured_t(procedure: str, kl: float) -> dict[str, Any] | None:
    """The ablation's row at the grid KL nearest ``kl`` (within a factor of 2) for ``procedure``:
    {task, algorithm, seeds, kl, vs_identity: {t or "theory": [mean, low, high, n]}, best,
    theory_t}; None when nothing was measured there."""
    g = _table().get(str(parse_procedure(procedure)))
    if not g or not kl > 0:
        return None
    j = min(range(len(g["at_kl"])), key=lambda i: abs(math.log(g["at_kl"][i] / kl)))
    at = float(g["at_kl"][j])
    if abs(math.log(at / kl)) > math.log(2):
        return None
    vs = {name: d[j] for name, d in g["vs_identity"].items()}
    if all(v[0] is None for v in vs.values()):
        return None
    key = f"{at:g}"
    return {
        "task": g["task"],
        "family": g["family"],
        "algorithm": g["algorithm"],
        "seeds": g["seeds"],
        "kl": at,
        "vs_identity": vs,
        "best": g["best"][key],
        "theory_t": g["theory_t"][key],
    }


def _cell(v: list[Any]) -> str:
    mean, low, high, n = v
    if mean is None:
        return "no run reached this KL"
    ci = "" if low is None else f" [{low:+.3f}, {high:+.3f}]"
    return f"{mean:+.3f}{ci} (n={n})"


def measured_t_lines(procedure: str, kl: float) -> list[str]:
    """What ``solve`` prints under the exact answer (empty when nothing was measured near ``kl``)."""
    m = measured_t(procedure, kl)
    if m is None:
        return []
    fam, tt = m["family"], m["theory_t"]
    cells = [
        f"{fam}:auto (t {tt:.3g}) {_cell(v)}" if name == "theory" else f"{fam}:{name} {_cell(v)}"
        for name, v in m["vs_identity"].items()
    ]
    best = m["best"]
    best_name = f"the theory's t ({tt:.3g})" if best == "theory" else f"t = {best}"
    end = "bottom" if fam == "negexp" else "top"  # where exp / negexp put their tilt
    return [
        f"measured, not exact: the offline testbed ({m['task']}, rl.algorithm {m['algorithm']}, "
        f"seeds {m['seeds']}) at KL {m['kl']:g}, win rate minus identity's:",
        *(f"  {c}" for c in cells),
        f"  best measured: {best_name}. A real optimiser realises part of the tilt, and a large t "
        f"puts it on the {end} quantiles it fits worst: try a smaller t too (docs/results.md).",
    ]


def robust_t_lines(rec: Recommendation) -> list[str]:
    """``solve``'s line for the smallest t within 0.005 of the best win rate, where its beta is more
    than twice the best t's (the argmax sits on a plateau; the larger beta is far easier to train)."""
    if rec.robust_beta is None or rec.robust_beta <= 2 * rec.beta:
        return []
    return [
        f"robust alternative   {rec.robust_transform}, beta {rec.robust_beta:.4g}, win rate "
        f"{rec.robust_win_rate:.4f} (the smallest t within 0.005 of the best: a {rec.robust_beta / rec.beta:.0f}x "
        "larger beta, which a trained policy can follow; docs/results.md)"
    ]
