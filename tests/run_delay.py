"""How long a call waited for a CPU that other processes held.

Timing tests on a shared 2-core box take this off a call's wall time: a call the OS
preempted for another process waited on the machine, not on our background work.  The
thread's scheduler run delay (``/proc/<pid>/task/<tid>/schedstat``) counts every wait
for a core, also one for a core our own threads held (the native encoder and sender and
``hashlib`` run without the GIL): so only the part of it that our other threads' CPU
over the same call cannot explain is excused.  A wait on a lock or on the GIL our threads
hold is a sleep, not a run delay, and always counts.  Linux only; elsewhere nothing is
excused.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

#: (run delay, process CPU, this thread's CPU), in seconds.
Mark = tuple[float, float, float]


def reader() -> Callable[[], Mark]:
    """A clock for the calling thread (bound to it): read it before and after a call,
    and ``excused(before, after)`` says what to take off the call's time."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        int(os.pread(fd, 64, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return lambda: (0.0, 0.0, 0.0)

    def mark() -> Mark:
        delay = int(os.pread(fd, 64, 0).split()[1]) * 1e-9
        return delay, time.process_time(), time.thread_time()

    return mark


def excused(before: Mark, after: Mark) -> float:
    """The run delay between two marks less what our other threads ran meanwhile."""
    delay = after[0] - before[0]
    ours = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, delay - ours)
