"""A markdown report with its plots, built from a run's artifacts only.

``plot_frontier`` / ``frontier_table`` (calibrated-space frontiers) and the figure helpers live in
:mod:`infalign.run.plots` and are re-exported here. ``write_report(run_dir)`` reads ``config.yaml``, ``manifest.json``,
``reference/*/reference.json``, ``train/<method>/beta=<b>/metrics.jsonl`` and ``results.json`` and writes
``report.md``, ``winrate_vs_kl.png`` and ``training.png`` next to them. It never recomputes a measurement:
every measured number it shows is read from an artifact. The only numbers it computes are the
calibrated-space optimum (``theory``), always labelled as theory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from infalign.run.io import atomic_write_text, read_json, read_jsonl
from infalign.run.plots import _pyplot, _save, frontier_table, plot_frontier, plot_winrate
from infalign.theory import MAX_KL

__all__ = ["frontier_table", "load_run", "plot_frontier", "write_report"]

log = logging.getLogger(__name__)


# --- reading a run directory ---------------------------------------------------------------------


SMALL_TEST_SET = 20  # fewer test prompts than this: the report warns about its intervals


def _num(x: Any) -> float | None:
    """A finite float from a number or a {"mean": ...} dict, else None."""
    if isinstance(x, dict):
        x = x.get("mean")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _stat(x: Any) -> dict[str, float]:
    """An estimate as {mean, stderr, low, high} (only the finite fields present in the artifact)."""
    if isinstance(x, dict):
        out = {k: _num(x.get(k)) for k in ("mean", "stderr", "low", "high")}
        return {k: v for k, v in out.items() if v is not None}
    v = _num(x)
    return {} if v is None else {"mean": v}


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _norm_row(r: dict[str, Any]) -> dict[str, Any]:
    """One results.json row in a fixed shape: method, transform, beta, kl, win (per procedure), bound."""
    tf = r.get("transform")
    if isinstance(tf, dict):
        tf = tf.get("spec") or tf.get("name") or tf.get("transform")
    resolved = r.get("resolved_transform") or r.get("resolved")
    if isinstance(resolved, dict):
        resolved = resolved.get("resolved") or resolved.get("spec")
    raw_wins = r.get("win_rates", r.get("win_rate", {}))
    wins = {str(p): _stat(w) for p, w in raw_wins.items()} if isinstance(raw_wins, dict) else {}
    std = _stat(r.get("standard_win_rate"))
    if std and "sample" not in wins:
        wins["sample"] = std
    bound = r.get("theory_bound") or r.get("optimal_bound") or {}
    return {
        "method": str(r.get("method", "?")),
        "transform": "" if tf is None else str(tf),
        "resolved": None if resolved is None else str(resolved),
        "beta": _num(r.get("beta")),
        "kl": _stat(r.get("kl")),
        "win": wins,
        "bound": {str(p): v for p, b in bound.items() if (v := _num(b)) is not None}
        if isinstance(bound, dict)
        else {},
        "reward_mean": _num(r.get("reward_mean")),
        "length_mean": _num(r.get("length_mean")),
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
    raw_rows = results.get("rows", results.get("results")) if isinstance(results, dict) else results
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
    listed = _get(run["results"], "procedures")
    procs: list[str] = [str(p) for p in listed] if isinstance(listed, list) else []
    for r in run["rows"]:
        procs += [p for p in r["win"] if p not in procs]
    cfg = run["config"]
    head = str(
        _get(run["results"], "headline_procedure")
        or _get(run["results"], "report_procedure")
        or _get(cfg, "report.procedure")
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
    try:
        rows = theory.frontier(procedure, ["optimal"], ks)
        return {k: r.win_rate for k, r in zip(ks, rows, strict=False)}
    except (
        ValueError,
        RuntimeError,
    ) as err:  # the solver failed somewhere: keep the points it solves
        log.warning(
            "report: theory optimum for %s failed on part of the KL range: %s", procedure, err
        )
    out = {}
    for k in ks:
        try:
            out[k] = theory.optimal_policy(procedure, kl=k).win_rate(procedure)
        except (ValueError, RuntimeError):
            continue
    return out


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


_TRAIN_PANELS = (
    ("rl/reward_calibrated", "calibrated reward C (policy samples)"),
    ("rl/reward_transformed", "training reward Phi(C) (transformed)"),
    ("rl/kl_seq", "KL per sequence [nats]"),
)


def plot_training(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path | None:
    """Per-step training curves, one line per method x beta; None if there is nothing to plot."""
    panels = [(k, t) for k, t in _TRAIN_PANELS if any(k in m for v in runs.values() for m in v)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=False):
        for name, steps in runs.items():
            pts = [
                (m.get("rl/step", i), m[key])
                for i, m in enumerate(steps)
                if _num(m.get(key)) is not None
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


# --- the markdown report -------------------------------------------------------------------------

NA = "n/a"


def _f(x: Any, nd: int = 4) -> str:
    v = _num(x)
    return NA if v is None else f"{v:.{nd}f}"


def _g(x: Any) -> str:
    v = _num(x)
    return NA if v is None else f"{v:g}"


def _short_floats(text: str) -> str:
    """Long decimals inside a spec (``exp:12.633858298560305``) shown to 4 significant digits."""
    import re

    return re.sub(r"\d+\.\d{5,}(?:e[-+]?\d+)?", lambda m: f"{float(m.group()):.4g}", text)


def _ci(s: dict[str, float]) -> str:
    if "mean" not in s:
        return NA
    if "low" in s and "high" in s:
        return f"{s['mean']:.4f} [{s['low']:.4f}, {s['high']:.4f}]"
    return f"{s['mean']:.4f}"


def _kl_text(s: dict[str, float]) -> str:
    if "mean" not in s:
        return NA
    return f"{s['mean']:.4f} ± {s['stderr']:.4f}" if "stderr" in s else f"{s['mean']:.4f}"


def _results_table(
    run: dict[str, Any], procs: list[str], head: str, bounds: dict[float, float]
) -> list[str]:
    cols = ["method", "transform", "beta", "KL (nats) ± stderr"]
    cols += [f"{p} win rate [CI]" for p in procs]
    cols += [f"optimum at this KL, {head} (theory)", "tilt realised: slope / corr"]
    cols += ["mean reward", "mean length"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * 3 + "---:|" * (len(cols) - 3)]
    # grouped by method (in results order, reference last), KL ascending within a method
    names = list(dict.fromkeys(r["method"] for r in run["rows"]))
    names.sort(key=lambda m: m == "reference")
    order = [
        r
        for m in names
        for r in sorted(
            (r for r in run["rows"] if r["method"] == m), key=lambda r: r["kl"].get("mean", 0.0)
        )
    ]
    for r in order:
        tf = r["transform"] or ("(reference policy)" if r["method"] == "reference" else NA)
        if r["resolved"] and r["resolved"] != r["transform"]:
            tf = f"{tf} → {_short_floats(r['resolved'])}"
        bound = r["bound"].get(head)
        if bound is None and r["method"] != "reference":
            bound = bounds.get(r["kl"].get("mean", -1.0))
        cells = [r["method"], tf, _g(r["beta"]), _kl_text(r["kl"])]
        cells += [_ci(r["win"].get(p, {})) for p in procs]
        t = r["transfer"]
        tilt = NA if not t else f"{_f(t.get('slope'), 2)} / {_f(t.get('corr'), 2)}"
        cells += [_f(bound), tilt, _f(r["reward_mean"]), _f(r["length_mean"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _training_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys = [k for k, _ in _TRAIN_PANELS]
    lines = [
        "| run | steps logged | final calibrated reward | final transformed reward | final KL (nats) "
        "| wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, steps in runs.items():
        last = steps[-1]
        times = [t for m in steps if (t := _num(m.get("rl/time/step"))) is not None]
        cells = [name, str(len(steps)), *(_f(last.get(k)) for k in keys)]
        cells.append(f"{sum(times):.1f}" if times else NA)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pct(x: Any) -> str:
    v = _num(x)
    return NA if v is None else f"{100 * v:g}%"


def _settings(run: dict[str, Any]) -> list[tuple[str, str]]:
    cfg, man, refs = run["config"], run["manifest"], run["reference"]

    def c(key: str) -> str:
        v = _get(cfg, key)
        return NA if v is None else (", ".join(map(str, v)) if isinstance(v, list) else str(v))

    def ref(split: str, key: str) -> str:
        v = _get(refs.get(split, {}), key)
        return NA if v is None else str(v)

    tie = _num(_get(refs.get("train", {}), "tie_fraction"))
    methods = [
        f"{m.get('name')}: {m.get('transform')} at β ∈ {{{', '.join(_g(b) for b in m.get('betas', []))}}}"
        for m in cfg.get("methods") or []
        if isinstance(m, dict)
    ]
    versions = man.get("versions") or {}
    ref_model = _get(cfg, "reference_model.name")
    out = [
        ("seed", str(man.get("seed", _get(cfg, "seed", NA)))),
        ("git commit", str(man.get("git_commit") or NA)),
        (
            "model (policy init)",
            c("model.name") + (f" (dtype {c('model.dtype')}, LoRA r={c('model.lora_r')})"),
        ),
        ("reference model", ref_model or f"{c('model.name')} (the policy's initialisation)"),
        ("reward", f"{c('reward.kind')}: {c('reward.name')}"),
        ("train prompts", f"{ref('train', 'num_prompts')} from {c('prompts.train.source')}"),
        ("test prompts", f"{ref('test', 'num_prompts')} from {c('prompts.test.source')}"),
        (
            "K (reference samples per train prompt)",
            ref("train", "num_samples") if "train" in refs else c("reference.num_samples"),
        ),
        (
            "calibration",
            "smoothed (mid-rank)" if _get(cfg, "reference.smoothed") else "empirical CDF, ties 1/2",
        ),
        ("tied reference rewards (train)", NA if tie is None else f"{100 * tie:.1f}%"),
        (
            "sampling",
            f"temperature {c('sampling.temperature')}, top_p {c('sampling.top_p')}, max_new_tokens {c('sampling.max_new_tokens')}",
        ),
        ("M (RL samples per prompt, RLOO)", c("rl.samples_per_prompt")),
        (
            "RL",
            f"{c('rl.steps')} steps x {c('rl.prompts_per_step')} prompts, lr {c('rl.lr')}, PPO epochs {c('rl.ppo_epochs')}, std-normalised advantages {c('rl.normalize_std')}, seed {c('rl.seed')}",
        ),
        ("auto transforms resolved at", f"KL {c('rl.target_kl')} nats for {c('report.procedure')}"),
        ("methods x betas", "; ".join(methods) or NA),
        ("N / procedures evaluated", c("evaluate.procedures")),
        (
            "evaluation samples per test prompt",
            f"policy M = {c('evaluate.samples_per_prompt')}, reference M' = {ref('test', 'num_samples') if 'test' in refs else c('evaluate.reference_samples')}",
        ),
        (
            "intervals",
            f"{_pct(_get(cfg, 'evaluate.confidence'))} percentile bootstrap over test prompts ({c('evaluate.bootstrap')} resamples); KL ± standard error",
        ),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or NA),
        (
            "python / platform / CUDA",
            f"{man.get('python', NA)} / {man.get('platform', NA)} / "
            + (NA if "cuda" not in man else str(man["cuda"] or "none")),
        ),
        ("manifest written", f"{man.get('time', NA)} by `{man.get('command', NA)}`"),
    ]
    return out


def _reproduce(run: dict[str, Any]) -> str:
    import shlex

    man = run["manifest"]
    if isinstance(man.get("reproduce"), str):
        return str(man["reproduce"])
    argv = man.get("argv") or []
    if man.get("command") == "run" and isinstance(argv, list) and "run" in argv[1:]:
        return "infalign " + shlex.join(str(a) for a in argv[argv.index("run", 1) :])
    return f"infalign run {shlex.quote(str(run['dir'] / 'config.yaml'))} --out NEW_RUN_DIR"


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

    title = _get(run["config"], "report.title") or "infalign report"
    conf = _num(_get(run["results"], "confidence")) or _num(
        _get(run["config"], "evaluate.confidence")
    )
    md = [
        f"# {title}",
        "",
        f"Run directory: `{d}`. Every measured number below is read from the "
        "run's artifacts; numbers marked *theory* are computed in calibrated space.",
        "",
    ]
    missing = _get(run["results"], "missing") or []
    if _get(run["results"], "complete") is False or missing:
        md += [
            f"> **Incomplete run**: no results yet for {', '.join(map(str, missing)) or 'some rows'}.",
            "",
        ]
    md += [f"## {head} win rate vs KL", "", "![win rate vs KL](winrate_vs_kl.png)", ""]
    md += ["## Results", ""]
    md += _results_table(run, procs, head, bounds)
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
    n_test = _get(run["reference"].get("test", {}), "num_prompts")
    if isinstance(n_test, int) and n_test < SMALL_TEST_SET:
        md += [
            f"> **Only {n_test} test prompts.** A bootstrap over so few prompts gives intervals "
            "that are too narrow; read these win rates as rough (even the reference row can land "
            "far from 1/2).",
            "",
        ]
    md += ["## Training", ""]
    if training is not None:
        md += ["![training curves](training.png)", "", *_training_table(run["training"]), ""]
    else:
        md += ["No training metrics (`train/*/beta=*/metrics.jsonl`) found.", ""]
    md += ["## How to read this", "", HOW_TO_READ, ""]
    md += ["## Settings", "", "| setting | value |", "|---|---|"]
    md += [f"| {k} | {v.replace('|', '/')} |" for k, v in _settings(run)]
    md += ["", "## Reproduce", "", "```", _reproduce(run), f"infalign report {d}", "```", ""]
    path = d / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
