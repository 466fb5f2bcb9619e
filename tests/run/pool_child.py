"""A parent running ``worker_pool(2)`` whose two tasks never finish (used by test_worker_pool)::

    python pool_child.py PID_DIR

Each task writes its worker's pid to ``PID_DIR/<pid>`` and sleeps; the test then sends SIGTERM to
this process, which runs under ``sigterm_raises`` like ``infalign run`` and ``claims.py``.
"""

import os
import sys
import time
from pathlib import Path


def _sleep(pid_dir: str) -> None:
    (Path(pid_dir) / str(os.getpid())).write_text("")
    time.sleep(600)


def _main() -> int:
    from infalign.rl.signals import Terminated, sigterm_raises
    from infalign.run.parallel import worker_pool

    try:
        with sigterm_raises(), worker_pool(2) as pool:
            for f in [pool.submit(_sleep, sys.argv[1]) for _ in range(2)]:
                f.result()
    except Terminated:
        return 143
    return 0


def unit_or_fail(task: str, out: str, seed: int, *rest: object) -> str:
    """A claims-sweep unit stand-in (``benchmarks/claims.py`` unit arguments): seed 1 fails."""
    if seed == 1:
        raise RuntimeError("diverged")
    return f"{task} seed {seed} ok"


if __name__ == "__main__":
    sys.exit(_main())
