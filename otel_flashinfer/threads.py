"""Our background threads, started with the signals an application handles blocked.

The kernel hands a process-directed signal (SIGTERM from an orchestrator, SIGINT) to
any thread that does not block it.  CPython runs the Python handler in the main thread
either way, but a main thread asleep in a blocking call is woken (EINTR) only when the
signal landed on it: one handed to our exporter or writer thread left an engine's
shutdown handler waiting for that call to return.  A thread inherits the signal mask of
the thread that creates it, so ``start`` blocks them around ``Thread.start`` and gives
the starting thread its own mask back at once (a signal meanwhile stays pending and is
delivered then).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: The signals applications install handlers for (those this platform has).
BLOCKED = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                       "SIGUSR2") if hasattr(signal, name))


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """``BLOCKED`` blocked in this thread for the block: any thread started in it (ours,
    or one a library starts, as the SDK's BatchSpanProcessor does) inherits that mask.
    The caller's own mask comes back at the end; a signal meanwhile stays pending and
    is delivered then."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # no POSIX threads' masks (Windows)
        yield
        return
    old = mask(signal.SIG_BLOCK, BLOCKED)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def start(thread: threading.Thread) -> threading.Thread:
    """``thread.start()`` with ``BLOCKED`` blocked in the new thread; returns it."""
    with signals_blocked():
        thread.start()
    return thread


def made_blocked(factory: Callable[[], T]) -> T:
    """``factory()`` with ``BLOCKED`` blocked, so that the threads it starts inherit the
    mask, and again in a forked child around the at-fork hooks it registers: the SDK's
    BatchSpanProcessor starts its worker anew there, on the forking thread's mask.
    (A child runs its after-fork hooks in the order they were registered.)"""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not hasattr(os, "register_at_fork"):
        return factory()
    saved: list = []

    def block() -> None:
        saved.append(mask(signal.SIG_BLOCK, BLOCKED))

    def restore() -> None:
        if saved:
            mask(signal.SIG_SETMASK, saved.pop())

    os.register_at_fork(after_in_child=block)
    try:
        with signals_blocked():
            return factory()
    finally:
        os.register_at_fork(after_in_child=restore)
