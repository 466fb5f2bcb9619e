"""A markdown report with its plots, built from a run's artifacts only.

``write_report(run_dir)`` reads ``config.yaml``, ``manifest.json``, ``reference/*/reference.json``,
``train/<method>/beta=<b>/metrics.jsonl`` and ``results.json`` and writes ``report.md``,
``winrate_vs_kl.png`` and ``training.png`` next to them. The figures are drawn by
:mod:`infalign.run.plots` (``plot_frontier`` / ``frontier_table`` are re-exported here) and the
tables by :mod:`infalign.run.tables`. It never recomputes a measurement: every measured number it
shows is read from an artifact. The only numbers it computes are the calibrated-space optimum
(``theory``), always labelled as theory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from infalign.run.io import atomic_write_text, read_json, read_jsonl
from infalign.run.plots import frontier_table, plot_frontier, plot_training, plot_winrate
from infalign.run.tables import get, num, reproduce, results_table, settings, training_table
from infalign.theory import MAX_KL

__all__ = ["frontier_table", "load_run", "plot_frontier", "write_report"]

# --- reading a run directory ---------------------------------------------------------------------


SMALL_TEST_SET = 20  # fewer test prompts than this: the report warns about its intervals


def _stat(x: Any) -> dict[str, float]:
    """An estimate as {mean, stderr, low, high} (only the finite fields present in the artifact)."""
    if isinstance(x, dict):
        out = {k: num(x.get(k)) for k in ("mean", "stderr", "low", "high")}
        return {k: v for k, v in out.items() if v is not None}
    v = num(x)
    return {} if v is None else {"mean": v}


def _norm_row(r: dict[str, Any]) -> dict[str, Any]:
    """One results.json row (written by ``pipeline._row``) in a fixed shape: method, transform,
    resolved, beta, kl, win (per procedure), bound, reward_mean, length_mean, transfer."""
    tf, resolved = r.get("transform"), r.get("resolved_transform")
    raw_wins = r.get("win_rate")
    wins = {str(p): _stat(w) for p, w in raw_wins.items()} if isinstance(raw_wins, dict) else {}
    std = _stat(r.get("standard_win_rate"))
    if std and "sample" not in wins:
        wins["sample"] = std
    bound = r.get("theory_bound") or {}
    return {
        "method": str(r.get("method", "?")),
        "transform": "" if tf is None else str(tf),
        "resolved": None if resolved is None else str(resolved),
        "beta": num(r.get("beta")),
        "kl": _stat(r.get("kl")),
        "win": wins,
        "bound": {str(p): v for p, b in bound.items() if (v := num(b)) is not None}
        if isinstance(bound, dict)
        else {},
        "reward_mean": num(r.get("reward_mean")),
        "length_mean": num(r.get("length_mean")),
        "transfer": r.get("transfer") if isinstance(r.get("transfer"), dict) else None,
    }


def _required(run_dir: Path, name: str, what: str) -> Path:
    p = run_dir / name
    if not p.is_file():
        raise ValueError(f"run {str(run_dir)!r}: missing {name} ({what}); cannot write the report")
    return p


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, read from the run's artifacts (ValueError naming a missing one)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"run directory {str(d)!r} does not exist")
    results = read_json(_required(d, "results.json", "the evaluated results; run `infalign run`"))
    manifest = read_json(d / "manifest.json") if (d / "manifest.json").is_file() else {}
    if (d / "config.yaml").is_file():
        try:
            config = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{str(d / 'config.yaml')!r} is not valid YAML: {err}") from None
    elif isinstance(manifest.get("config"), dict):
        config = manifest["config"]
    else:
        _required(d, "config.yaml", "the run's configuration")
    raw_rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ValueError(f"{str(d / 'results.json')!r} holds no result rows")
    rows = [_norm_row(r) for r in raw_rows if isinstance(r, dict)]
    refs = {}
    for split in ("train", "test"):
        p = d / "reference" / split / "reference.json"
        if p.is_file():
            refs[split] = read_json(p)
    # training runs in the results' method order, beta descending (weakest KL first)
    order = list(dict.fromkeys(r["method"] for r in rows))

    def run_key(p: Path) -> tuple[int, float, str]:
        m, b = p.parent.parent.name, p.parent.name.split("=", 1)[1]
        try:
            beta = -float(b)
        except ValueError:
            beta = 0.0
        return (order.index(m) if m in order else len(order), beta, str(p))

    runs = {}
    for p in sorted(d.glob("train/*/beta=*/metrics.jsonl"), key=run_key):
        steps = [m for m in read_jsonl(p, strict=False) if isinstance(m, dict)]
        if steps:
            runs[f"{p.parent.parent.name} β={p.parent.name.split('=', 1)[1]}"] = steps
    return {
        "dir": d,
        "results": results if isinstance(results, dict) else {},
        "rows": rows,
        "config": config if isinstance(config, dict) else {},
        "manifest": manifest if isinstance(manifest, dict) else {},
        "reference": refs,
        "training": runs,
    }


def _procedures(run: dict[str, Any]) -> tuple[list[str], str]:
    """(procedures evaluated, the report's headline procedure)."""
    listed = get(run["results"], "procedures")
    procs: list[str] = [str(p) for p in listed] if isinstance(listed, list) else []
    for r in run["rows"]:
        procs += [p for p in r["win"] if p not in procs]
    cfg = run["config"]
    head = str(
        get(run["results"], "headline_procedure")
        or get(cfg, "report.procedure")
        or next((p for p in procs if p != "sample"), procs[0] if procs else "sample")
    )
    return procs, head


# --- theory curve --------------------------------------------------------------------------------


def _optimum(procedure: str, kls: Sequence[float]) -> dict[float, float]:
    """Calibrated-space optimum win rate at each KL in (0, MAX_KL] (theory, not a measurement)."""
    from infalign import theory

    ks = sorted({float(k) for k in kls if 0 < k <= MAX_KL})
    if not ks:
        return {}
    rows = theory.frontier(procedure, ["optimal"], ks)  # out-of-reach KLs have no row
    return {k: r.win_rate for k in ks for r in rows if abs(r.kl - k) <= 1e-6 * k}


def _kl_points(run: dict[str, Any]) -> list[dict[str, float]]:
    return [r["kl"] for r in run["rows"] if r["method"] != "reference" and "mean" in r["kl"]]


def _log_scale(run: dict[str, Any]) -> bool:
    """A log KL axis only where every measured KL and interval end is > 0 and the points span at
    least a factor of 3; otherwise linear (negative Monte-Carlo KL estimates are shown honestly)."""
    kls = _kl_points(run)
    if not kls or any(k["mean"] <= 0 or k.get("low", 1.0) <= 0 for k in kls):
        return False
    means = [k["mean"] for k in kls]
    return max(means) >= 3 * min(means)


def _theory_kls(run: dict[str, Any]) -> np.ndarray:
    """KL grid for the theory curve: the measured range (with margins), from near 0 on a linear axis."""
    kls = _kl_points(run)
    pos = [k["mean"] for k in kls if k["mean"] > 0]
    if not pos:
        return np.zeros(0)
    top = max(max(pos), *(k.get("high", 0.0) for k in kls))
    if _log_scale(run):
        lo_k, hi_k = min(pos) / 1.5, top * 1.5
    else:
        lo_k, hi_k = max(top * 0.01, 1e-3), top * 1.1
    lo_k, hi_k = max(lo_k, 1e-3), min(hi_k, MAX_KL)
    return np.geomspace(lo_k, max(hi_k, lo_k * 1.01), 30)


# --- plots of a run ------------------------------------------------------------------------------


def plot_run_winrate(
    run: dict[str, Any], path: str | Path, curves: dict[str, dict[float, float]]
) -> Path:
    """Measured win rate against measured KL per method (CIs in both axes), with the theory optimum:
    one panel for the report procedure and, if evaluated, one for the standard win rate."""
    procs, head = _procedures(run)
    return plot_winrate(run["rows"], path, curves, procs, head, log_scale=_log_scale(run))


# --- the markdown report -------------------------------------------------------------------------

HOW_TO_READ = (
    "Each point is one trained policy (one method at one β), evaluated on held-out test prompts "
    "against fresh samples of the reference policy. x: the measured sequence-level KL(policy ‖ "
    "reference) in nats (Monte-Carlo mean ± standard error); y: the measured win rate against the "
    "reference when both sides use the deployed inference-time procedure (all-subsets estimator, "
    "ties count 1/2; error bars are the bootstrap interval over prompts). Methods are compared at "
    "matched KL: a curve above another at the same KL is better. The dashed black curve is computed, "
    "not measured: the calibrated-space optimum (continuous rewards), an upper bound on any policy's "
    "win rate at that KL; points above it mean estimation noise, ties or a reward that is not "
    "continuous. The reference policy itself wins 1/2 by definition (dotted line); its measured row in "
    "the table is a sanity check. Training rewards are not comparable across methods (each method "
    "optimises its own transformed reward); the calibrated reward and the KL are."
)


def _results_section(
    run: dict[str, Any], procs: list[str], head: str, bounds: dict[float, float]
) -> list[str]:
    """The report's Results section: the table, how to read its columns, a small-test-set note."""
    conf = num(get(run["results"], "confidence")) or num(get(run["config"], "evaluate.confidence"))
    md = ["## Results", ""]
    md += results_table(run, procs, head, bounds)
    ci = f"{100 * conf:g}% " if conf is not None else ""
    md += [
        "",
        f"Win rates: mean over test prompts [{ci}interval]; KL: sequence-level, nats, "
        "mean ± standard error. The *theory* column is the calibrated-space optimum's "
        f"{head} win rate at the row's measured KL (an upper bound for continuous rewards). "
        "Intervals resample test prompts and condition on the held-out reference pool (the "
        "same pi_ref samples for every row, so differences between rows are paired). *Tilt "
        "realised*: the policy's log-ratio on that pool regressed on the optimum's "
        "(R - beta log Z)/beta: slope 1 and correlation 1 is the optimum, 0 is pi_ref.",
        "",
    ]
    n_test = get(run["reference"].get("test", {}), "num_prompts")
    if isinstance(n_test, int) and n_test < SMALL_TEST_SET:
        md += [
            f"> **Only {n_test} test prompts.** A bootstrap over so few prompts gives intervals "
            "that are too narrow; read these win rates as rough (even the reference row can land "
            "far from 1/2).",
            "",
        ]
    return md


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` with ``winrate_vs_kl.png`` and ``training.png`` from the run's
    artifacts (see the module docstring); returns the report's path. ValueError names a missing
    required artifact (``results.json``, ``config.yaml``)."""
    run = load_run(run_dir)
    d: Path = run["dir"]
    procs, head = _procedures(run)
    grid = _theory_kls(run)
    curves = {p: _optimum(p, grid) for p in {head, "sample"} if p in procs or p == head}
    missing_bound = [  # rows without a recorded bound: compute it (theory, labelled as such)
        r["kl"]["mean"]
        for r in run["rows"]
        if r["method"] != "reference" and head not in r["bound"] and "mean" in r["kl"]
    ]
    bounds = _optimum(head, missing_bound) if missing_bound else {}
    plot_run_winrate(run, d / "winrate_vs_kl.png", curves)
    training = plot_training(run["training"], d / "training.png")

    title = get(run["config"], "report.title") or "infalign report"
    md = [
        f"# {title}",
        "",
        f"Run directory: `{d}`. Every measured number below is read from the "
        "run's artifacts; numbers marked *theory* are computed in calibrated space.",
        "",
    ]
    missing = get(run["results"], "missing") or []
    if get(run["results"], "complete") is False or missing:
        md += [
            f"> **Incomplete run**: no results yet for {', '.join(map(str, missing)) or 'some rows'}.",
            "",
        ]
    md += [f"## {head} win rate vs KL", "", "![win rate vs KL](winrate_vs_kl.png)", ""]
    md += _results_section(run, procs, head, bounds)
    md += ["## Training", ""]
    if training is not None:
        md += ["![training curves](training.png)", "", *training_table(run["training"]), ""]
    else:
        md += ["No training metrics (`train/*/beta=*/metrics.jsonl`) found.", ""]
    md += ["## How to read this", "", HOW_TO_READ, ""]
    md += ["## Settings", "", "| setting | value |", "|---|---|"]
    md += [f"| {k} | {v.replace('|', '/')} |" for k, v in settings(run)]
    md += ["", "## Reproduce", "", "```", reproduce(run), f"infalign report {d}", "```", ""]
    path = d / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
