"""``results.json``: one row per finished evaluation made with the run's config (every method x beta
of the sweep, other betas of its methods evaluated one by one, and pi_ref), ``complete`` and the
rows still ``missing``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from infalign.run.config import MethodConfig, RunConfig
from infalign.run.io import atomic_write_json, read_json
from infalign.run.keys import config_diff, eval_key, plain
from infalign.run.runs import (
    MANIFEST,
    REFERENCE_ROW,
    RunEnv,
    beta_name,
    eval_dir,
    read_stage,
    sweep,
)

__all__ = ["format_table", "results_row", "write_results"]

log = logging.getLogger(__name__)


def results_row(
    env: RunEnv, method: MethodConfig | None, beta: float | None
) -> dict[str, Any] | None:
    """The results row of one finished eval dir, or None if it is missing, unfinished or was made
    with another stage key than this config's (then a warning names the differing field)."""
    cfg = env.cfg
    d = eval_dir(cfg, None if method is None else method.name, beta)
    if not (d / "eval.json").is_file() or not (d / MANIFEST).is_file():
        return None
    what = str(d.relative_to(cfg.out))
    manifest = read_stage(what, d, lambda: read_json(d / MANIFEST))
    if manifest.get("status") != "done":
        return None
    diff = config_diff(manifest.get("config"), plain(eval_key(env, method, beta)))
    if diff is not None:
        log.warning("results: leaving out %s, made with %s=%r (now %r)", d, *diff)
        return None
    e = read_stage(what, d, lambda: read_json(d / "eval.json"))
    pick = ("mean", "low", "high", "stderr")
    return {
        "method": REFERENCE_ROW if method is None else method.name,
        "transform": None if method is None else method.transform,
        "resolved_transform": e["policy"].get("resolved_transform"),
        "beta": beta,
        "kl": {k: e["kl"][k] for k in pick},
        "win_rate": {p: {k: w[k] for k in pick} for p, w in e["win_rate"].items()},
        "standard_win_rate": {k: e["standard_win_rate"][k] for k in pick},
        "theory_bound": {p: b["win_rate"] for p, b in e["theory_bound"].items()},
        "transfer": e.get("transfer"),
        "reward_mean": e["reward"]["mean"],
        "length_mean": e["length"]["mean"],
        "eval": str((d / "eval.json").relative_to(cfg.out)),
        "train": e["policy"].get("train_dir"),
    }


def _betas_on_disk(cfg: RunConfig, method: MethodConfig) -> list[float]:
    """The sweep's betas of ``method`` and any other beta evaluated under ``eval/<method>/``."""
    betas = {float(b) for b in method.betas}
    root = Path(cfg.out) / "eval" / method.name
    for d in root.glob("beta=*") if root.is_dir() else []:
        try:
            betas.add(float(d.name.removeprefix("beta=")))
        except ValueError:
            continue
    return sorted(betas)


def write_results(cfg: RunConfig, env: RunEnv | None = None) -> dict[str, Any]:
    """Collect the rows into ``results.json`` (returned). ``env``: the command's resources (for
    the stage keys' input hashes); a fresh :class:`~infalign.run.runs.RunEnv` if None."""
    from infalign.core.procedures import parse_procedure

    env = RunEnv(cfg) if env is None else env
    rows, missing = [], []
    for m in sweep(cfg):
        swept = {float(b) for b in m.betas}
        for b in _betas_on_disk(cfg, m):
            r = results_row(env, m, b)
            if r is not None:
                rows.append(r)
            elif b in swept:
                missing.append(f"{m.name}/{beta_name(b)}")
    ref = results_row(env, None, None)
    if ref is None:
        missing.append(REFERENCE_ROW)
    else:
        rows.append(ref)
    results = {
        "procedures": [parse_procedure(p).spec() for p in cfg.evaluate.procedures],
        "headline_procedure": parse_procedure(cfg.report.procedure).spec(),
        "confidence": cfg.evaluate.confidence,
        "complete": not missing,
        "missing": missing,
        "rows": rows,
    }
    atomic_write_json(Path(cfg.out) / "results.json", results)
    return results


def _fmt_ci(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def format_table(rows: list[dict[str, Any]], procedures: list[str]) -> str:
    """results.json's rows as an aligned text table: method, beta, KL +- stderr, the standard win
    rate and each procedure's, as mean [low, high]."""
    head = ["method", "beta", "KL (nats)", "standard", *procedures]
    table = [head]
    for r in rows:
        kl = r["kl"]
        se = "" if kl.get("stderr") is None else f" ± {kl['stderr']:.3f}"
        beta = "-" if r["beta"] is None else f"{r['beta']:g}"
        wins = [_fmt_ci(r["win_rate"].get(p)) for p in procedures]
        table.append(
            [r["method"], beta, f"{kl['mean']:.3f}{se}", _fmt_ci(r["standard_win_rate"]), *wins]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table)
    return "\n".join(line.rstrip() for line in lines)
