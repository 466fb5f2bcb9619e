"""Signals during training: a SIGINT or SIGTERM never splits an update from its step counter.

SIGTERM (what schedulers and ``kill`` send) is raised as :class:`Terminated`, a KeyboardInterrupt, so
the same handlers that save a checkpoint after Ctrl-C save one after it; the CLI exits 143 for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Terminated", "defer_interrupts", "sigterm_raises"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like a Ctrl-C so that the same handlers save the work (the CLI exits 143)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises(replace: bool = False) -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread only). A handler the
    application installed is left alone, unless ``replace`` (then it is restored after the block)."""
    current = signal.getsignal(signal.SIGTERM)
    if not _in_main_thread() or (current is not signal.SIG_DFL and not replace):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) or SIGTERM that arrives inside the block until the block ends, so a
    parameter update and its step counter are never split; then raise it (KeyboardInterrupt or
    :class:`Terminated`). A signal whose handler is not the raising one (ignored, or the
    application's own) is left alone."""
    raising = {
        signal.SIGINT: signal.default_int_handler,
        signal.SIGTERM: _raise_terminated,
    }
    if not _in_main_thread():
        yield
        return
    held = [sig for sig, h in raising.items() if signal.getsignal(sig) is h]
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, f: received.append(n)) for sig in held}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if signal.SIGTERM in received:
        raise Terminated(f"terminated by signal {int(signal.SIGTERM)}")
    if received:
        raise KeyboardInterrupt
