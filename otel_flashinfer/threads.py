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

import signal
import threading

#: The signals applications install handlers for (those this platform has).
BLOCKED = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1",
                                       "SIGUSR2") if hasattr(signal, name))


def start(thread: threading.Thread) -> threading.Thread:
    """``thread.start()`` with ``BLOCKED`` blocked in the new thread; returns it."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # no POSIX threads' masks (Windows)
        thread.start()
        return thread
    old = mask(signal.SIG_BLOCK, BLOCKED)
    try:
        thread.start()
    finally:
        mask(signal.SIG_SETMASK, old)
    return thread
