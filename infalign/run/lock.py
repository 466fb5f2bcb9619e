"""Stage locks: one command at a time works in a stage directory of a run.

A command takes ``<stage dir>/.lock`` with ``fcntl.flock`` (exclusive, non-blocking) before it writes
there and holds it until it ends; the file holds the holder's pid. A second command that needs the same
stage gets a ValueError naming that pid. The kernel drops the lock when its process dies (even on
``kill -9``), so a lock file left by a dead process is simply taken over. Commands that work on
different stages of one run (e.g. the worker processes of ``benchmarks/claims.py``, one method each)
run side by side.

Holding the lock also makes the temp files in the directory garbage: :func:`lock_stage` removes the
``.*.tmp`` files of interrupted atomic writes and the ``.checkpoint.tmp-<pid>/`` directories of
interrupted checkpoint saves (:func:`remove_stale_checkpoint_tmp`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "StageLock", "lock_stage", "pid_alive", "remove_stale_checkpoint_tmp"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CHECKPOINT_TMP = ".checkpoint.tmp-"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_checkpoint_tmp(d: Path) -> None:
    """Remove ``d/.checkpoint.tmp-<pid>/`` left by saves of processes that are no longer alive."""
    for tmp in d.glob(f"{CHECKPOINT_TMP}*") if d.is_dir() else []:
        pid = tmp.name.removeprefix(CHECKPOINT_TMP)
        if not pid.isdigit() or (int(pid) != os.getpid() and not pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("removed %s (left by an interrupted checkpoint save)", tmp)


class StageLock:
    """An exclusive flock on ``d/.lock`` (see the module docstring); :meth:`release` drops it."""

    def __init__(self, d: Path, what: str) -> None:
        self.path = d / LOCK_FILE
        self._fh: IO[str] | None = None
        if fcntl is None:  # pragma: no cover
            return
        fh = open(self.path, "a+", encoding="utf-8")  # held until release()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ValueError(
                f"{what}: {str(d)!r} is in use by another infalign command (pid {holder}); wait for "
                "it to finish, or use another out (--out DIR)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
            self._fh.close()  # closing the file drops the flock
            self._fh = None


def lock_stage(d: Path, what: str) -> StageLock:
    """Lock the stage directory ``d`` (which must exist), then remove the temp files that interrupted
    writes left there (nobody else can be writing them now)."""
    lock = StageLock(d, what)
    for tmp in d.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s (left by an interrupted write)", tmp)
    remove_stale_checkpoint_tmp(d)
    return lock
