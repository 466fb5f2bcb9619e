"""Tables and figures of the claims sweep (``python benchmarks/claims.py summarize``).

Per seed, each method family's win rate is interpolated linearly in log KL at ``AT`` (only inside that
seed's measured KL range); across seeds: the mean and a 95% Student-t interval (S - 1 degrees of
freedom); paired per-seed differences between families the same way. Writes ``docs/results/claims-*``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from claims import FAMILIES, LOG_SPEC, RESULTS, TASK_PROC, _kl_tag, methods

AT = (0.25, 0.5, 1.0)  # KL budgets the tables interpolate at


def _family(method: str) -> str:
    return method.split("-kl")[0]


def load_rows(out: Path, task: str, k: int | None = None) -> dict[int, list[dict[str, Any]]]:
    """{seed: results.json rows} for every seed directory that has results."""
    base = out / (task if k is None else f"{task}-K{k}")
    rows = {}
    for d in sorted(base.glob("seed*")):
        f = d / "results.json"
        if f.is_file():
            rows[int(d.name.removeprefix("seed"))] = json.loads(f.read_text())["rows"]
    return rows


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
        return (float("nan"),) * 3 + (0,)  # type: ignore[return-value]
    m = float(x.mean())
    if x.size == 1:
        return m, float("nan"), float("nan"), 1
    h = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - h, m + h, int(x.size)


def _fmt(m: float, lo: float, hi: float, n: int, nd: int = 3) -> str:
    if not math.isfinite(m):
        return "—"
    if not math.isfinite(lo):
        return f"{m:.{nd}f} (n={n})"
    return f"{m:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]" + ("" if n == 3 else f" (n={n})")


def summarize_task(out: Path, task: str) -> dict[str, Any]:
    from infalign import theory

    proc, fam = TASK_PROC[task]
    per_seed = load_rows(out, task)
    if not per_seed:
        return {}
    cs = {s: curves(rows, proc) for s, rows in per_seed.items()}
    fams = [f for f in FAMILIES if any(f in c for c in cs.values())]
    table: dict[str, Any] = {}
    for f in fams:
        for col, what in ((1, proc), (2, "sample")):
            vals = np.array(
                [[interp(c[f], k, col) if f in c else np.nan for k in AT] for c in cs.values()]
            )
            table.setdefault(f, {})[what] = [t_interval(vals[:, j]) for j in range(len(AT))]
    diffs: dict[str, Any] = {}
    for a, b in (("exp", "identity"), ("exp", "raw"), ("identity", "raw"), ("optimal", "identity")):
        for col, what in ((1, proc), (2, "sample")):
            d = np.array(
                [
                    [
                        interp(c[a], k, col) - interp(c[b], k, col) if a in c and b in c else np.nan
                        for k in AT
                    ]
                    for c in cs.values()
                ]
            )
            diffs[f"{a} - {b} [{what}]"] = [t_interval(d[:, j]) for j in range(len(AT))]
    bound = {k: float(theory.optimal_policy(proc, kl=k).win_rate(proc)) for k in AT}
    predicted = {}
    for spec in ("identity", f"{fam}:auto", LOG_SPEC):
        rows = theory.frontier(proc, [spec], list(AT))
        predicted[spec] = {r.kl: r.win_rate for r in rows}
    ref = [r for rows in per_seed.values() for r in rows if r["method"] == "reference"]
    return {
        "task": task,
        "procedure": proc,
        "seeds": sorted(per_seed),
        "at_kl": AT,
        "table": table,
        "diffs": diffs,
        "bound": bound,
        "predicted": {k: {f"{kk:g}": v for kk, v in d.items()} for k, d in predicted.items()},
        "reference": [(r["win_rate"][proc]["mean"], r["standard_win_rate"]["mean"]) for r in ref],
        "points": {str(s): {f: c[f].tolist() for f in c} for s, c in cs.items()},
    }


def markdown(summary: dict[str, Any]) -> str:
    def label(family: str) -> str:  # the "exp" family is negexp:auto@k for a worst-of-n task
        return TASK_PROC[summary["task"]][1] if family == "exp" else family

    proc, at = summary["procedure"], summary["at_kl"]
    head = " | ".join(f"KL {k:g}" for k in at)
    lines = [
        f"**{summary['task']} / {proc}**, seeds {summary['seeds']}: win rate interpolated at each KL, mean "
        "[95% t-interval over seeds]; — where the KL is outside a seed's measured range.",
        "",
        f"| method | win rate | {head} |",
        "|---|---|" + "---|" * len(at),
    ]
    for f, d in summary["table"].items():
        for what in (proc, "sample"):
            cells = " | ".join(_fmt(*x) for x in d[what])
            lines.append(f"| {label(f)} | {what} | {cells} |")
    ref = np.array(summary["reference"])
    for j, what in ((0, proc), (1, "sample")):
        r = _fmt(*t_interval(ref[:, j]))
        lines.append(f"| *pi_ref itself (KL 0; truth 0.5)* | {what} | {r} | {r} | {r} |")
    cells = " | ".join(f"{summary['bound'][k]:.3f}" for k in at)
    lines.append(f"| *theory optimum* | {proc} | {cells} |")
    for spec, d in summary["predicted"].items():
        cells = " | ".join(f"{d[f'{k:g}']:.3f}" if f"{k:g}" in d else "—" for k in at)
        lines.append(f"| *theory {spec}* | {proc} | {cells} |")
    lines += [
        "",
        f"Paired differences (per seed, then across seeds), {proc} and standard win rate:",
        "",
    ]
    lines += [f"| difference | {head} |", "|---|" + "---|" * len(at)]
    for name, d in summary["diffs"].items():
        a, b = name.split(" - ")
        lines.append(f"| {label(a)} - {b} | " + " | ".join(_fmt(*x) for x in d) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infalign import theory

    proc, neg = summary["procedure"], TASK_PROC[summary["task"]][1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(
        zip(FAMILIES, ("tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple"), strict=True)
    )
    grid = np.geomspace(0.05, 3.0, 40)
    for ax, col, what in ((axes[0], 1, proc), (axes[1], 2, "sample")):
        for s, fams in summary["points"].items():
            for f, pts in fams.items():
                p = np.array(pts)
                ax.plot(
                    p[:, 0],
                    p[:, col],
                    "o-",
                    color=colors.get(f, "k"),
                    alpha=0.6,
                    ms=4,
                    lw=1,
                    label=(neg if f == "exp" else f) if s == str(summary["seeds"][0]) else None,
                )
        # the optimum: the fixed point for the procedure; identity's tilt for the standard win rate
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
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{summary['task']}: measured win rate vs KL, 3 seeds (one line per seed and method)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize_k(out: Path, task: str, ks: list[int], kl: float) -> str:
    proc = TASK_PROC[task][0]
    lines = [f"| K | {proc} win rate | standard win rate | KL | seeds |", "|---|---|---|---|---|"]
    for k in ks:
        per_seed = load_rows(out, task, None if k == 64 else k)
        name = f"exp-{_kl_tag(kl)}"
        rows = [r for rs in per_seed.values() for r in rs if r["method"] == name]
        if not rows:
            continue
        w = t_interval(np.array([r["win_rate"][proc]["mean"] for r in rows]))
        sw = t_interval(np.array([r["standard_win_rate"]["mean"] for r in rows]))
        kv = t_interval(np.array([r["kl"]["mean"] for r in rows]))
        lines.append(f"| {k} | {_fmt(*w)} | {_fmt(*sw)} | {_fmt(*kv, nd=2)} | {len(rows)} |")
    return "\n".join(lines)


def train_vs_test(out: Path, task: str, last: int = 5) -> str:
    """Where the gap to the optimum arises: per family, averaged over seeds and betas, the on-policy
    mean calibrated reward E[u] and KL of the last ``last`` training steps (train prompts) against the
    most any policy can have at that KL (the identity tilt maximises E[u]: theory ``sample`` optimum),
    and the same on the held-out prompts (standard win rate = E[u] against fresh pi_ref samples)."""
    from infalign import theory

    acc: dict[str, list[tuple[float, float, float, float]]] = {}
    for d in sorted((out / task).glob("seed*")):
        f = d / "results.json"
        if not f.is_file():
            continue
        for r in json.loads(f.read_text())["rows"]:
            if r["method"] == "reference" or not r.get("train"):
                continue
            lines = (d / r["train"] / "metrics.jsonl").read_text().splitlines()
            m = [json.loads(x) for x in lines if x.strip()][-last:]
            tr_kl = float(np.mean([x["rl/kl_seq"] for x in m]))
            tr_u = float(np.mean([x["rl/reward_calibrated"] for x in m]))
            acc.setdefault(_family(r["method"]), []).append(
                (tr_kl, tr_u, r["kl"]["mean"], r["standard_win_rate"]["mean"])
            )

    def bound(kl: float) -> float:
        if not kl > 0:
            return 0.5
        rows = theory.frontier("sample", ["identity"], [min(kl, theory.MAX_KL)])
        return rows[0].win_rate if rows else float("nan")

    lines = [
        "| method | runs | train KL | train E[u] | optimum at train KL | test KL | test E[u] "
        "| optimum at test KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        if fam not in acc:
            continue
        v = np.array(acc[fam])
        b_tr = np.mean([bound(k) for k in v[:, 0]])
        b_te = np.mean([bound(k) for k in v[:, 2]])
        lines.append(
            f"| {fam} | {len(v)} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.3f} | {b_tr:.3f} "
            f"| {v[:, 2].mean():.2f} | {v[:, 3].mean():.3f} | {b_te:.3f} |"
        )
    return "\n".join(lines)


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
        steps, lr = d.name.removeprefix(f"{task}-steps").split("-lr")
        runs.append((int(steps), float(lr), d / f"seed{seed}"))
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
    """Write docs/results/claims-*.{json,png,md} and refresh the marked blocks of docs/results.md."""
    out = Path(a.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, str] = {}
    for task in TASK_PROC:
        s = summarize_task(out, task)
        if not s:
            continue
        (RESULTS / f"claims-{task}.json").write_text(json.dumps(s, indent=1) + "\n")
        plot(s, RESULTS / f"claims-{task}.png")
        blocks[f"claims-{task}"] = markdown(s)
        blocks[f"claims-{task}-gap"] = train_vs_test(out, task)
    blocks["claims-k-ablation"] = summarize_k(out, "helpful", [16, 64, 256], 0.8)
    blocks["claims-steps-ablation"] = summarize_steps(out, "helpful", 0.8)
    doc = RESULTS.parent / "results.md"
    for name, text in blocks.items():
        (RESULTS / f"{name}.md").write_text(text + "\n")
        where = "docs/results.md" if splice(doc, name, text) else f"docs/results/{name}.md only"
        print(f"## {name} ({where})\n\n{text}\n")
