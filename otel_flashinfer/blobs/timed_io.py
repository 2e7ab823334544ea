"""The counter file's reads, writes and unlocks, each with the seconds it took.

The blob budget takes its counter file for slow when a look's I/O passes 5 ms
(``store._SLOW_LOOK_S``).  The C extension (csrc/timed_io.c) times each system call
with the GIL released, so busy threads of the program (the GIL's switch interval, 5 ms,
after every call) do not make a fast file look slow.  Without a C compiler the
fallback times from Python, GIL waits included: busy threads can then mark a local
file slow for a while, and a few payloads are skipped as ``budget_busy``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

try:
    from .. import _timed_io as _c
except ImportError:  # installed without a C compiler
    _c = None


def pread(fd: int, n: int, offset: int) -> tuple[bytes, float]:
    """At most ``n`` bytes at ``offset``, and the seconds the read took."""
    if _c is not None:
        return _c.pread(fd, n, offset)
    t0 = time.monotonic()
    raw = os.pread(fd, n, offset)
    return raw, time.monotonic() - t0


def pwrite(fd: int, data: bytes, offset: int) -> float:
    """All of ``data`` at ``offset``; the seconds the writes took."""
    if _c is not None:
        return _c.pwrite(fd, data, offset)
    t0 = time.monotonic()
    done = 0
    while done < len(data):
        put = os.pwrite(fd, data[done:], offset + done)
        if put <= 0:  # as the C version: never loop on a write that makes no progress
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        done += put
    return time.monotonic() - t0


def unlock(fd: int) -> float:
    """Let the file's lock go (``fcntl.lockf(fd, LOCK_UN)``); the seconds it took."""
    if _c is not None:
        return _c.unlock(fd)
    t0 = time.monotonic()
    fcntl.lockf(fd, fcntl.LOCK_UN)
    return time.monotonic() - t0


def in_kernel() -> bool:
    """Whether the times exclude GIL waits (the C extension is built)."""
    return _c is not None
