"""Helpers of the fault suite: run the CLI in this process or in a child process with a fault
armed (``child.py``), copy a run, compare runs, find the leftovers of interrupted writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from infalign.cli import main

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("child.py")
TRAIN = Path("train") / "ctrl" / "beta=0.1"
EVAL = Path("eval") / "ctrl" / "beta=0.1"


def run_cli(recipe: Path, out: Path, *extra: str) -> int:
    """``infalign run RECIPE --out OUT --no-report EXTRA...`` in this process."""
    return main(["run", str(recipe), "--no-report", "--out", str(out), *extra])


def start_child(recipe: Path, out: Path, spec: dict, *extra: str) -> subprocess.Popen:
    """The same in a child process with the fault ``spec`` armed (``child.py``), started."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    argv = ["run", str(recipe), "--no-report", "--out", str(out), *extra]
    cmd = [sys.executable, str(CHILD), json.dumps(spec), *argv]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def snapshot(out: Path) -> dict:
    """Everything a run computed, without times: results rows, eval.json files, training metrics
    (``rl/time/*`` dropped) and the reference samples."""
    snap: dict = {"results": json.loads((out / "results.json").read_text())}
    for p in sorted(out.glob("eval/**/eval.json")):
        snap[str(p.relative_to(out))] = json.loads(p.read_text())
    for p in sorted(out.glob("train/**/metrics.jsonl")):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        snap[str(p.relative_to(out))] = [
            {k: v for k, v in r.items() if not k.startswith("rl/time/")} for r in rows
        ]
    for p in sorted(out.glob("reference/*/reference.jsonl")):
        snap[str(p.relative_to(out))] = p.read_text()
    return snap


def copy_run(baseline: tuple[Path, dict], dst: Path) -> Path:
    shutil.copytree(baseline[0], dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def leftovers(out: Path) -> list[str]:
    """Temp files and directories of interrupted writes anywhere in the run."""
    found = [*out.rglob(".*.tmp"), *out.rglob(".checkpoint.tmp-*"), *out.rglob("*.jsonl.tmp")]
    return sorted(str(p.relative_to(out)) for p in found)


def one_line_error(capsys, *needles: str) -> str:
    """The CLI's error line (the last stderr line; progress bars may come first), after checking
    there is one error line, no traceback, and every needle in it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("infalign run: error:"), err[-5:]
    assert sum("error" in line.lower() for line in err) == 1, err[-5:]
    assert not any("Traceback" in line for line in err), err[-20:]
    for needle in needles:
        assert needle in err[-1], (needle, err[-1])
    return err[-1]


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes, as a crash or a full disk mid-write would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
