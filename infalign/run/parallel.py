"""Stages in worker processes: ``infalign run RECIPE --jobs N``.

A run's stages are independent once their inputs exist: the two reference splits, then every
(method, beta) train + evaluate and pi_ref's evaluation. :func:`run_units` runs a list of them on N
spawned worker processes with ``torch`` threads = max(1, parent threads // N) each, so on a small CPU
N single-threaded processes use the cores that one process's tiny matrix products leave idle.

Every stage draws from its own seeds (the pipeline's ``derive_seed`` scheme), so the numbers are
those of a sequential run with the workers' thread count (tested with one thread); only the order in
which stages finish changes. Another thread count changes float reductions in the last bit, and a
token whose draw falls on that edge changes the rest of its run: the demo's BoN_4 rows moved by
0.01-0.04 (inside their intervals) between 2 threads sequential and ``--jobs 2``.

Each worker runs its stage as a command of its own (:func:`~infalign.run.runs.preflight`, the stage
lock, :func:`~infalign.run.runs.command_scope` cleanup); its stderr (logs, warnings, progress
bars) goes to ``<out>/logs/<stage>.log``. SIGTERM in a worker is raised like Ctrl-C
(:func:`~infalign.rl.signals.sigterm_raises`), so a trainer saves its checkpoint. When the parent is
interrupted or a stage fails, the pool is terminated (SIGTERM to each worker, then joined): finished
stages and checkpoints stay, and the next ``run`` resumes. The parent shows one bar over stages.

The workers are spawned, so they import the parent's main module: a script that calls
``run_all(cfg, jobs=N)`` needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from infalign.run.config import RunConfig
from infalign.run.runs import RunEnv

__all__ = ["Unit", "log_file", "run_stage", "run_units", "worker_pool"]

# ("reference", split, None) | ("method", name, beta) | ("method", None, None) for pi_ref's evaluation
Unit = tuple[str, str | None, float | None]
LOGS = "logs"  # <out>/logs/<unit>.log: each worker stage's stderr


class _Interrupted(Exception):
    """A worker's KeyboardInterrupt / Terminated, carried to the parent as an ordinary exception."""

    def __init__(self, terminated: bool) -> None:
        super().__init__("terminated" if terminated else "interrupted")
        self.terminated = terminated

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.terminated,))


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _init_worker(threads: int, pids: Any) -> None:
    """Between stages SIGTERM exits the worker by raising SystemExit (quietly, releasing the pool
    queue's locks on the way out; the default disposition could die holding one and hang the
    pool); SIGINT is ignored: on Ctrl-C the parent stops the busy workers with SIGTERM."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids.put(os.getpid())


def _label(unit: Unit) -> str:
    kind, name, beta = unit
    if kind == "reference":
        return f"reference-{name}"
    return "pi_ref" if name is None else f"{name}@beta={beta:g}"


def log_file(cfg: RunConfig, unit: Unit) -> Path:
    """``<out>/logs/<unit>.log``: where a worker's stderr goes while it runs ``unit``."""
    return Path(cfg.out) / LOGS / f"{_label(unit)}.log"


def run_stage(env: RunEnv, unit: Unit) -> None:
    """One unit in this process, on the command's :class:`~infalign.run.runs.RunEnv`: a reference
    split, or a method's train + evaluate, or pi_ref's evaluation (the sequential run calls this
    too)."""
    from infalign.run.evaluate import evaluate_stage
    from infalign.run.reference import reference_stage
    from infalign.run.runs import get_method
    from infalign.run.train import train_stage

    kind, name, beta = unit
    if kind == "reference":
        assert name is not None
        reference_stage(env, name)
    elif name is None:
        evaluate_stage(env, None, None)
    else:
        assert beta is not None
        m = get_method(env.cfg, name)
        train_stage(env, m, beta)
        evaluate_stage(env, m, beta)


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """File descriptor 2 (Python's and the libraries' stderr: logs, warnings, bars) into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _work(cfg: RunConfig, unit: Unit) -> None:
    """One stage as its own command (in a worker process), its stderr into :func:`log_file`."""
    from infalign.rl.signals import Terminated, sigterm_raises
    from infalign.run.runs import command_scope, preflight

    with _stderr_to(log_file(cfg, unit)), sigterm_raises(replace=True):
        try:
            env = preflight(cfg)
            with command_scope(env):
                run_stage(env, unit)
        except KeyboardInterrupt as err:
            raise _Interrupted(isinstance(err, Terminated)) from None


def _terminate(pids: Any) -> None:
    """SIGTERM to every worker that started (a busy one saves its work and returns; an idle one
    exits)."""
    while not pids.empty():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids.get(), signal.SIGTERM)


@contextlib.contextmanager
def worker_pool(n: int) -> Iterator[ProcessPoolExecutor]:
    """``n`` spawned worker processes with ``max(1, torch threads // n)`` threads each. When the
    block raises (a failed task, Ctrl-C, or SIGTERM under :func:`~infalign.rl.signals.sigterm_raises`)
    pending tasks are cancelled and every worker gets SIGTERM, so none outlives the parent; a busy
    one that runs its task under ``sigterm_raises(replace=True)`` saves its checkpoint first."""
    import torch

    ctx = mp.get_context("spawn")
    pids = ctx.SimpleQueue()
    init = (max(1, torch.get_num_threads() // n), pids)
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=init)
    try:
        yield pool
    except BaseException:
        _terminate(pids)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_units(cfg: RunConfig, units: Sequence[Unit], jobs: int, desc: str = "stages") -> None:
    """Run ``units`` on ``min(jobs, len(units))`` spawned processes; returns when all are done.
    A failed unit's exception is raised here (after the other workers are stopped), with a note
    naming its log; a worker's interrupt is raised as KeyboardInterrupt (or
    :class:`~infalign.rl.signals.Terminated`)."""
    from infalign.rl.signals import Terminated

    n = min(jobs, len(units))
    if n < 1:
        return
    with worker_pool(n) as pool:
        futures: dict[Future[None], Unit] = {pool.submit(_work, cfg, u): u for u in units}
        with tqdm(total=len(units), desc=desc, unit="stage") as bar:
            for fut in as_completed(futures):
                unit = futures[fut]
                try:
                    fut.result()
                except _Interrupted as err:
                    raise (Terminated if err.terminated else KeyboardInterrupt)(str(err)) from None
                except Exception as err:
                    err.add_note(f"(stage {_label(unit)}; its log: {log_file(cfg, unit)})")
                    raise
                bar.set_postfix_str(_label(unit), refresh=False)
                bar.update()
