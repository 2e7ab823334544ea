"""Keeps our background threads' CUDA queries out of other threads' graph captures.

``torch.cuda.graph`` captures in "global" mode by default: while any stream of the
process is capturing, a ``cudaEventQuery`` or ``cudaEventSynchronize`` from *any*
thread invalidates the capture.  Our pipeline worker and blob writer poll events,
so a capture waits for queries already running, and no new ones start until it ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_cond = threading.Condition()
_captures = 0
_queries = 0


def begin_capture(timeout_s: float = 5.0) -> None:
    """Called before a capture starts: block new queries, wait for running ones."""
    global _captures
    with _cond:
        _captures += 1
        _cond.wait_for(lambda: _queries == 0, timeout_s)


def end_capture() -> None:
    global _captures
    with _cond:
        _captures = max(0, _captures - 1)
        _cond.notify_all()


def capturing() -> bool:
    return _captures > 0


@contextmanager
def gpu_queries(block: bool = False) -> Iterator[bool]:
    """``with gpu_queries() as allowed:`` query CUDA only when ``allowed``; with
    ``block`` the caller (a background thread) waits until no capture is open."""
    global _queries
    with _cond:
        if _captures:
            if not block:
                yield False
                return
            _cond.wait_for(lambda: _captures == 0)
        _queries += 1
    try:
        yield True
    finally:
        with _cond:
            _queries -= 1
            _cond.notify_all()
