"""Helpers shared by the benchmark scripts: best-of-n timing and the git commit for the header line.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they
import it as ``from _common import best_time, git_commit``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], repeat: int = 5) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def git_commit(dirty_path: str | None = None) -> str:
    """Short SHA of HEAD (``?`` outside a git checkout); with ``dirty_path``, ``+dirty(<name>)`` is
    appended when that file has uncommitted changes."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return out.stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "?"
    if dirty_path is not None and git("status", "--porcelain", "--", dirty_path):
        sha += f"+dirty({dirty_path.rsplit('/', 1)[-1]})"
    return sha
