"""Which span a CUDA error belongs to.

CUDA errors such as an illegal address are sticky: once a kernel faults, every
later query in the process reports the same error.  The pipeline resolves GPU
work in submission order, so the first call whose completion reports an error is
the launch that failed; it gets ``flashinfer.cuda_error`` and ERROR status, and
calls after it only say that an earlier call failed.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_first: str | None = None


def mark(attributes: dict, name: str) -> None:
    """Record a failed completion on a span's attributes (background thread)."""
    global _first
    with _lock:
        first = _first is None
        if first:
            _first = name
    if first or attributes.get("flashinfer.cuda_error") == name:
        attributes["flashinfer.cuda_error"] = name
    else:
        attributes["flashinfer.cuda_error_earlier"] = _first


def reset() -> None:
    """Forget the process's first error (tests)."""
    global _first
    with _lock:
        _first = None
