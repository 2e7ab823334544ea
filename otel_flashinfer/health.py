"""Our own failures: counted, and logged once per kind, never raised into the engine.

Instrumentation must never break the program it observes, but silently swallowing
errors hides a broken exporter.  Every internal failure goes through ``report`` (a
counter and one log line per kind), and ``counters()`` lets tests and users see them.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter

logger = logging.getLogger("otel_flashinfer")

_lock = threading.Lock()
_counts: Counter[str] = Counter()
_logged: set[str] = set()


def count(kind: str, n: int = 1) -> None:
    """Add ``n`` to counter ``kind`` (e.g. ``spans_dropped``)."""
    with _lock:
        _counts[kind] += n


def report(kind: str, message: str, exc: BaseException | None = None, n: int = 1) -> None:
    """Count ``n`` internal failures; log the first of each kind with its traceback."""
    with _lock:
        _counts[kind] += n
        first = kind not in _logged
        _logged.add(kind)
    if first:
        logger.warning(
            "otel_flashinfer: %s (%s; further ones are counted, not logged)",
            message, kind, exc_info=exc,
        )


def counters() -> dict[str, int]:
    """A copy of every counter: internal errors, dropped spans, skipped payloads."""
    with _lock:
        return dict(_counts)


def dropped() -> int:
    """Spans and statistics dropped so far, all causes (read on every traced replay:
    no copy, no lock; a count in flight shows on the next read)."""
    return _counts["spans_dropped"] + _counts["stats_dropped"]


def _after_fork_in_child() -> None:
    """A forked child counts its own: the parent's counts stay the parent's (and a lock
    the fork copied held would never be released)."""
    global _lock
    _lock = threading.Lock()
    _counts.clear()
    _logged.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def reset() -> None:
    """Forget counts and logged kinds (tests)."""
    with _lock:
        _counts.clear()
        _logged.clear()
