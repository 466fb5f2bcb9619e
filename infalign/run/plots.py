"""Figures (matplotlib on the Agg backend, PNG written atomically) and the frontier table.

``plot_frontier`` / ``frontier_table`` draw and tabulate calibrated-space frontiers
(``theory.frontier`` rows); ``plot_winrate`` draws a run's measured win rate against measured KL
from the normalised results rows of :func:`infalign.run.report.load_run`. Shared helpers: ``_pyplot``
(a clear error without matplotlib), ``_save`` and ``_log_kl_axis``. :mod:`infalign.run.report` builds
the report from a run's artifacts and calls these.
"""

from __future__ import annotations

import io as _stdio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from infalign.run.io import atomic_write_bytes
from infalign.theory import FrontierRow

__all__ = ["TRAIN_PANELS", "frontier_table", "plot_frontier", "plot_training", "plot_winrate"]

DPI = 120
OPTIMUM_STYLE: dict[str, Any] = {"color": "black", "linestyle": "--", "linewidth": 1.6}


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (a clear error if matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plots need matplotlib: pip install 'infalign[plot]' (or matplotlib>=3.8)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` as PNG in memory, write it atomically (temp file + os.replace), close it."""
    plt = _pyplot()
    buf = _stdio.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _log_kl_axis(ax: Any) -> None:
    """Log-scaled KL axis with plain tick labels (0.2, 0.5, 1), minor ticks labelled on short ranges.
    Call after the data are drawn (the labelled minor ticks depend on the range)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 10.0
    keep = {2, 3, 4, 6} if decades < 1.2 else {2, 5} if decades < 2.5 else set()

    def minor(v: float, _pos: Any) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        return f"{v:g}" if mantissa in keep else ""

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


# --- calibrated-space frontier ------------------------------------------------------------------


def plot_frontier(rows: Sequence[FrontierRow], path: str | Path, procedure: str) -> Path:
    """Win rate of ``procedure`` (left) and standard win rate (right) against KL (nats, log axis), one
    curve per ``row.transform``; the ``optimal`` rows are drawn dashed black as the upper bound."""
    if not rows:
        raise ValueError("plot_frontier: no rows to plot (every KL target unreachable?)")
    plt = _pyplot()
    groups: dict[str, list[FrontierRow]] = {}
    for r in rows:
        groups.setdefault(r.transform, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = ((axes[0], "win_rate", f"{procedure} win rate"), (axes[1], "standard_win_rate", None))
    for ax, field, ylabel in panels:
        for label, group in groups.items():
            group = sorted(group, key=lambda r: r.kl)
            x = [r.kl for r in group]
            y = [getattr(r, field) for r in group]
            if label == "optimal" and field == "win_rate":
                ax.plot(x, y, label="optimum (upper bound)", zorder=5, **OPTIMUM_STYLE)
            elif (
                label == "optimal"
            ):  # the procedure's optimum: not a bound on the standard win rate
                ax.plot(x, y, color="grey", linestyle="--", label=f"{procedure} optimum")
            else:
                ax.plot(x, y, marker="o", markersize=3, linewidth=1.4, label=label)
        _log_kl_axis(ax)
        ax.set_xlabel("KL(policy || reference)  [nats]")
        ax.set_ylabel(ylabel or "standard win rate (sample)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
    axes[0].set_title(f"{procedure}: inference-time win rate vs KL (calibrated space)")
    axes[1].set_title("standard win rate of the same policies (calibrated space)")
    fig.tight_layout()
    return _save(fig, path)


def frontier_table(rows: Sequence[FrontierRow]) -> str:
    """The frontier rows as a markdown table (one line per transform x KL target)."""
    head = "| transform | resolved | t | beta | KL (nats) | win rate | standard win rate |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = "" if r.t is None else f"{r.t:.4g}"
        lines.append(
            f"| {r.transform} | {r.resolved} | {t} | {r.beta:.4g} | {r.kl:.4f} | "
            f"{r.win_rate:.4f} | {r.standard_win_rate:.4f} |"
        )
    return "\n".join(lines) + "\n"


# --- measured win rate vs KL of a run -------------------------------------------------------------


def _methods(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "reference" and "mean" in r["kl"]:
            out.setdefault(r["method"], []).append(r)
    return {m: sorted(v, key=lambda r: r["kl"]["mean"]) for m, v in out.items()}


def _winrate_panel(
    ax: Any, rows: list[dict[str, Any]], proc: str, curve: dict[float, float], log_scale: bool
) -> None:
    methods = _methods(rows)
    for name, rows in methods.items():
        rows = [r for r in rows if "mean" in r["win"].get(proc, {})]
        if not rows:
            continue
        x = np.array([r["kl"]["mean"] for r in rows])
        y = np.array([r["win"][proc]["mean"] for r in rows])

        def err(vals: list[dict[str, float]], mid: np.ndarray) -> np.ndarray | None:
            if not all("low" in v and "high" in v for v in vals):
                return None
            lo = np.array([v["low"] for v in vals])
            hi = np.array([v["high"] for v in vals])
            return np.maximum(np.stack([mid - lo, hi - mid]), 0.0)

        ax.errorbar(
            x,
            y,
            xerr=err([r["kl"] for r in rows], x),
            yerr=err([r["win"][proc] for r in rows], y),
            marker="o",
            markersize=5,
            capsize=3,
            linewidth=1.4,
            label=name,
        )
    if curve:
        ax.plot(
            list(curve),
            list(curve.values()),
            label="calibrated-space optimum (theory)",
            **OPTIMUM_STYLE,
        )
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="reference policy (1/2)")
    if log_scale:
        _log_kl_axis(ax)
    else:
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("measured KL(policy || reference)  [nats, sequence level]")
    ax.set_ylabel(f"{proc} win rate vs reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def plot_winrate(
    rows: list[dict[str, Any]],
    path: str | Path,
    curves: dict[str, dict[float, float]],
    procs: Sequence[str],
    head: str,
    log_scale: bool,
) -> Path:
    """Measured win rate against measured KL per method (CIs in both axes) from normalised results
    rows (``report.load_run``), with the theory optimum ``curves[proc]`` (KL -> win rate): one panel
    for ``head`` and, if ``"sample"`` is among ``procs``, one for the standard win rate. The KL axis
    is logarithmic if ``log_scale``, else linear with a line at 0."""
    plt = _pyplot()
    panels = [head] + (["sample"] if "sample" in procs and head != "sample" else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, proc in zip(axes[0], panels, strict=False):
        _winrate_panel(ax, rows, proc, curves.get(proc, {}), log_scale)
        kind = "standard win rate" if proc == "sample" else "inference-time win rate"
        ax.set_title(f"{proc}: measured {kind} vs KL")
    fig.tight_layout()
    return _save(fig, path)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


TRAIN_PANELS = (
    ("rl/reward_calibrated", "calibrated reward C (policy samples)"),
    ("rl/reward_transformed", "training reward Phi(C) (transformed)"),
    ("rl/kl_seq", "KL per sequence [nats]"),
)


def plot_training(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path | None:
    """Per-step training curves, one line per method x beta; None if there is nothing to plot."""
    panels = [(k, t) for k, t in TRAIN_PANELS if any(k in m for v in runs.values() for m in v)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=False):
        for name, steps in runs.items():
            pts = [
                (m.get("rl/step", i), m[key]) for i, m in enumerate(steps) if _finite(m.get(key))
            ]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="." if len(pts) < 30 else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
