"""Tables and figures of the claims sweep (``python benchmarks/claims.py summarize``).

Per seed, each method family's win rate is interpolated linearly in log KL at ``AT`` (only inside that
seed's measured KL range); across seeds: the mean and a 95% Student-t interval (S - 1 degrees of
freedom); paired per-seed differences between families the same way. Writes ``docs/results/claims-*``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from claims import FAMILIES, KLS, LOG_SPEC, RESULTS, SEEDS, TASK_PROC, UNITS, _kl_tag, methods

AT = (0.12, 0.18, 0.25, 0.5, 1.0)  # KLs the tables interpolate at (measured KL)


def _family(method: str) -> str:
    return method.split("-kl")[0]


def load_rows(task: str, algorithm: str) -> dict[int, list[dict[str, Any]]]:
    """{seed: results rows} from the committed unit summaries of one task and algorithm."""
    rows: dict[int, list[dict[str, Any]]] = {}
    for f in sorted((UNITS / task / algorithm).glob("seed*/*.json")):
        u = json.loads(f.read_text())
        if u.get("row"):
            rows.setdefault(int(u["unit"]["seed"]), []).append(u["row"])
    return rows


def load_units(task: str, algorithm: str) -> list[dict[str, Any]]:
    return [
        json.loads(f.read_text()) for f in sorted((UNITS / task / algorithm).glob("seed*/*.json"))
    ]


def compute(task: str, algorithm: str, jobs: int = 2) -> dict[str, Any]:
    """How much of the main sweep (``len(SEEDS)`` seeds x (pi_ref + every family's betas)) has
    finished, and its wall time at ``jobs`` workers projected from the median unit (robust to units
    whose clock ran while the sweep was paused), and the finished units' summed seconds (one thread
    each) in hours."""
    units = load_units(task, algorithm)
    main = [
        u for u in units if u["unit"]["job"] is None or _family(u["unit"]["job"][0]) in FAMILIES
    ]
    n_all = len(SEEDS) * (1 + sum(len(m["betas"]) for m in methods(task, KLS, 1.0)))
    med = float(np.median([u["seconds"] for u in main if u["unit"]["job"] is not None] or [np.nan]))
    return {
        "units_done": len(main),
        "units_all": n_all,
        "median_unit_seconds": med,
        "unit_hours": sum(u["seconds"] for u in main if u["unit"]["job"] is not None) / 3600,
        "jobs": jobs,
        "projected_hours": n_all * med / jobs / 3600,
    }


def algorithms(task: str) -> list[str]:
    base = UNITS / task
    return sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []


def curves(rows: list[dict[str, Any]], proc: str) -> dict[str, np.ndarray]:
    """{family: (n, 3) [kl, win(proc), win(sample)] sorted by KL} from one seed's rows."""
    acc: dict[str, list[list[float]]] = {}
    for r in rows:
        if r["method"] == "reference":
            continue
        w = r["win_rate"][proc]["mean"]
        acc.setdefault(_family(r["method"]), []).append(
            [r["kl"]["mean"], w, r["standard_win_rate"]["mean"]]
        )
    return {f: np.array(sorted(v)) for f, v in acc.items()}


def interp(c: np.ndarray, at: float, col: int) -> float:
    """Linear interpolation of column ``col`` in log KL; NaN outside the measured KL range."""
    kl = c[:, 0]
    if c.shape[0] < 2 or not (kl.min() <= at <= kl.max()):
        return float("nan")
    order = np.argsort(kl)
    return float(np.interp(math.log(at), np.log(kl[order]), c[order, col]))


def t_interval(x: np.ndarray) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values: 95% Student-t interval across seeds."""
    from scipy import stats

    x = x[np.isfinite(x)]
    if x.size == 0:
        return (float("nan"), float("nan"), float("nan"), 0)
    m = float(x.mean())
    if x.size == 1:
        return m, float("nan"), float("nan"), 1
    h = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - h, m + h, int(x.size)


def paired_diff(
    per_seed: list[dict[str, np.ndarray]], a: str, b: str, at: Sequence[float], col: int
) -> list[tuple[float, float, float, int]]:
    """a - b paired by seed: per seed, both curves interpolated at each KL of ``at`` (column ``col``),
    then the t-interval over the seeds that have both there."""
    d = np.array(
        [
            [
                interp(c[a], k, col) - interp(c[b], k, col) if a in c and b in c else np.nan
                for k in at
            ]
            for c in per_seed
        ]
    )
    return [t_interval(d[:, j]) for j in range(len(at))]


def _fmt(m: float, lo: float, hi: float, n: int, nd: int = 3) -> str:
    if not math.isfinite(m):
        return "—"
    if not math.isfinite(lo):
        return f"{m:.{nd}f} (n={n})"
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}] (n={n})"


def summarize_task(task: str) -> dict[str, Any]:
    """The claims summary of one task over every algorithm with unit summaries; methods are named
    ``<family>@<algorithm>``; differences are paired by seed within an algorithm."""
    from infalign import theory

    proc, fam = TASK_PROC[task]
    algos = algorithms(task)
    per_algo = {a: load_rows(task, a) for a in algos}
    per_algo = {a: r for a, r in per_algo.items() if r}
    if not per_algo:
        return {}
    table: dict[str, Any] = {}
    diffs: dict[str, Any] = {}
    seeds: dict[str, list[int]] = {}
    points: dict[str, Any] = {}
    ref: list[tuple[float, float]] = []
    transfer: dict[str, Any] = {}
    for algo, per_seed in per_algo.items():
        seeds[algo] = sorted(per_seed)
        cs = {s: curves(rows, proc) for s, rows in per_seed.items()}
        fams = [f for f in FAMILIES if any(f in c for c in cs.values())]
        fams += sorted({f for c in cs.values() for f in c} - set(fams))
        for f in fams:
            key = f"{f}@{algo}"
            for col, what in ((1, proc), (2, "sample")):
                vals = np.array(
                    [[interp(c[f], k, col) if f in c else np.nan for k in AT] for c in cs.values()]
                )
                table.setdefault(key, {})[what] = [t_interval(vals[:, j]) for j in range(len(AT))]
            tr = [
                r["transfer"]
                for rows in per_seed.values()
                for r in rows
                if _family(r["method"]) == f and r.get("transfer")
            ]
            if tr:
                transfer[key] = {k: float(np.mean([t[k] for t in tr])) for k in ("slope", "corr")}
        pairs = [("exp", "identity"), ("exp", "raw"), ("identity", "raw")]
        pairs += [("optimal", "identity"), ("log", "identity")]
        pairs += [(f, "identity") for f in fams if f not in FAMILIES]
        for a, b in pairs:
            for col, what in ((1, proc), (2, "sample")):
                diffs[f"{a}@{algo} - {b}@{algo} [{what}]"] = paired_diff(
                    list(cs.values()), a, b, AT, col
                )
        points[algo] = {str(s): {f: c[f].tolist() for f in c} for s, c in cs.items()}
        ref += [
            (r["win_rate"][proc]["mean"], r["standard_win_rate"]["mean"])
            for rows in per_seed.values()
            for r in rows
            if r["method"] == "reference"
        ]
    bound = {k: float(theory.optimal_policy(proc, kl=k).win_rate(proc)) for k in AT}
    predicted = {}
    for spec in ("identity", f"{fam}:auto", LOG_SPEC):
        rows = theory.frontier(proc, [spec], list(AT))
        predicted[spec] = {r.kl: r.win_rate for r in rows}
    gap = {
        key: [
            bound[k] - x[0] if math.isfinite(x[0]) else float("nan")
            for k, x in zip(AT, d[proc], strict=True)
        ]
        for key, d in table.items()
    }
    return {
        "task": task,
        "procedure": proc,
        "seeds": seeds,
        "at_kl": AT,
        "table": table,
        "diffs": diffs,
        "bound": bound,
        "gap": gap,
        "transfer": transfer,
        "predicted": {k: {f"{kk:g}": v for kk, v in d.items()} for k, d in predicted.items()},
        "reference": ref,
        "points": points,
        "compute": {a: compute(task, a) for a in per_algo},
    }


def _label(task: str, key: str) -> str:
    """``exp@algo`` reads ``negexp@algo`` for a worst-of-n task (its family is negexp:auto@k)."""
    fam, _, algo = key.partition("@")
    name = TASK_PROC[task][1] if fam == "exp" else fam
    return f"{name}@{algo}" if algo else name


def markdown(summary: dict[str, Any]) -> str:
    task, proc, at = summary["task"], summary["procedure"], summary["at_kl"]
    head = " | ".join(f"KL {k:g}" for k in at)
    seeds = "; ".join(f"{a}: seeds {s}" for a, s in summary["seeds"].items())
    lines = [
        f"![{task}: win rate vs KL](results/claims-{task}.png)",
        "",
        f"**{task} / {proc}** ({seeds}): win rate interpolated at each KL, mean [95% t-interval "
        "over seeds] (n = seeds with a point there); — where the KL is outside every seed's "
        "measured range.",
        "",
        *(
            f"Sweep `{a}`: {c['units_done']} of {c['units_all']} units finished; a unit (train + "
            f"evaluate, one thread) takes {c['median_unit_seconds'] / 60:.0f} min (median), so the "
            f"whole sweep is about {c['projected_hours']:.0f} h of wall time at {c['jobs']} workers; "
            f"the finished units took {c['unit_hours']:.1f} unit-hours."
            for a, c in summary.get("compute", {}).items()
        ),
        "",
        f"| method | win rate | {head} | tilt realised (slope / corr) |",
        "|---|---|" + "---|" * len(at) + "---|",
    ]
    for f, d in summary["table"].items():
        t = summary.get("transfer", {}).get(f)
        tilt = f"{t['slope']:.2f} / {t['corr']:.2f}" if t else "—"
        for what in (proc, "sample"):
            cells = " | ".join(_fmt(*x) for x in d[what])
            lines.append(
                f"| {_label(task, f)} | {what} | {cells} | {tilt if what == proc else ''} |"
            )
    ref = np.array(summary["reference"])
    for j, what in ((0, proc), (1, "sample")):
        r = _fmt(*t_interval(ref[:, j]))
        lines.append(
            f"| *pi_ref itself (KL 0; truth 0.5)* | {what} | " + " | ".join([r] * len(at)) + " | |"
        )
    cells = " | ".join(f"{summary['bound'][k]:.3f}" for k in at)
    lines.append(f"| *theory optimum* | {proc} | {cells} | |")
    for spec, d in summary["predicted"].items():
        cells = " | ".join(f"{d[f'{k:g}']:.3f}" if f"{k:g}" in d else "—" for k in at)
        lines.append(f"| *theory {spec}* | {proc} | {cells} | |")
    lines += ["", f"Gap to the calibrated-space optimum ({proc}, bound minus mean measured):", ""]
    lines += [f"| method | {head} |", "|---|" + "---|" * len(at)]
    for f, g in summary["gap"].items():
        lines.append(
            f"| {_label(task, f)} | "
            + " | ".join(f"{x:.3f}" if math.isfinite(x) else "—" for x in g)
            + " |"
        )
    lines += [
        "",
        f"Paired differences (per seed, then across seeds), {proc} and standard win rate:",
        "",
    ]
    lines += [f"| difference | {head} |", "|---|" + "---|" * len(at)]
    for name, d in summary["diffs"].items():
        pair, what = name.rsplit(" [", 1)
        a, b = pair.split(" - ")
        lines.append(
            f"| {_label(task, a)} - {_label(task, b)} [{what} | "
            + " | ".join(_fmt(*x) for x in d)
            + " |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infalign import theory

    task, proc = summary["task"], summary["procedure"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = (
        "tab:gray",
        "tab:blue",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:orange",
        "tab:brown",
        "tab:pink",
    )
    fams = sorted({f for pts in summary["points"].values() for c in pts.values() for f in c})
    colors = {f: palette[i % len(palette)] for i, f in enumerate(fams)}
    styles = {a: m for a, m in zip(sorted(summary["points"]), ("o-", "s--", "^:"), strict=False)}
    grid = np.geomspace(0.05, 3.0, 40)
    for ax, col, what in ((axes[0], 1, proc), (axes[1], 2, "sample")):
        labelled: set[str] = set()
        for algo, per_seed in summary["points"].items():
            for fams_pts in per_seed.values():
                for f, pts in fams_pts.items():
                    p = np.array(pts)
                    key = _label(task, f"{f}@{algo}")
                    ax.plot(
                        p[:, 0],
                        p[:, col],
                        styles.get(algo, "o-"),
                        color=colors[f],
                        alpha=0.55,
                        ms=4,
                        lw=1,
                        label=None if key in labelled else key,
                    )
                    labelled.add(key)
        best = theory.frontier(proc, ["optimal"], grid) if what == proc else None
        best = best or theory.frontier("sample", ["identity"], grid)
        ax.plot(
            [r.kl for r in best], [r.win_rate for r in best], "k--", lw=1.2, label="theory optimum"
        )
        ax.set_xscale("log")
        ax.set_xlabel("measured KL(pi || pi_ref) per sequence [nats]")
        ax.set_ylabel(f"{what} win rate vs pi_ref")
        ax.axhline(0.5, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    n = ", ".join(f"{a}: {len(s)} seeds" for a, s in summary["seeds"].items())
    fig.suptitle(f"{task}: measured win rate vs KL ({n}; one line per seed and method)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_rows(out: Path, task: str, k: int | None = None) -> dict[int, list[dict[str, Any]]]:
    """{seed: results.json rows} of the first (RLOO) sweep's run directories ``out/<task>[-K<k>]``,
    which the K and steps ablations read."""
    base = out / (task if k is None else f"{task}-K{k}")
    rows = {}
    for d in sorted(base.glob("seed*")):
        f = d / "results.json"
        if f.is_file():
            rows[int(d.name.removeprefix("seed"))] = json.loads(f.read_text())["rows"]
    return rows


def summarize_k(out: Path, task: str, ks: list[int], kl: float) -> str:
    proc = TASK_PROC[task][0]
    lines = [f"| K | {proc} win rate | standard win rate | KL | seeds |", "|---|---|---|---|---|"]
    for k in ks:
        per_seed = run_rows(out, task, None if k == 64 else k)
        name = f"exp-{_kl_tag(kl)}"
        rows = [r for rs in per_seed.values() for r in rs if r["method"] == name]
        if not rows:
            continue
        w = t_interval(np.array([r["win_rate"][proc]["mean"] for r in rows]))
        sw = t_interval(np.array([r["standard_win_rate"]["mean"] for r in rows]))
        kv = t_interval(np.array([r["kl"]["mean"] for r in rows]))
        lines.append(f"| {k} | {_fmt(*w)} | {_fmt(*sw)} | {_fmt(*kv, nd=2)} | {len(rows)} |")
    return "\n".join(lines)


_TAIL_KEYS = (
    "rl/kl_seq",
    "rl/reward_calibrated",
    "rl/reward_transformed",
    "rl/onpolicy_reward",
    "rl/fit_slope",
    "rl/fit_corr",
)


def _mean(values: list[Any]) -> float:
    v = [x for x in values if isinstance(x, (int, float))]
    return float(np.mean(v)) if v else float("nan")


def _num(x: float, nd: int) -> str:
    return f"{x:.{nd}f}" if math.isfinite(x) else "—"


def train_vs_test(task: str) -> str:
    """Where the gap arises, from the unit summaries: per method, averaged over seeds and betas, the
    last 5 training steps (RLOO: on-policy KL and E[u]; regression: the fit of the log-ratio to the
    target on the step's reference samples, and the training reward R of its fresh policy samples)
    against the held-out KL, standard win rate (= E[u] against fresh pi_ref samples) and the tilt
    realised on the held-out pool."""
    lines = [
        "| method | runs | train KL (RLOO) | train E[u] (RLOO) | train fit slope / corr (regression) "
        "| train R of policy samples | test KL | test E[u] | held-out tilt slope / corr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in algorithms(task):
        acc: dict[str, list[dict[str, Any]]] = {}
        for u in load_units(task, algo):
            if u.get("train") and u.get("row"):
                acc.setdefault(_family(u["row"]["method"]), []).append(u)
        rloo = algo.startswith("rloo")
        for fam, us in acc.items():
            tail = {k: _mean([u["train"]["tail"].get(k) for u in us]) for k in _TAIL_KEYS}
            tr = {
                k: _mean([(u["row"].get("transfer") or {}).get(k) for u in us])
                for k in ("slope", "corr")
            }
            fit = (
                "—" if rloo else f"{_num(tail['rl/fit_slope'], 2)} / {_num(tail['rl/fit_corr'], 2)}"
            )
            r_pol = tail["rl/reward_transformed"] if rloo else tail["rl/onpolicy_reward"]
            lines.append(
                f"| {_label(task, f'{fam}@{algo}')} | {len(us)} "
                f"| {_num(tail['rl/kl_seq'], 2) if rloo else '—'} "
                f"| {_num(tail['rl/reward_calibrated'], 3) if rloo else '—'} | {fit} "
                f"| {_num(r_pol, 3)} "
                f"| {_num(_mean([u['row']['kl']['mean'] for u in us]), 2)} "
                f"| {_num(_mean([u['row']['standard_win_rate']['mean'] for u in us]), 3)} "
                f"| {_num(tr['slope'], 2)} / {_num(tr['corr'], 2)} |"
            )
    return "\n".join(lines)


def trainprompt_gap(task: str) -> str:
    """Held-out vs training prompts, unit by unit, for every unit that ``claims.py eval-train``
    re-evaluated (``seed<s>/trainprompts/<unit>.json``): KL, win rate under the task's procedure
    and the gap to the calibrated-space optimum at that KL (the row's ``theory_bound``; — past the
    grid's reach, where the bound is within 1e-4 of 1)."""
    proc = TASK_PROC[task][0]

    def cells(row: dict[str, Any]) -> str:
        kl, w = row["kl"]["mean"], row["win_rate"][proc]["mean"]
        if row["method"] == "reference":
            return f"0 | {w:.3f} | —"
        b = (row.get("theory_bound") or {}).get(proc)
        return f"{kl:.3g} | {w:.3f} | {'—' if b is None else f'{b - w:.3f}'}"

    lines = [
        f"| seed | method | beta | held-out KL | {proc} | gap | training-prompt KL | {proc} | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for algo in algorithms(task):
        for f in sorted((UNITS / task / algo).glob("seed*/trainprompts/*.json")):
            held = json.loads((f.parent.parent / f.name).read_text())["row"]
            train = json.loads(f.read_text())["row"]
            name = held["method"] if held["method"] == "reference" else _family(held["method"])
            beta = "—" if held.get("beta") is None else f"{held['beta']:.4g}"
            lines.append(
                f"| {f.parent.parent.name[4:]} | {_label(task, f'{name}@{algo}')} | {beta} "
                f"| {cells(held)} | {cells(train)} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _last(d: Path, train: str, key: str, last: int = 5) -> float:
    lines = (d / train / "metrics.jsonl").read_text().splitlines()
    return float(np.mean([json.loads(x)[key] for x in lines if x.strip()][-last:]))


def summarize_steps(out: Path, task: str, kl: float, seed: int = 0) -> str:
    """identity and exp at the ``kl`` target: the sweep's 30 steps vs the ``ablate-steps`` runs."""
    from infalign import theory

    proc = TASK_PROC[task][0]
    lines = [
        f"| steps | lr | method | beta | test KL | {proc} win rate [95% CI] | standard win rate "
        f"[95% CI] | train E[u] (last 5 steps) | train KL | {proc} optimum at test KL (theory) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [(30, 1e-4, out / task / f"seed{seed}")]
    for d in sorted(out.glob(f"{task}-steps*-lr*")):
        n_steps, lr_text = d.name.removeprefix(f"{task}-steps").split("-lr")
        runs.append((int(n_steps), float(lr_text), d / f"seed{seed}"))
    want = {"identity": None, f"exp-{_kl_tag(kl)}": None}
    idt_beta = next(m["betas"][0] for m in methods(task, (kl,), 1.0) if m["name"] == "identity")
    for steps, lr, d in runs:
        f = d / "results.json"
        if not f.is_file():
            continue
        for r in json.loads(f.read_text())["rows"]:
            if r["method"] not in want or (r["method"] == "identity" and r["beta"] != idt_beta):
                continue
            w, sw = r["win_rate"][proc], r["standard_win_rate"]
            lines.append(
                f"| {steps} | {lr:g} | {r['method']} | {r['beta']:g} | {r['kl']['mean']:.2f} "
                f"| {w['mean']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
                f"| {sw['mean']:.3f} [{sw['low']:.3f}, {sw['high']:.3f}] "
                f"| {_last(d, r['train'], 'rl/reward_calibrated'):.3f} "
                f"| {_last(d, r['train'], 'rl/kl_seq'):.2f} "
                f"| {theory.optimal_policy(proc, kl=r['kl']['mean']).win_rate(proc):.3f} |"
            )
    return "\n".join(lines)


GUIDANCE = (
    Path(__file__).resolve().parents[1] / "infalign" / "assets" / "measured" / "t_guidance.json"
)


def t_guidance(summary: dict[str, Any], algo: str = "regression") -> dict[str, Any] | None:
    """The t ablation of one task (``ablate-t``: exp:t / negexp:t for fixed t, next to the theory's
    t of ``exp:auto@k``): per KL of ``at_kl``, each t's paired difference to identity (mean, low,
    high, seeds) over the ablation's own seeds, the theory's t included (the sweep's tables hold
    exp:auto on every seed; here it is compared on the same seeds as the fixed t's), and the
    measured best t (largest mean difference among the ts with a point there). None without
    ablation units. ``infalign solve`` prints it beside the exact answer."""
    from infalign import theory

    task, proc, at = summary["task"], summary["procedure"], summary["at_kl"]
    fam = TASK_PROC[task][1]  # exp:t units are named exp<t>, negexp:t units negexp<t>
    found = (re.fullmatch(rf"{fam}(\d+(?:\.\d+)?)@{algo}", k) for k in summary["table"])
    ts = sorted(float(m.group(1)) for m in found if m)
    if not ts:
        return None
    names = {f"{fam}{t:g}" for t in ts}
    pts = [
        {f: np.array(v) for f, v in c.items()}
        for c in summary["points"][algo].values()
        if names & set(c)
    ]
    seeds = sorted(int(s) for s, c in summary["points"][algo].items() if names & set(c))

    def diff(unit: str) -> list[list[float]]:
        return [list(x) for x in paired_diff(pts, unit, "identity", at, 1)]

    vs = {f"{t:g}": diff(f"{fam}{t:g}") for t in ts}
    vs["theory"] = diff("exp")
    best: dict[str, str | None] = {}
    for j, k in enumerate(at):
        means = {name: d[j][0] for name, d in vs.items() if math.isfinite(d[j][0])}
        best[f"{k:g}"] = max(means, key=lambda n: means[n]) if means else None
    from infalign.core.transforms import auto_family

    family = auto_family(f"{fam}:auto")
    theory_t = {f"{k:g}": float(theory.best_t(family, proc, k)) for k in at}
    return {
        "task": task,
        "family": fam,
        "algorithm": algo,
        "seeds": seeds,
        "at_kl": list(at),
        "vs_identity": vs,
        "best": best,
        "theory_t": theory_t,
    }


def _finite(x: Any) -> Any:
    """NaN / inf -> None, recursively (strict JSON for the shipped file)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def t_markdown(g: dict[str, Any]) -> str:
    proc, fam = TASK_PROC[g["task"]][0], g["family"]
    head = " | ".join(f"KL {k:g}" for k in g["at_kl"])
    lines = [
        f"**{g['task']} / {proc}, {fam}:t under `{g['algorithm']}`** (seeds {g['seeds']}): "
        f"{proc} win rate minus calibrated identity's at matched KL, mean [95% t-interval] (n); "
        "— where a run did not reach that KL.",
        "",
        f"| transform | {head} |",
        "|---|" + "---|" * len(g["at_kl"]),
    ]
    for name, d in g["vs_identity"].items():
        label = f"{fam}:auto (theory's t)" if name == "theory" else f"{fam}:{name}"
        lines.append(f"| {label} | " + " | ".join(_fmt(*x) for x in d) + " |")
    cells = " | ".join(f"{g['theory_t'][f'{k:g}']:.3g}" for k in g["at_kl"])
    lines.append(f"| *theory's t at that KL* | {cells} |")
    best = " | ".join(str(g["best"][f"{k:g}"] or "—") for k in g["at_kl"])
    lines.append(f"| *measured best t* | {best} |")
    return "\n".join(lines)


def splice(doc: Path, name: str, text: str) -> bool:
    """Replace what stands between ``<!-- name -->`` and ``<!-- /name -->`` in ``doc`` by ``text``;
    False (nothing written) where the markers are missing."""
    if not doc.is_file():
        return False
    body, begin, end = doc.read_text(), f"<!-- {name} -->", f"<!-- /{name} -->"
    i, j = body.find(begin), body.find(end)
    if i < 0 or j < i:
        return False
    doc.write_text(body[: i + len(begin)] + "\n" + text.strip() + "\n" + body[j:])
    return True


def cmd_summarize(a: argparse.Namespace) -> None:
    """Write docs/results/claims-*.{json,png,md} from the committed unit summaries and refresh the
    marked blocks of docs/results.md."""
    out = Path(a.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, str] = {}
    guidance: dict[str, Any] = {}
    for task in TASK_PROC:
        s = summarize_task(task)
        if not s:
            continue
        (RESULTS / f"claims-{task}.json").write_text(json.dumps(s, indent=1) + "\n")
        plot(s, RESULTS / f"claims-{task}.png")
        blocks[f"claims-{task}"] = markdown(s)
        blocks[f"claims-{task}-gap"] = train_vs_test(task)
        if tp := trainprompt_gap(task):
            blocks[f"claims-{task}-trainprompts"] = tp
        g = t_guidance(s)
        if g is not None:
            guidance[TASK_PROC[task][0]] = g
            blocks[f"claims-{task}-t-ablation"] = t_markdown(g)
    if guidance:
        GUIDANCE.parent.mkdir(parents=True, exist_ok=True)
        GUIDANCE.write_text(json.dumps(_finite(guidance), indent=1, allow_nan=False) + "\n")
    if (out / "helpful").is_dir():  # the RLOO ablations read their run directories
        blocks["claims-k-ablation"] = summarize_k(out, "helpful", [16, 64, 256], 0.8)
        blocks["claims-steps-ablation"] = summarize_steps(out, "helpful", 0.8)
    doc = RESULTS.parent / "results.md"
    for name, text in blocks.items():
        (RESULTS / f"{name}.md").write_text(text + "\n")
        where = "docs/results.md" if splice(doc, name, text) else f"docs/results/{name}.md only"
        print(f"## {name} ({where})\n\n{text}\n")
