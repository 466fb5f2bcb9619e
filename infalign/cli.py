"""Command line: ``infalign frontier|solve|reference|train|evaluate|report|run``.

The only module that prints. Bad arguments give a one-line error on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

log = logging.getLogger("infalign")


class UsageError(Exception):
    """Bad user input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    from infalign import report, theory
    from infalign.procedures import parse_procedure

    proc = parse_procedure(args.procedure)
    specs = [s.strip() for s in args.transforms.split(",") if s.strip()]
    if not specs:
        raise UsageError("--transforms: give at least one transform")
    kls = _parse_kls(args.kl)
    rows = theory.frontier(proc, specs, kls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(theory.FrontierRow.__dataclass_fields__)
    with open(out / "frontier.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())
    report.plot_frontier(rows, out / "frontier.png", procedure=str(proc))
    print(f"wrote {out / 'frontier.csv'} ({len(rows)} rows) and {out / 'frontier.png'}")
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    from infalign import theory

    kls = _parse_kls(args.kl)
    if kls.size != 1:
        raise UsageError(f"--kl {args.kl!r}: solve takes one KL budget")
    rec = theory.recommend(args.procedure, float(kls[0]))
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
        return 0
    t = "" if rec.t is None else f" (t = {rec.t:.4g})"
    print(f"procedure            {rec.procedure} at KL {rec.kl:g} nats")
    print(f"transform            {rec.transform}{t}")
    print(f"beta (start sweep)   {rec.beta:.6g}")
    print(f"predicted win rate   {rec.win_rate:.4f}  ({rec.procedure}, calibrated space)")
    print(f"standard win rate    {rec.standard_win_rate:.4f}")
    print(f"identity win rate    {rec.identity_win_rate:.4f}")
    print(f"optimum's win rate   {rec.optimal_win_rate:.4f}  (upper bound at this KL)")
    return 0


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="infalign", description="Inference-aware alignment: calibrate, transform, RL (CTRL)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    p.add_argument("--kl", required=True, help="KL budget in nats")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_solve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (UsageError, ValueError) as err:
        print(f"infalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infalign {args.command}: interrupted; finished stages are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
