"""Command line: ``infalign frontier|solve|reference|train|evaluate|report|run``, ``config``,
``export``, ``serve-reward``, ``export-reward``.

The only module that prints. Bad arguments give a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from infalign import __version__

if TYPE_CHECKING:
    from infalign.run.config import RunConfig

log = logging.getLogger("infalign")


class UsageError(Exception):
    """Bad user input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    """An argparse ``type`` for an integer >= 1 (argparse's error names the flag)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def check_out(out: str | Path, key: str = "out") -> Path:
    """An output directory we can create and write: UsageError naming ``key`` when it, or a
    directory above it, is a file, or when the nearest existing directory is not writable."""
    path = Path(out)
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is" if p == path else f"is below {str(p)!r}, which is"
                raise UsageError(f"{key}={str(out)!r} {where} a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"{key}={str(out)!r}: directory {str(p)!r} is not writable")
            break
    return path


def _parse_kls(spec: str) -> np.ndarray:
    """``0.5`` or ``0.1,0.5,1`` or ``START:STOP:COUNT`` (log-spaced, inclusive)."""
    try:
        parts = spec.split(":")
        if len(parts) == 3:
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if not (0 < start < stop) or count < 2:
                raise ValueError
            return np.geomspace(start, stop, count)
        return np.array([float(x) for x in spec.split(",")])
    except ValueError:
        raise UsageError(
            f"--kl {spec!r}: expected a number, a list a,b,c or START:STOP:COUNT with 0 < START < STOP"
        ) from None


# --- frontier / solve: the calibrated-space engine --------------------------------------------------


def cmd_frontier(args: argparse.Namespace) -> int:
    from infalign import theory
    from infalign.core.procedures import parse_procedure
    from infalign.run import plots

    proc = parse_procedure(args.procedure)
    specs = [s.strip() for s in args.transforms.split(",") if s.strip()]
    if not specs:
        raise UsageError("--transforms: give at least one transform")
    kls = _parse_kls(args.kl)
    out = check_out(args.out, "--out")
    rows = theory.frontier(proc, specs, kls)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(theory.FrontierRow.__dataclass_fields__)
    with open(out / "frontier.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())
    plots.plot_frontier(rows, out / "frontier.png", procedure=str(proc))
    print(f"wrote {out / 'frontier.csv'} ({len(rows)} rows) and {out / 'frontier.png'}")
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    from infalign import theory
    from infalign.theory.guidance import measured_t, measured_t_lines, robust_t_lines

    kls = _parse_kls(args.kl)
    if kls.size != 1:
        raise UsageError(f"--kl {args.kl!r}: solve takes one KL budget")
    rec = theory.recommend(args.procedure, float(kls[0]))
    if args.json:  # the exact answer, and what the offline testbed measured near it
        print(json.dumps({**rec.to_dict(), "measured": measured_t(rec.procedure, rec.kl)}))
        return 0
    t = "" if rec.t is None else f" (t = {rec.t:.4g})"
    print(f"procedure            {rec.procedure} at KL {rec.kl:g} nats")
    print(f"transform            {rec.transform}{t}")
    print(f"beta (start sweep)   {rec.beta:.6g}")
    print(f"predicted win rate   {rec.win_rate:.4f}  ({rec.procedure}, calibrated space)")
    print(f"standard win rate    {rec.standard_win_rate:.4f}")
    print(f"identity win rate    {rec.identity_win_rate:.4f}")
    print(f"optimum's win rate   {rec.optimal_win_rate:.4f}  (upper bound at this KL)")
    if lines := [*robust_t_lines(rec), *measured_t_lines(rec.procedure, rec.kl)]:
        print("\n".join(lines))
    return 0


# --- reference / train / evaluate / run: the pipeline ----------------------------------------------


def _overrides(extra: Sequence[str]) -> dict[str, str]:
    """``--section.key VALUE`` / ``--section.key=VALUE`` pairs (after the recipe) as a dict."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise UsageError(
                f"unexpected argument {tok!r}; config overrides are --section.key VALUE "
                "(after the recipe)"
            )
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise UsageError(f"override {tok} needs a value")
            value = extra[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def _load_recipe(args: argparse.Namespace) -> RunConfig:
    from infalign.run.recipe import load_config

    return load_config(args.recipe, _overrides(getattr(args, "extra", [])))


def _load_run(args: argparse.Namespace) -> RunConfig:
    """The recipe of a verb that writes into its ``out`` (checked to be a writable directory)."""
    cfg = _load_recipe(args)
    check_out(cfg.out)
    return cfg


def _print_table(rows: list[dict], procedures: list[str]) -> None:
    from infalign.run.results import format_table

    print(format_table(rows, procedures))


def _method_name(cfg: RunConfig, args: argparse.Namespace) -> str:
    from infalign.run import pipeline

    names = [m.name for m in pipeline.sweep(cfg)]
    if args.method is not None:
        return str(args.method)
    if len(names) == 1:
        return names[0]
    raise UsageError(f"--method is required: the recipe has methods {names}")


def cmd_reference(args: argparse.Namespace) -> int:
    from infalign.run import pipeline

    cfg = _load_run(args)
    splits = [args.split] if args.split else list(pipeline.SPLITS)
    refs = pipeline.run_references(cfg, splits)
    for split, ref in refs.items():
        print(
            f"reference/{split}: {len(ref.prompts)} prompts x K={ref.num_samples}, mean reward "
            f"{float(ref.rewards.mean()):.4f}, tied {ref.tie_fraction():.1%} -> "
            f"{pipeline.reference_dir(cfg, split)}"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from infalign.run import pipeline
    from infalign.run.io import read_json

    cfg = _load_run(args)
    method = _method_name(cfg, args)
    d = pipeline.run_train(cfg, method, args.beta)
    last = read_json(d / "manifest.json").get("summary") or {}
    tf = read_json(d / "transform.json").get("resolved")
    print(f"train {method} ({tf}): {d}")
    if last:
        shown = {"reward": "rl/reward_raw", "loss": "rl/loss", "fit corr": "rl/fit_corr"}
        parts = [f"{k} {last[v]:.4f}" for k, v in shown.items() if v in last]
        parts.append(f"KL {last['rl/kl_seq']:.4f} nats")
        print(f"  step {last['rl/step'] + 1}: " + ", ".join(parts))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from infalign.core.procedures import parse_procedure
    from infalign.run import pipeline
    from infalign.run.io import read_json

    cfg = _load_run(args)
    if args.reference and (args.method is not None or args.beta is not None):
        raise UsageError("--reference evaluates pi_ref itself: give it without --method/--beta")
    method = None if args.reference else _method_name(cfg, args)
    pipeline.run_evaluate(cfg, method, args.beta)  # also refreshes results.json
    results = read_json(Path(cfg.out) / "results.json")
    name = pipeline.REFERENCE_ROW if method is None else method
    beta = None if method is None else float(cfg.rl.beta if args.beta is None else args.beta)
    rows = [r for r in results["rows"] if r["method"] == name and r["beta"] == beta]
    procs = [parse_procedure(p).spec() for p in cfg.evaluate.procedures]
    _print_table(rows, procs)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from infalign.run import pipeline

    cfg = _load_run(args)
    results = pipeline.run_all(cfg, report=not args.no_report, jobs=args.jobs)
    _print_table(results["rows"], results["procedures"])
    out = Path(cfg.out)
    print(f"results: {out / 'results.json'}")
    if results.get("report"):
        print(f"report:  {results['report']}")
    return 0


# --- report: markdown + plots from a run directory's artifacts ----------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from infalign.run import report

    path = report.write_report(Path(args.run_dir))
    print(path)
    return 0


# --- parser ------------------------------------------------------------------------------------------


def _theory_verbs(sub: Any) -> None:
    """``frontier`` and ``solve``: the calibrated-space engine."""
    p = sub.add_parser("frontier", help="win rate vs KL per transform in calibrated space")
    p.add_argument("--procedure", default="bon:4", help="sample | bon:N | won:N | kth:K:N")
    p.add_argument(
        "--transforms",
        default="identity,log,exp:auto,optimal",
        help="comma list: identity, log, exp:T, negexp:T, exp:auto, negexp:auto, optimal",
    )
    p.add_argument("--kl", default="0.05:3:40", help="KL targets: x, a,b,c or START:STOP:COUNT")
    p.add_argument("--out", default="runs/frontier", help="output directory")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("solve", help="recommended transform, t and beta for a procedure and KL")
    p.add_argument("--procedure", default="bon:4")
    p.add_argument("--kl", required=True, help="KL budget in nats, in (0, 12]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_solve)


_OVER = "; config overrides follow the recipe: --rl.beta 0.1 --out runs/x"
_EPILOG = (
    "Any config key can be overridden after the recipe as --section.key VALUE or "
    "--section.key=VALUE (values are YAML: --evaluate.procedures sample,bon:4 "
    "--rl.steps 10 --out runs/x); an unknown key is an error. Every key with its type, "
    "default and help: infalign config show [RECIPE]."
)


def _recipe_verb(sub: Any, name: str, what: str, func: Any) -> argparse.ArgumentParser:
    """A pipeline verb: a recipe, then its own options, then config overrides."""
    p = sub.add_parser(name, help=what + _OVER, allow_abbrev=False, epilog=_EPILOG)
    p.add_argument("recipe", help="recipe YAML")
    p.set_defaults(func=func, overrides_ok=True)
    return p


def _pipeline_verbs(sub: Any) -> None:
    """``reference``, ``train``, ``evaluate``, ``run`` (recipe + overrides) and ``report``."""
    p = _recipe_verb(
        sub, "reference", "sample and score K reference responses per prompt", cmd_reference
    )
    p.add_argument("--split", choices=["train", "test"], help="one split (default: both)")
    for name, what, func in (
        ("train", "CTRL training of one method at one beta", cmd_train),
        ("evaluate", "inference-time win rates and KL of a trained policy", cmd_evaluate),
    ):
        p = _recipe_verb(sub, name, what, func)
        p.add_argument("--method", help="a method name of the recipe (required if it has several)")
        p.add_argument("--beta", type=float, help="KL coefficient (default: rl.beta)")
    p.add_argument("--reference", action="store_true", help="evaluate pi_ref itself (sanity row)")
    p = _recipe_verb(
        sub, "run", "the whole sweep: reference, train, evaluate, results, report", cmd_run
    )
    p.add_argument("--no-report", action="store_true", help="skip the report")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="stages run on N worker processes (each with 1/N of the torch threads; default 1)",
    )

    p = sub.add_parser("report", help="report.md + plots from a run directory's artifacts")
    p.add_argument("run_dir", help="a run directory (the recipe's out: results.json, config.yaml)")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    """The parser: global -v/--verbose (also accepted after the verb) and --version, then the verbs.
    A new verb registers itself with a function like ``_theory_verbs(sub)``."""
    parser = _Parser(
        prog="infalign", description="Inference-aware alignment: calibrate, transform, RL (CTRL)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"infalign {__version__}")
    # every verb accepts -v too; SUPPRESS keeps its default from resetting a -v given before it
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser = sub.add_parser

    def add_verb(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [verbose, *kwargs.get("parents", ())]
        return add_parser(name, **kwargs)

    sub.add_parser = add_verb  # type: ignore[method-assign,assignment]
    _theory_verbs(sub)
    _pipeline_verbs(sub)
    from infalign.run import export, schema

    schema.register(sub, _load_recipe)  # config show | schema
    export.register(sub, _load_recipe, _method_name)

    from infalign.integrations.commands import add_commands  # serve-reward, export-reward

    add_commands(sub, _load_recipe, lambda msg: print(msg, flush=True), _EPILOG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "overrides_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # config overrides of the pipeline verbs
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from infalign.rl.signals import Terminated, sigterm_raises

    try:
        with sigterm_raises():  # SIGTERM saves work like Ctrl-C does
            return int(args.func(args))
    except (UsageError, ValueError) as err:
        print(f"infalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:  # e.g. a read-only run directory found only when writing
        print(
            f"infalign {args.command}: error: cannot write {err.filename!r}: {err.strerror}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as err:
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"infalign {args.command}: {how}; finished stages are kept", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
