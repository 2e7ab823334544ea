"""Level-5 statistics on the caller's thread: launch, never wait.

Eager CUDA calls: one kernel launch (csrc/) on the current stream covers every
tensor of the call, into the rows of a slot of a bounded ring (each slot has its
own persistent device rows, zero at rest, two device counters, pinned host rows and
a CUDA event); the launch's last block publishes the rows straight into the slot's
pinned memory and zeroes them again (no memset, no copy) and the event is
recorded; the returned
``Pending`` polls that event from the background pipeline and turns the rows into
``flashinfer.tensor_stats`` events.  The span hooks use ``begin``/``finish``: a
call's inputs are launched before it and its outputs after it into the same slot,
with one event for both (one C++ call per side, planned in flat lists).
When every slot is busy the statistics are dropped and counted, never waited for.
CPU tensors are computed right away with torch ops.  During CUDA graph capture the
launch is captured (a memset node and the kernel) into a persistent device buffer
and a ``GraphStatsSlot`` is returned; ``graphs.py`` calls its ``snapshot`` after each
sampled replay.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import cuda_errors, health
from . import kernel as _kernel
from . import torch_ops
from .decode import (
    DROPPED_ATTR,
    EVENT_NAME,
    NONFINITE_ATTR,
    SCOPE_FULL,
    SCOPE_PAGES,
    SCOPE_SAMPLED,
    RowMeta,
    decode_rows,
    is_nonfinite,
)
from .layout import KERNEL_DTYPES, ROW_WORDS

CUDA_ERROR_ATTR = "flashinfer.cuda_error"


def _error_name(status: int) -> str:
    """cudaGetErrorName for a negated error code, without a compiled extension."""
    try:
        from cuda.bindings import runtime as cudart  # the device image ships cuda-bindings

        return cudart.cudaGetErrorName(cudart.cudaError_t(abs(status)))[1].decode()
    except Exception:  # noqa: BLE001
        return f"cudaError{abs(status)}"
_SUPPORTED = {getattr(torch, name) for name in KERNEL_DTYPES if hasattr(torch, name)}


@dataclass(frozen=True)
class PagedSpec:
    """A paged KV-cache argument: statistics cover only the pages that
    ``indices[indptr[0]:indptr[batch]]`` reference, read on the device.

    ``cache`` is ``[num_pages, ...]`` or a ``(k, v)`` pair of such tensors (one row).
    """

    name: str
    cache: Any
    indices: torch.Tensor
    indptr: torch.Tensor
    batch: int


@dataclass
class Job:
    """One tensor read into output row ``row``."""

    row: int
    tensor: torch.Tensor
    step: int = 1
    indices: torch.Tensor | None = None
    indptr: torch.Tensor | None = None
    batch: int = 0


#: An entry: ``(name, value)``, a ``PagedSpec``, or the same paged argument as a plain
#: tuple ``(name, cache, indices, indptr, batch)`` (what the hooks build: no dataclass).
Entry = tuple[str, Any] | PagedSpec | tuple[str, Any, torch.Tensor, torch.Tensor, int]

#: ints per tensor in the flat launch list (csrc ``kSlotItemInts``):
#: tensor index, row, step, indices index (-1: none), indptr index (-1: none), batch.
ITEM_INTS = 6
_TENSOR = torch.Tensor
_FULL_OR_SAMPLED = (SCOPE_FULL, SCOPE_SAMPLED)


def _plan_flat(entries: Iterable[Entry], max_bytes: float, max_rows: int, row0: int = 0
               ) -> tuple[list[Any], list[int], list[tuple[str, str, int]], int]:
    """Entries -> (tensors, flat items, one ``(name, scope, numel)`` per row, left out).

    The one planner behind ``plan`` and the kernel's fast path: ``items`` holds
    ``ITEM_INTS`` ints per tensor read, rows numbered from ``row0``, index fields
    pointing into ``tensors``.  Non-tensors and dtypes without a statistic are skipped."""
    tensors: list[Any] = []
    items: list[int] = []
    metas: list[tuple[str, str, int]] = []
    left_out = 0
    supported = _SUPPORTED
    for entry in entries:
        if isinstance(entry, PagedSpec):
            name, cache, indices, indptr, batch = (entry.name, entry.cache, entry.indices,
                                                   entry.indptr, entry.batch)
        elif len(entry) == 5:
            name, cache, indices, indptr, batch = entry
        else:
            name, t = entry
            if not isinstance(t, _TENSOR) or t.dtype not in supported:
                continue
            if len(metas) >= max_rows:
                left_out += 1
                continue
            numel = t.numel()
            step = 1
            if numel * 8 > max_bytes:  # no dtype is wider than 8 bytes
                item = t.element_size()
                if numel * item > max_bytes:
                    step = math.ceil(numel / max(1, int(max_bytes // item)))
            metas.append((name, _FULL_OR_SAMPLED[step > 1], numel))
            items += (len(tensors), row0 + len(metas) - 1, step, -1, -1, 0)
            tensors.append(t)
            continue
        parts = cache if isinstance(cache, (tuple, list)) else (cache,)
        parts = [p for p in parts if isinstance(p, _TENSOR) and p.dtype in supported]
        if not parts:
            continue
        if len(metas) >= max_rows:
            left_out += 1
            continue
        row = row0 + len(metas)
        metas.append((name, SCOPE_PAGES, 0))
        first = len(tensors)
        tensors += parts
        tensors.append(indices)
        tensors.append(indptr)
        ix = first + len(parts)
        batch = int(batch)
        for k in range(len(parts)):
            items += (first + k, row, 1, ix, ix + 1, batch)
    return tensors, items, metas, left_out


def _jobs_of(tensors: list[Any], items: list[int], row0: int = 0) -> list[Job]:
    jobs = []
    for k in range(0, len(items), ITEM_INTS):
        ti, row, step, ii, pi, batch = items[k:k + ITEM_INTS]
        jobs.append(Job(row - row0, tensors[ti], step, tensors[ii] if ii >= 0 else None,
                        tensors[pi] if pi >= 0 else None, batch))
    return jobs


def _flat_of(jobs: Sequence[Job]) -> tuple[list[Any], list[int]]:
    tensors: list[Any] = []
    items: list[int] = []
    for job in jobs:
        items += (len(tensors), job.row, job.step, -1, -1, job.batch)
        tensors.append(job.tensor)
        if job.indices is not None:
            items[-3] = len(tensors)
            items[-2] = len(tensors) + 1
            tensors.append(job.indices)
            tensors.append(job.indptr)
    return tensors, items


def plan(entries: Iterable[Entry], max_bytes: float, max_rows: int
         ) -> tuple[list[Job], list[RowMeta], int]:
    """Entries -> (jobs, one meta per row, number of tensors left out for lack of rows).

    Non-tensors and dtypes without a statistic (complex, ...) are skipped."""
    tensors, items, metas, left_out = _plan_flat(entries, max_bytes, max_rows)
    return _jobs_of(tensors, items), [RowMeta(*m) for m in metas], left_out


def _kernel_can_run(jobs: Sequence[Job]) -> bool:
    for job in jobs:
        if job.indices is not None and (
            job.indices.dtype != torch.int32 or job.indptr is None
            or job.indptr.dtype != torch.int32 or not job.indices.is_contiguous()
            or not job.indptr.is_contiguous() or job.indices.device != job.tensor.device
            or job.indptr.device != job.tensor.device
        ):
            return False
    return True


def _launch_into(out: torch.Tensor, jobs: Sequence[Job], module: Any) -> None:
    """Statistics of ``jobs`` into device buffer ``out`` on the current stream."""
    if module is not None and _kernel_can_run(jobs):
        module.stats_into(out, [j.tensor for j in jobs], [j.row for j in jobs],
                          [j.step for j in jobs], [j.indices for j in jobs],
                          [j.indptr for j in jobs], [j.batch for j in jobs], True)
    else:
        with torch.no_grad():
            torch_ops.fill_rows(out, list(jobs))


class SlotRing:
    """A bounded ring of pinned host slots, each with its own CUDA event and its own rows
    of a persistent device buffer (zero at rest) with two counters, for one device.

    Slots are taken on the caller's thread and given back by the background thread
    (``deque`` pops and appends are atomic, so the common path takes no lock); a slot
    given up before its copy landed waits in ``_zombies`` until its event has completed,
    so a late copy can never overwrite a reused slot.  Each slot's device rows are only
    written between its acquire and its release, so they need no allocation per call."""

    def __init__(self, device: torch.device, slots: int, rows: int, pin_memory: bool = True
                 ) -> None:
        self.device = device
        self.rows = rows
        self.host = torch.zeros((slots, rows, ROW_WORDS), dtype=torch.int64,
                                pin_memory=pin_memory)
        self._base = self.host.data_ptr()
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
            return self._free.popleft()
        except IndexError:
            pass
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
                self._dev_thread.start()
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

    def native_event(self, slot: int, module: Any) -> int:
        """The slot's raw CUDA event (created once, on this ring's device)."""
        event = self._native[slot]
        if not event:
            with torch.cuda.device(self.device):
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

    def read(self, slot: int, nrows: int) -> list[list[int]]:
        return self.host[slot, :nrows].tolist()


def _row_metas(metas: Sequence[Any]) -> list[Any]:
    """RowMeta objects for decode_rows (the fast path keeps plain tuples)."""
    return [RowMeta(*m) if type(m) is tuple else m for m in metas]


class StatsPending:
    """Rows on their way into a pinned slot; resolved by the background pipeline.

    ``metas`` describe rows ``0..``; an optional second part (``out``: metas, ts, note)
    describes the rows after them, launched later into the same slot (a call's outputs
    after its inputs, one event for both)."""

    __slots__ = ("_status", "metas", "note", "out", "ring", "slot", "ts_ns")

    def __init__(self, ring: SlotRing, slot: int, metas: list[Any], ts_ns: int,
                 note: str = "", out: tuple[list[Any], int, str] | None = None) -> None:
        self.ring, self.slot, self.metas, self.ts_ns, self.note = ring, slot, metas, ts_ns, note
        self.out = out
        self._status = 1

    def ready(self) -> bool:
        if self._status == 1:
            self._status = self.ring.query(self.slot)
        return self._status != 1

    def apply(self, record: Any) -> None:
        if self.slot < 0:
            return
        slot, self.slot = self.slot, -1
        if self._status not in (0, 1):
            self.ring.release(slot)
            cuda_errors.mark(record.attributes, _error_name(self._status))
            record.attributes[DROPPED_ATTR] = "cuda_error"
            return
        n = len(self.metas)
        out = self.out
        try:
            rows = self.ring.read(slot, n + (len(out[0]) if out else 0))
        finally:
            self.ring.release(slot)
        if n or not out:
            _add_events(record, decode_rows(rows, _row_metas(self.metas)), self.ts_ns)
            if self.note:
                record.attributes[DROPPED_ATTR] = self.note
        if out:
            _add_events(record, decode_rows(rows[n:], _row_metas(out[0])), out[1])
            if out[2]:
                record.attributes[DROPPED_ATTR] = out[2]

    def abandon(self, record: Any, reason: str) -> None:
        if self.slot >= 0:
            slot, self.slot = self.slot, -1
            self.ring.abandon(slot)
        health.count("stats_dropped")
        if self.out and self.metas:  # two launches' statistics (inputs and outputs)
            health.count("stats_dropped")
        record.attributes[DROPPED_ATTR] = reason


class _Open:
    """A call's input statistics launched into a slot, waiting for its outputs
    (``StatsRecorder.finish``): the rows after the inputs are left for the outputs, so
    both sides share one event."""

    __slots__ = ("device", "metas", "note", "ring", "slot", "stream", "ts_ns")

    def __init__(self, ring: SlotRing, slot: int, metas: list[Any], ts_ns: int, note: str,
                 stream: int, device: int) -> None:
        self.ring, self.slot, self.metas, self.ts_ns, self.note = ring, slot, metas, ts_ns, note
        self.stream, self.device = stream, device


class ReadyPending:
    """Statistics already on the host (CPU tensors) or a drop to report."""

    __slots__ = ("events", "note", "ts_ns")

    def __init__(self, events: list[dict[str, Any]], ts_ns: int, note: str = "") -> None:
        self.events, self.ts_ns, self.note = events, ts_ns, note

    def ready(self) -> bool:
        return True

    def apply(self, record: Any) -> None:
        _add_events(record, self.events, self.ts_ns)
        if self.note:
            record.attributes[DROPPED_ATTR] = self.note

    def abandon(self, record: Any, reason: str) -> None:
        self.apply(record)


class MultiPending:
    """Several pendings (one per device) seen as one."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def ready(self) -> bool:
        return all(p.ready() for p in self.parts)

    def apply(self, record: Any) -> None:
        for p in self.parts:
            p.apply(record)

    def abandon(self, record: Any, reason: str) -> None:
        for p in self.parts:
            p.abandon(record, reason)


def _add_events(record: Any, events: list[dict[str, Any]], ts_ns: int) -> None:
    for attrs in events:
        record.events.append((EVENT_NAME, attrs, ts_ns))
    if is_nonfinite(events):
        record.attributes[NONFINITE_ATTR] = True


def _dropped(reason: str) -> ReadyPending:
    health.count("stats_dropped")
    return ReadyPending([], time.time_ns(), reason)


class GraphStatsSlot:
    """The statistics launch of one captured call: a persistent device buffer that
    every replay of the graph refills.  ``snapshot`` (after a sampled replay) copies it
    into a pinned slot on ``stream`` and returns the Pending for that replay's span."""

    def __init__(self, recorder: StatsRecorder, out: torch.Tensor, metas: list[RowMeta],
                 note: str = "") -> None:
        self.recorder, self.out, self.metas, self.note = recorder, out, metas, note

    def snapshot(self, stream: Any = None, ts_ns: int | None = None) -> Any:
        ts = ts_ns if ts_ns is not None else time.time_ns()
        try:
            return self.recorder._copy_out(self.out, self.metas, stream, ts, self.note)
        except Exception as exc:  # noqa: BLE001
            health.report("stats_errors", "graph statistics snapshot failed", exc)
            return _dropped("error")


class StatsRecorder:
    """Caller-thread API of level 5 (one per runtime)."""

    def __init__(self, stats_max_mb: float = 64.0, slots: int = 256, rows_per_slot: int = 64,
                 use_kernel: bool = True) -> None:
        self.max_bytes = stats_max_mb * 2**20
        self.slots = slots
        self.rows = rows_per_slot
        self.use_kernel = use_kernel
        self._rings: dict[int, SlotRing] = {}
        self._lock = threading.Lock()
        if use_kernel and torch.cuda.is_available():
            _kernel.warmup()

    # -- public --------------------------------------------------------------------
    def before(self, inputs: Iterable[Entry]) -> Any:
        """Statistics of a call's inputs, launched now (before the kernel runs)."""
        return self.record(inputs)

    def after(self, outputs: Iterable[Entry]) -> Any:
        """Statistics of a call's outputs, launched now (after the kernel ran)."""
        return self.record(outputs)

    def record(self, entries: Iterable[Entry]) -> Any:
        """A ``Pending`` (eager) or a ``GraphStatsSlot`` (under capture), or ``None``
        when there is nothing to measure.  Never raises."""
        try:
            return self._record(entries if type(entries) is list else list(entries))
        except Exception as exc:  # noqa: BLE001 - statistics must never break the call
            health.report("stats_errors", "tensor statistics failed", exc)
            return _dropped("error")

    def begin(self, inputs: Iterable[Entry]) -> Any:
        """``before`` for a call whose ``finish`` follows (the span hooks).

        On the kernel's eager path the inputs' statistics are launched now and an open
        state is returned that ``finish`` completes together with the outputs (one
        event).  Otherwise the same as ``before``; ``is_open`` tells which."""
        entries = inputs if type(inputs) is list else list(inputs)
        try:
            module = self._module()
            if module is not None:
                ts = time.time_ns()
                flat = _plan_flat(entries, self.max_bytes, self.rows)
                tensors, items, metas, left_out = flat
                if not metas:
                    return None
                device = tensors[0].get_device()
                ring = self._rings.get(device) if device >= 0 else None
                slot = ring.acquire() if ring is not None and ring._dev_base else None
                if slot is not None:  # else: capture, ring full... decided by _record
                    try:
                        stream = module.stats_slot(
                            tensors, items, device, ring._dev_base + slot * ring._slot_bytes,
                            ring.rows, 0, len(metas), ring.pub_ptr(slot),
                            ring.counter(slot, 0), 0, -1)
                    except BaseException:
                        ring.release(slot)
                        raise
                    if stream >= 0:
                        note = f"too_many_tensors:{left_out}" if left_out else ""
                        return _Open(ring, slot, metas, ts, note, stream, device)
                    ring.release(slot)
                return self._record(entries, ts, flat)
            return self._record(entries)
        except Exception as exc:  # noqa: BLE001 - statistics must never break the call
            health.report("stats_errors", "tensor statistics failed", exc)
            return _dropped("error")

    @staticmethod
    def is_open(state: Any) -> bool:
        return type(state) is _Open

    def finish(self, state: Any, outputs: Iterable[Entry]) -> Any:
        """Outputs' statistics after ``begin``: for an open state one Pending covering
        inputs and outputs (or a tuple of two outcomes when the outputs cannot share
        the slot), else the same as ``after``.  Never raises."""
        if type(state) is not _Open:
            return self.record(outputs)
        try:
            return self._finish(state, outputs if type(outputs) is list else list(outputs))
        except Exception as exc:  # noqa: BLE001
            health.report("stats_errors", "tensor statistics failed", exc)
            if state.slot >= 0:
                state.ring.release(state.slot)
                state.slot = -1
            return _dropped("error")

    # -- internals -----------------------------------------------------------------
    def _module(self) -> Any:
        return _kernel.get() if self.use_kernel else None

    def _ring(self, device: torch.device) -> SlotRing:
        index = device.index if device.index is not None else torch.cuda.current_device()
        ring = self._rings.get(index)
        if ring is None:
            with self._lock:
                ring = self._rings.get(index)
                if ring is None:
                    # room for a call's inputs and its outputs (begin/finish share a slot)
                    ring = SlotRing(torch.device("cuda", index), self.slots, 2 * self.rows)
                    self._rings[index] = ring
        return ring

    def _event(self, ring: SlotRing, slot: int, module: Any) -> int:
        event = ring._native[slot]
        if not event:
            return ring.native_event(slot, module)
        ring._kind[slot] = "native"
        return event

    def _finish(self, state: _Open, outputs: list[Entry]) -> Any:
        ring, slot, nin = state.ring, state.slot, len(state.metas)
        module = _kernel.get()
        ts = time.time_ns()
        tensors, items, metas, left_out = (
            _plan_flat(outputs, self.max_bytes, self.rows, nin) if outputs else ((), (), (), 0))
        failed = False
        if metas and tensors[0].get_device() == state.device:
            try:
                stream = module.stats_slot(
                    tensors, items, state.device, ring._dev_base + slot * ring._slot_bytes,
                    ring.rows, nin, nin + len(metas), ring.pub_ptr(slot),
                    ring.counter(slot, 1), self._event(ring, slot, module), state.stream)
            except Exception as exc:  # noqa: BLE001 - the inputs' statistics still count
                health.report("stats_errors", "tensor statistics failed", exc)
                stream, failed = -3, True
            if stream >= 0:
                state.slot = -1
                note = f"too_many_tensors:{left_out}" if left_out else ""
                return StatsPending(ring, slot, state.metas, state.ts_ns, state.note,
                                    (metas, ts, note))
        # the inputs alone, then the outputs on their own (another device, a capture...)
        stream = module.stats_slot([], [], state.device, ring._dev_base + slot * ring._slot_bytes,
                                   ring.rows, nin, nin, ring.pub_ptr(slot), ring.counter(slot, 1),
                                   self._event(ring, slot, module), state.stream)
        state.slot = -1
        if stream >= 0:
            pin: Any = StatsPending(ring, slot, state.metas, state.ts_ns, state.note)
        else:  # the stream began capturing since begin: no eager copy possible
            ring.release(slot)
            pin = _dropped("error")
        if not outputs:
            return pin
        if failed:  # reported above; the general path would fail the same way
            return (pin, _dropped("error"))
        out = self.record(outputs)
        return pin if out is None else (pin, out)

    def _record(self, entries: list[Entry], ts: int = 0, flat: Any = None) -> Any:
        ts = ts or time.time_ns()
        tensors, items, flat_metas, left_out = flat or _plan_flat(entries, self.max_bytes,
                                                                  self.rows)
        if not flat_metas:
            return None
        note = f"too_many_tensors:{left_out}" if left_out else ""
        module = self._module()
        if module is not None and flat is None:  # fast path: one device, a ring that exists
            device = tensors[0].get_device()
            ring = self._rings.get(device) if device >= 0 else None
            if ring is not None and ring._dev_base:
                pending = self._launch_slot(module, ring, device, tensors, items, flat_metas,
                                            ts, note)
                if pending is not None:
                    return pending
        jobs, metas = _jobs_of(tensors, items), [RowMeta(*m) for m in flat_metas]
        groups: dict[Any, list[int]] = {}
        for job in jobs:
            groups.setdefault(job.tensor.device, []).append(job.row)
        if len(groups) == 1:
            device = next(iter(groups))
            return self._record_device(device, jobs, metas, ts, note)
        parts = []
        for device, rows in groups.items():  # rare: one call across devices
            keep = sorted(set(rows))
            remap = {r: i for i, r in enumerate(keep)}
            sub_jobs = [Job(remap[j.row], j.tensor, j.step, j.indices, j.indptr, j.batch)
                        for j in jobs if j.tensor.device == device]
            parts.append(self._record_device(device, sub_jobs, [metas[r] for r in keep], ts,
                                             note))
        if any(isinstance(p, GraphStatsSlot) for p in parts):
            return next(p for p in parts if isinstance(p, GraphStatsSlot))
        return MultiPending(parts)

    def _launch_slot(self, module: Any, ring: SlotRing, device: int, tensors: list[Any],
                     items: list[int], metas: list[Any], ts: int, note: str) -> Any:
        """Kernel launch (publishing into the pinned slot) + event into a slot of ``ring``:
        a Pending, or None when
        the call must take the general path (``_record_device`` decides what a capture,
        a full ring or tensors the kernel cannot read here become)."""
        slot = ring.acquire()
        if slot is None:
            return None
        n = len(metas)
        try:
            stream = module.stats_slot(
                tensors, items, device, ring._dev_base + slot * ring._slot_bytes, ring.rows, 0,
                n, ring.pub_ptr(slot), ring.counter(slot, 0), self._event(ring, slot, module),
                -1)
        except BaseException:
            ring.release(slot)
            raise
        if stream < 0:
            ring.release(slot)
            return None
        return StatsPending(ring, slot, metas, ts, note)

    def _record_device(self, device: torch.device, jobs: list[Job], metas: list[RowMeta],
                       ts: int, note: str) -> Any:
        if device.type != "cuda":
            out = torch.zeros((len(metas), ROW_WORDS), dtype=torch.int64)
            with torch.no_grad():
                torch_ops.fill_rows(out, [_to_cpu(j) for j in jobs])
            return ReadyPending(decode_rows(out.tolist(), metas), ts, note)
        module = self._module()
        if torch.cuda.is_current_stream_capturing():
            # Captured: a memset node and the launch.  Inside a graph the memset costs
            # less GPU time than the kernel's last-block publish (measured on an H100:
            # a decode step with both statistics launches 1.80x vs 1.93x of the bare
            # step), and no host cost repeats per replay.
            with torch.cuda.device(device):
                out = torch.empty((len(metas), ROW_WORDS), dtype=torch.int64, device=device)
                _launch_into(out, jobs, module)
            return GraphStatsSlot(self, out, metas, note)
        ring = self._ring(device)
        if module is not None and _kernel_can_run(jobs) and ring.device_base(module):
            tensors, items = _flat_of(jobs)
            pending = self._launch_slot(module, ring, ring.device.index, tensors, items, metas,
                                        ts, note)
            if pending is not None:
                return pending
        slot = ring.acquire()
        if slot is None:
            return _dropped("ring_full")
        try:
            with torch.cuda.device(device), torch.no_grad():
                out = torch.empty((len(metas), ROW_WORDS), dtype=torch.int64, device=device)
                torch_ops.fill_rows(out, jobs)
                ring.host[slot, : len(metas)].copy_(out, non_blocking=True)
                ring.torch_event(slot).record()
        except Exception:
            ring.release(slot)
            raise
        return StatsPending(ring, slot, metas, ts, note)

    def _copy_out(self, out: torch.Tensor, metas: list[RowMeta], stream: Any, ts: int,
                  note: str) -> Any:
        ring = self._ring(out.device)
        slot = ring.acquire()
        if slot is None:
            return _dropped("ring_full")
        module = self._module()
        stream = stream if stream is not None else torch.cuda.current_stream(out.device)
        try:
            with torch.cuda.device(out.device), torch.cuda.stream(stream):
                if module is not None:
                    module.snapshot(out, ring.host_ptr(slot), ring.native_event(slot, module))
                else:
                    ring.host[slot, : out.shape[0]].copy_(out, non_blocking=True)
                    ring.torch_event(slot).record(stream)
        except Exception:
            ring.release(slot)
            raise
        return StatsPending(ring, slot, metas, ts, note)


def _to_cpu(job: Job) -> Job:
    """Index buffers of a CPU cache may live anywhere; statistics of CPU tensors are CPU."""
    if job.indices is None or job.indices.device.type == "cpu":
        return job
    return Job(job.row, job.tensor, job.step, job.indices.cpu(), job.indptr.cpu(), job.batch)
