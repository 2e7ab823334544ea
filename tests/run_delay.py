"""How long the calling thread sat runnable while other processes held the CPUs.

Timing tests on a shared 2-core box take this off a call's wall time: a call the OS
preempted waited on the machine, not on our background work (a wait on a lock or the
GIL our threads hold is a sleep, not a run delay, and still counts).  Linux only
(``/proc/<pid>/task/<tid>/schedstat``); elsewhere the delay reads 0 and nothing is
taken off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def reader() -> Callable[[], float]:
    """A clock of the calling thread's run delay, in seconds (bound to this thread)."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        int(os.pread(fd, 64, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return lambda: 0.0

    def run_delay() -> float:
        return int(os.pread(fd, 64, 0).split()[1]) * 1e-9

    return run_delay
