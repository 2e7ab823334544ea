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
import signal
import threading
from collections.abc import Iterator

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
