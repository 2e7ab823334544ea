"""Bounded host memory for payloads on their way to the store.

Every byte copied off the caller's tensors (CPU clones, or pinned buffers that
CUDA copies land in) is counted here until the writer has stored it, so the
recorder's memory stays bounded: a call that does not fit is skipped with
``staging_full`` instead of waiting.  Pinned buffers are kept in power-of-two
size classes and reused, because allocating pinned memory costs milliseconds.
"""

from __future__ import annotations

import threading

import torch

_MIN_CLASS = 1 << 16


def _size_class(nbytes: int) -> int:
    return max(_MIN_CLASS, 1 << (max(nbytes, 1) - 1).bit_length())


class StagingPool:
    """A byte budget plus a free list of pinned buffers."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._used = 0  # bytes handed out and not yet released
        self._pinned_total = 0  # bytes of pinned memory held (free + in use)
        self._free: dict[int, list[torch.Tensor]] = {}

    @property
    def used(self) -> int:
        """Bytes currently held by captures."""
        return self._used

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` of plain (pageable) host memory; False if it does not fit."""
        with self._lock:
            if self._used + nbytes > self.max_bytes:
                return False
            self._used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back plain host memory counted by ``reserve``."""
        with self._lock:
            self._used -= nbytes

    def acquire_pinned(self, nbytes: int) -> torch.Tensor | None:
        """A pinned uint8 buffer of at least ``nbytes``, or None when the pool is full."""
        size = _size_class(nbytes)
        with self._lock:
            if self._used + size > self.max_bytes:
                return None
            free = self._free.get(size)
            if free:
                self._used += size
                return free.pop()
            if self._pinned_total + size > self.max_bytes:
                # drop cached buffers of other sizes to make room
                for other in list(self._free):
                    while self._free[other] and self._pinned_total + size > self.max_bytes:
                        self._free[other].pop()
                        self._pinned_total -= other
                if self._pinned_total + size > self.max_bytes:
                    return None
            self._pinned_total += size
            self._used += size
        try:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            with self._lock:
                self._pinned_total -= size
                self._used -= size
            return None

    def release_pinned(self, buf: torch.Tensor) -> None:
        """Return a pinned buffer once the writer has stored its contents."""
        size = buf.numel()
        with self._lock:
            self._used -= size
            self._free.setdefault(size, []).append(buf)
