"""Level-5 statistics on the caller's thread: launch, never wait.

Eager CUDA calls: one kernel launch (csrc/) on the current stream covers every
tensor of the call, its rows are copied asynchronously into a slot of a bounded
ring of pinned host memory and an event is recorded; the returned ``Pending`` polls
that event from the background pipeline and turns the rows into
``flashinfer.tensor_stats`` events.  When every slot is busy the statistics are
dropped and counted, never waited for.  CPU tensors are computed right away with
torch ops.  During CUDA graph capture the launch is captured into a persistent
device buffer and a ``GraphStatsSlot`` is returned; ``graphs.py`` calls its
``snapshot`` after each sampled replay.
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


Entry = tuple[str, Any] | PagedSpec


def plan(entries: Iterable[Entry], max_bytes: float, max_rows: int
         ) -> tuple[list[Job], list[RowMeta], int]:
    """Entries -> (jobs, one meta per row, number of tensors left out for lack of rows).

    Non-tensors and dtypes without a statistic (complex, ...) are skipped."""
    jobs: list[Job] = []
    metas: list[RowMeta] = []
    left_out = 0
    for entry in entries:
        if isinstance(entry, PagedSpec):
            parts = entry.cache if isinstance(entry.cache, (tuple, list)) else (entry.cache,)
            parts = [p for p in parts if isinstance(p, torch.Tensor) and p.dtype in _SUPPORTED]
            if not parts:
                continue
            if len(metas) >= max_rows:
                left_out += 1
                continue
            row = len(metas)
            metas.append(RowMeta(entry.name, SCOPE_PAGES, 0))
            jobs.extend(Job(row, p, 1, entry.indices, entry.indptr, int(entry.batch))
                        for p in parts)
            continue
        name, t = entry
        if not isinstance(t, torch.Tensor) or t.dtype not in _SUPPORTED:
            continue
        if len(metas) >= max_rows:
            left_out += 1
            continue
        numel = t.numel()
        item = t.element_size()
        step = 1
        if numel * item > max_bytes:
            step = math.ceil(numel / max(1, int(max_bytes // item)))
        row = len(metas)
        metas.append(RowMeta(name, SCOPE_SAMPLED if step > 1 else SCOPE_FULL, numel))
        jobs.append(Job(row, t, step))
    return jobs, metas, left_out


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
    """A bounded ring of pinned host slots, each with its own CUDA event, for one device.

    Slots are taken on the caller's thread and given back by the background thread;
    a slot given up before its copy landed waits in ``_zombies`` until its event has
    completed, so a late copy can never overwrite a reused slot."""

    def __init__(self, device: torch.device, slots: int, rows: int) -> None:
        self.device = device
        self.rows = rows
        self.host = torch.zeros((slots, rows, ROW_WORDS), dtype=torch.int64, pin_memory=True)
        self._base = self.host.data_ptr()
        self._slot_bytes = rows * ROW_WORDS * 8
        self._native: list[int] = [0] * slots
        self._torch_events: list[Any] = [None] * slots
        self._kind: list[str] = [""] * slots
        self._free: deque[int] = deque(range(slots))
        self._zombies: list[int] = []
        self._lock = threading.Lock()

    def acquire(self) -> int | None:
        with self._lock:
            if not self._free and self._zombies:
                still = []
                for slot in self._zombies:
                    (self._free.append if self._query(slot) != 1 else still.append)(slot)
                self._zombies = still
            return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def abandon(self, slot: int) -> None:
        with self._lock:
            if self._query(slot) == 1:
                self._zombies.append(slot)
            else:
                self._free.append(slot)

    def host_ptr(self, slot: int) -> int:
        return self._base + slot * self._slot_bytes

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


class StatsPending:
    """Rows on their way into a pinned slot; resolved by the background pipeline."""

    __slots__ = ("_status", "metas", "note", "ring", "slot", "ts_ns")

    def __init__(self, ring: SlotRing, slot: int, metas: list[RowMeta], ts_ns: int,
                 note: str = "") -> None:
        self.ring, self.slot, self.metas, self.ts_ns, self.note = ring, slot, metas, ts_ns, note
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
        try:
            rows = self.ring.read(slot, len(self.metas))
        finally:
            self.ring.release(slot)
        _add_events(record, decode_rows(rows, self.metas), self.ts_ns)
        if self.note:
            record.attributes[DROPPED_ATTR] = self.note

    def abandon(self, record: Any, reason: str) -> None:
        if self.slot >= 0:
            slot, self.slot = self.slot, -1
            self.ring.abandon(slot)
        health.count("stats_dropped")
        record.attributes[DROPPED_ATTR] = reason


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
            return self._record(list(entries))
        except Exception as exc:  # noqa: BLE001 - statistics must never break the call
            health.report("stats_errors", "tensor statistics failed", exc)
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
                    ring = SlotRing(torch.device("cuda", index), self.slots, self.rows)
                    self._rings[index] = ring
        return ring

    def _record(self, entries: list[Entry]) -> Any:
        ts = time.time_ns()
        jobs, metas, left_out = plan(entries, self.max_bytes, self.rows)
        if not metas:
            return None
        note = f"too_many_tensors:{left_out}" if left_out else ""
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

    def _record_device(self, device: torch.device, jobs: list[Job], metas: list[RowMeta],
                       ts: int, note: str) -> Any:
        if device.type != "cuda":
            out = torch.zeros((len(metas), ROW_WORDS), dtype=torch.int64)
            with torch.no_grad():
                torch_ops.fill_rows(out, [_to_cpu(j) for j in jobs])
            return ReadyPending(decode_rows(out.tolist(), metas), ts, note)
        module = self._module()
        if torch.cuda.is_current_stream_capturing():
            with torch.cuda.device(device):
                out = torch.empty((len(metas), ROW_WORDS), dtype=torch.int64, device=device)
                _launch_into(out, jobs, module)
            return GraphStatsSlot(self, out, metas, note)
        ring = self._ring(device)
        slot = ring.acquire()
        if slot is None:
            return _dropped("ring_full")
        try:
            if module is not None and _kernel_can_run(jobs):
                # one C++ call: descriptors, launch, async copy, event (device-guarded)
                module.stats_eager([j.tensor for j in jobs], [j.row for j in jobs],
                                   [j.step for j in jobs], [j.indices for j in jobs],
                                   [j.indptr for j in jobs], [j.batch for j in jobs],
                                   len(metas), ring.host_ptr(slot),
                                   ring.native_event(slot, module))
            else:
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
