"""Bounded rings of pinned host slots (one ring per device) that eager statistics land
in, each slot with its own CUDA event and zero-at-rest device rows."""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .. import health, threads
from . import kernel as _kernel
from .layout import ROW_WORDS


class SlotRing:
    """A bounded ring of pinned host slots, each with its own CUDA event and its own rows
    of a persistent device buffer (zero at rest) with two counters, for one device.

    Slots are taken on the caller's thread and given back by the background thread
    (``deque`` pops and appends are atomic, so the common path takes no lock); a slot
    given up before its copy landed waits in ``_zombies`` until its event has completed,
    so a late copy can never overwrite a reused slot.  Each slot's device rows are only
    written between its acquire and its release, so they need no allocation per call.

    ``on_low`` (the pipeline's wake-up) is called when half the slots are taken: the
    worker otherwise polls on a timer, and a busy engine would fill the ring between
    two polls and lose statistics it had room for."""

    #: Slot 0's word where a graph's first launch stamps its start (``RowWindow``);
    #: an eager ring has none.  The span encoder reads it with ``_base``.
    _anchor: int | None = None

    def __init__(self, device: torch.device, slots: int, rows: int, pin_memory: bool = True,
                 on_low: Callable[[], None] | None = None) -> None:
        self.device = device
        self.on_low = on_low
        self.low_water = slots // 2
        self._armed = True  # on_low fires once, then re-arms above low_water
        self.rows = rows
        self.host = torch.zeros((slots, rows, ROW_WORDS), dtype=torch.int64,
                                pin_memory=pin_memory)
        self._base = self.host.data_ptr()
        # ctypes view of self.host's memory (it holds no reference: self.host, never
        # reassigned, keeps the memory alive)
        self._raw = (ctypes.c_char * (self.host.numel() * 8)).from_address(self._base)
        self._slot_bytes = rows * ROW_WORDS * 8
        # one zeroed int64 device buffer, made in the background: slot rows
        # [slots, rows, ROW_WORDS], then two counter words per slot (inputs, outputs)
        self._dev: torch.Tensor | None = None
        self._dev_base = 0  # slot 0's device rows; 0 until allocated (fast path off)
        self._ctr_base = 0
        self._pub_base = 0  # device address of self.host (publish target)
        self._dev_failed = False
        self._dev_thread: threading.Thread | None = None
        self._native: list[int] = [0] * slots
        self._torch_events: list[Any] = [None] * slots
        self._kind: list[str] = [""] * slots
        self._free: deque[int] = deque(range(slots))
        self._zombies: list[int] = []
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        try:
            slot = self._free.popleft()
        except IndexError:
            pass
        else:
            if self._armed and len(self._free) <= self.low_water:
                self._low()
            return slot
        with self._lock:
            if not self._free and self._zombies:
                still = []
                for slot in self._zombies:
                    (self._free.append if self._query(slot) != 1 else still.append)(slot)
                self._zombies = still
            try:
                return self._free.popleft()
            except IndexError:
                return None

    def release(self, slot: int) -> None:
        self._free.append(slot)
        if not self._armed and len(self._free) > self.low_water:
            self._armed = True

    def _low(self) -> None:
        """Once per crossing below half free: a few microseconds per half ring.  A race
        between threads at worst wakes the worker twice or not at all (its timer still
        drains the ring)."""
        self._armed = False
        if self.on_low is not None:
            try:
                self.on_low()
            except Exception as exc:  # noqa: BLE001 - the slot is taken: never lose it
                health.report("stats_errors", "the statistics ring's wake-up failed", exc)

    def abandon(self, slot: int) -> None:
        with self._lock:
            if self._query(slot) == 1:
                self._zombies.append(slot)
            else:
                self._free.append(slot)

    def host_ptr(self, slot: int) -> int:
        return self._base + slot * self._slot_bytes

    def device_base(self, module: Any) -> int:
        """Address of the device rows of slot 0, or 0 while the fast path is not ready:
        the zeroed buffer is made on a background thread (it must be complete before
        any stream uses it, which takes a device synchronize that the caller's thread
        must never do), and stays 0 where the host rows have no device address."""
        if self._dev_base or self._dev_failed:
            return self._dev_base
        with self._lock:
            if self._dev_thread is None:
                self._dev_thread = threading.Thread(
                    target=self._allocate_device, args=(module,), daemon=True,
                    name="otel_flashinfer-stats-ring")
                threads.start(self._dev_thread)
        return 0

    def _allocate_device(self, module: Any) -> None:
        from .. import capture_guard

        try:
            # A synchronize while another thread captures a graph would break it.
            with capture_guard.gpu_queries(block=True), torch.cuda.device(self.device):
                pub = int(module.host_device_ptr(self._base))
                if not pub:
                    self._dev_failed = True
                    return
                slots = self.host.shape[0]
                rows_words = self.host.numel()
                words = rows_words + 2 * slots
                dev = torch.zeros(words, dtype=torch.int64, device=self.device)
                # Each slot's event here too: cudaEventCreate costs tens of microseconds,
                # which would otherwise land on the caller's first call per slot.
                # A failure leaves the remaining slots to native_event's lazy path.
                try:
                    for slot in range(slots):
                        if not self._native[slot]:
                            event = int(module.event_create())
                            with self._lock:  # native_event may have made one meanwhile
                                if self._native[slot]:
                                    module.event_destroy(event)
                                else:
                                    self._native[slot] = event
                except Exception as exc:  # noqa: BLE001
                    health.report("stats_errors", "could not make the ring's CUDA events "
                                  "ahead; calls make them as needed", exc)
                torch.cuda.synchronize(self.device)  # zero before any stream uses it
                base = dev.data_ptr()
                self._dev = dev
                self._ctr_base = base + rows_words * 8
                self._pub_base = pub
                self._dev_base = base  # last: the fast path starts here
        except Exception as exc:  # noqa: BLE001 - the general path keeps working
            self._dev_failed = True
            health.report("stats_errors", "could not set up the statistics ring", exc)

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """For tests and benchmarks: wait for the fast path's device buffer."""
        thread = self._dev_thread
        if thread is not None:
            thread.join(timeout_s)
        return bool(self._dev_base)

    def counter(self, slot: int, side: int) -> int:
        """Device address of a slot's counter for its inputs (0) or outputs (1)."""
        return self._ctr_base + (2 * slot + side) * 8

    def pub_ptr(self, slot: int) -> int:
        return self._pub_base + slot * self._slot_bytes

    @property
    def fast_ready(self) -> bool:
        """Whether the kernel's fast path can use this ring (device rows made)."""
        return bool(self._dev_base)

    def dev_rows(self, slot: int) -> int:
        """Device address of ``slot``'s zero-at-rest rows (after ``fast_ready``)."""
        return self._dev_base + slot * self._slot_bytes

    def native_event(self, slot: int, module: Any) -> int:
        """The slot's raw CUDA event (created once, on this ring's device)."""
        event = self._native[slot]
        if not event:
            with self._lock, torch.cuda.device(self.device):
                event = self._native[slot]
                if not event:
                    event = self._native[slot] = int(module.event_create())
        self._kind[slot] = "native"
        return event

    def torch_event(self, slot: int) -> Any:
        if self._torch_events[slot] is None:
            self._torch_events[slot] = torch.cuda.Event()
        self._kind[slot] = "torch"
        return self._torch_events[slot]

    def _query(self, slot: int) -> int:
        """0 done, 1 pending, other: a CUDA error code."""
        try:
            if self._kind[slot] == "native":
                module = _kernel.get()
                return int(module.event_query(self._native[slot])) if module else 0
            if self._kind[slot] == "torch":
                return 0 if self._torch_events[slot].query() else 1
        except Exception:  # noqa: BLE001 - a failed query means a failed stream
            return -1
        return 0

    def query(self, slot: int) -> int:
        return self._query(slot)

    def read_bytes(self, slot: int, nrows: int) -> bytes:
        """A copy of ``slot``'s first ``nrows`` rows as raw bytes (``decode_buffer``): a
        plain memcpy rather than torch indexing and ``tolist``."""
        start = slot * self._slot_bytes
        return self._raw[start:start + min(nrows, self.rows) * ROW_WORDS * 8]
