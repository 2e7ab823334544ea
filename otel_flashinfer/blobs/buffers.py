"""An object as buffers in order, and writing them whole: to the store's files and to
the upload helper's pipe (``uploader``), with one ``writev`` where the kernel takes it."""

from __future__ import annotations

import errno
import os
import select
import time

#: At most this many buffers a writev (POSIX guarantees 16; Linux takes 1024).
IOV_MAX = 16


def parts_of(data: bytes | list) -> list:
    """Buffers of an object given as bytes or as a list of buffers."""
    return data if isinstance(data, list) else [data]


def nbytes(parts: list) -> int:
    """Bytes in ``parts``."""
    return sum(memoryview(p).nbytes for p in parts)


def write_all(fd: int, parts: list, deadline: float | None = None) -> None:
    """Every byte of ``parts``, in order, however short the writes the kernel makes.
    A non-blocking ``fd`` (a pipe) is waited on until ``deadline`` (monotonic), then
    ``TimeoutError``: its reader stopped reading."""
    views = [view for view in (memoryview(p).cast("B") for p in parts) if view.nbytes]
    poller = None
    while views:
        try:
            written = os.writev(fd, views[:IOV_MAX])
        except BlockingIOError:
            left = (deadline if deadline is not None else 0.0) - time.monotonic()
            if deadline is None or left <= 0:
                raise TimeoutError(f"nothing could be written for {left:.1f} s") from None
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            poller.poll(min(left, 1.0) * 1000)
            continue
        if written <= 0:  # a regular file does not; never loop on it
            raise OSError(errno.EIO, f"writev wrote {written} bytes")
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if views and written:
            views[0] = views[0][written:]
