"""The report's tables in markdown, from the normalised rows of :func:`infalign.run.report.load_run`:
the results table (one row per evaluated policy), the training table, the settings table and the
command that reproduces the run. Missing values show as ``n/a``; nothing is recomputed here.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

from infalign.run.plots import TRAIN_PANELS

__all__ = ["NA", "get", "num", "reproduce", "results_table", "settings", "training_table"]

NA = "n/a"


def num(x: Any) -> float | None:
    """A finite float from a number or a {"mean": ...} dict, else None."""
    if isinstance(x, dict):
        x = x.get("mean")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def get(d: Any, dotted: str, default: Any = None) -> Any:
    """``d[a][b]...`` for ``dotted`` = "a.b...", or ``default`` where a key is missing."""
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _f(x: Any, nd: int = 4) -> str:
    v = num(x)
    return NA if v is None else f"{v:.{nd}f}"


def _g(x: Any) -> str:
    v = num(x)
    return NA if v is None else f"{v:g}"


def _short_floats(text: str) -> str:
    """Long decimals inside a spec (``exp:12.633858298560305``) shown to 4 significant digits."""
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


def results_table(
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


def training_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys = [k for k, _ in TRAIN_PANELS]
    lines = [
        "| run | steps logged | final calibrated reward | final transformed reward | final KL (nats) "
        "| wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, steps in runs.items():
        last = steps[-1]
        times = [t for m in steps if (t := num(m.get("rl/time/step"))) is not None]
        cells = [name, str(len(steps)), *(_f(last.get(k)) for k in keys)]
        cells.append(f"{sum(times):.1f}" if times else NA)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pct(x: Any) -> str:
    v = num(x)
    return NA if v is None else f"{100 * v:g}%"


def settings(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's settings table: (setting, value) rows from the run's config, manifest and
    reference artifacts (``NA`` where a value is missing)."""
    cfg, man, refs = run["config"], run["manifest"], run["reference"]

    def c(key: str) -> str:
        v = get(cfg, key)
        return NA if v is None else (", ".join(map(str, v)) if isinstance(v, list) else str(v))

    def ref(split: str, key: str) -> str:
        v = get(refs.get(split, {}), key)
        return NA if v is None else str(v)

    return [
        ("seed", str(man.get("seed", get(cfg, "seed", NA)))),
        ("git commit", str(man.get("git_commit") or NA)),
        *_data_settings(cfg, refs, c, ref),
        *_training_settings(cfg, c),
        (
            "evaluation samples per test prompt",
            f"policy M = {c('evaluate.samples_per_prompt')}, reference M' = {ref('test', 'num_samples') if 'test' in refs else c('evaluate.reference_samples')}",
        ),
        (
            "intervals",
            f"{_pct(get(cfg, 'evaluate.confidence'))} percentile bootstrap over test prompts ({c('evaluate.bootstrap')} resamples); KL ± standard error",
        ),
        *_environment_settings(man),
    ]


def _data_settings(cfg: Any, refs: Any, c: Any, ref: Any) -> list[tuple[str, str]]:
    """Models, reward, prompts, reference samples, calibration and sampling rows."""
    tie = num(get(refs.get("train", {}), "tie_fraction"))
    ref_model = get(cfg, "reference_model.name")
    return [
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
            "smoothed (mid-rank)" if get(cfg, "reference.smoothed") else "empirical CDF, ties 1/2",
        ),
        ("tied reference rewards (train)", NA if tie is None else f"{100 * tie:.1f}%"),
        (
            "sampling",
            f"{c('sampling.backend')} backend, temperature {c('sampling.temperature')}, top_p {c('sampling.top_p')}, top_k {c('sampling.top_k')}, max_new_tokens {c('sampling.max_new_tokens')}",
        ),
    ]


def _training_settings(cfg: Any, c: Any) -> list[tuple[str, str]]:
    """The RL algorithm, its budget and the methods x betas rows."""
    methods = [
        f"{m.get('name')}: {m.get('transform')} at β ∈ {{{', '.join(_g(b) for b in m.get('betas', []))}}}"
        for m in cfg.get("methods") or []
        if isinstance(m, dict)
    ]
    return [
        ("M (RL samples per prompt)", c("rl.samples_per_prompt")),
        (
            "RL",
            f"{c('rl.algorithm')}: {c('rl.steps')} steps x {c('rl.prompts_per_step')} prompts, lr {c('rl.lr')}, PPO epochs {c('rl.ppo_epochs')}, on-policy samples {c('rl.onpolicy_samples')}, std-normalised advantages {c('rl.normalize_std')}, seed {c('rl.seed')}",
        ),
        ("auto transforms resolved at", f"KL {c('rl.target_kl')} nats for {c('report.procedure')}"),
        ("methods x betas", "; ".join(methods) or NA),
        ("N / procedures evaluated", c("evaluate.procedures")),
    ]


def _environment_settings(man: dict[str, Any]) -> list[tuple[str, str]]:
    """Versions, platform and the command that wrote the manifest."""
    versions = man.get("versions") or {}
    return [
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or NA),
        (
            "python / platform / CUDA",
            f"{man.get('python', NA)} / {man.get('platform', NA)} / "
            + (NA if "cuda" not in man else str(man["cuda"] or "none")),
        ),
        ("manifest written", f"{man.get('time', NA)} by `{man.get('command', NA)}`"),
    ]


def reproduce(run: dict[str, Any]) -> str:
    man = run["manifest"]
    argv = man.get("argv") or []
    if man.get("command") == "run" and isinstance(argv, list) and "run" in argv[1:]:
        return "infalign " + shlex.join(str(a) for a in argv[argv.index("run", 1) :])
    return f"infalign run {shlex.quote(str(run['dir'] / 'config.yaml'))} --out NEW_RUN_DIR"
