"""``worker_pool``: no worker outlives a parent stopped by SIGTERM (a sweep killed mid-unit
used to leave its workers training, holding their stage locks)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("pool_child.py")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose (its parent, the pool, is gone)
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")


def test_sigterm_to_the_parent_stops_its_workers(tmp_path):
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2:
            assert time.monotonic() < deadline, "the workers never started their tasks"
            assert proc.poll() is None, "the parent exited before its workers started"
            time.sleep(0.2)
        workers = [int(p.name) for p in tmp_path.iterdir()]
        assert all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "a worker outlived its parent"
    finally:
        proc.kill()
        for p in tmp_path.iterdir():
            if p.name.isdigit() and _alive(int(p.name)):
                os.kill(int(p.name), signal.SIGKILL)


def test_a_failing_sweep_unit_does_not_stop_the_others(capsys):
    """``claims.py``: the other units run, the failure is printed, then SystemExit names it."""
    from pool_child import unit_or_fail

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from claims import _run_units

    units = [("helpful", "out", s, None, [], ("identity", 0.1)) for s in (0, 1, 2)]
    with pytest.raises(SystemExit, match=r"(?s)1 unit\(s\) failed.*seed 1.*RuntimeError: diverged"):
        _run_units(units, 2, work=unit_or_fail)
    out = capsys.readouterr().out
    assert "helpful seed 0 ok" in out and "helpful seed 2 ok" in out
