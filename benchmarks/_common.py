"""Helpers shared by the benchmark scripts: best-of-n timing.

The scripts run as ``python benchmarks/<name>.py``, which puts this directory on ``sys.path``, so they
import it as ``from _common import best_time`` (the commit: ``infalign.run.io.git_commit``).
"""

from __future__ import annotations

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
