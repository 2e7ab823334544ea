"""Statistics on their way to a span: the ``Pending`` objects the background pipeline
polls and applies (rows in a pinned slot, rows already on the host, several devices)."""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Any

from .. import cuda_errors, health
from ..gpu_timing import TIME_ATTR, UNAVAILABLE_ATTR
from ..pipeline import TIME_SOURCE_ATTR
from .decode import (
    DROPPED_ATTR,
    EVENT_NAME,
    NONFINITE_ATTR,
    ROW_BYTES,
    RawStats,
    decode_buffer,
    is_nonfinite,
)
from .ring import SlotRing

CUDA_ERROR_ATTR = "flashinfer.cuda_error"


def _error_name(status: int) -> str:
    """cudaGetErrorName for a negated error code, without a compiled extension."""
    try:
        from cuda.bindings import runtime as cudart  # the device image ships cuda-bindings

        return cudart.cudaGetErrorName(cudart.cudaError_t(abs(status)))[1].decode()
    except Exception:  # noqa: BLE001
        return f"cudaError{abs(status)}"


class StatsPending:
    """Rows on their way into a pinned slot; resolved by the background pipeline.

    ``metas`` describe rows ``0..``; an optional second part (``out_metas``, taken at
    ``out_ts`` with ``out_note``) describes the rows after them, launched later into the
    same slot (a call's outputs after its inputs, one event for both).  The parts are
    plain fields, not a tuple: one object per call is all the garbage collector sees."""

    __slots__ = ("_status", "gpu_time", "metas", "note", "out_metas", "out_note", "out_ts",
                 "ring", "slot", "ts_ns")

    def __init__(self, ring: SlotRing, slot: int, metas: Sequence[Any], ts_ns: int,
                 note: str = "", out_metas: Sequence[Any] | None = None, out_ts: int = 0,
                 out_note: str = "", gpu_time: bool = False) -> None:
        self.ring, self.slot, self.metas, self.ts_ns, self.note = ring, slot, metas, ts_ns, note
        self.out_metas, self.out_ts, self.out_note = out_metas, out_ts, out_note
        #: The call's GPU time is the spare word of row 0 (the inputs' launch ended)
        #: to that of the first row after the inputs (the outputs' launch began): the
        #: C++ hooks stamp them in place of two CUDA events (csrc/stats_hooks.cpp).
        self.gpu_time = gpu_time
        self._status = 1

    def ready(self) -> bool:
        if self._status == 1:
            self._status = self.ring.query(self.slot)
        return self._status != 1

    def apply(self, record: Any) -> None:
        self._apply(record, raw=False)

    def apply_raw(self, record: Any) -> None:
        """``apply`` for the native encoder: the rows go on the record undecoded."""
        self._apply(record, raw=True)

    def _apply(self, record: Any, raw: bool) -> None:
        if self.slot < 0:
            return
        slot, self.slot = self.slot, -1
        if self._status not in (0, 1):
            self.ring.release(slot)
            cuda_errors.mark(record.attributes, _error_name(self._status))
            record.attributes[DROPPED_ATTR] = "cuda_error"
            if self.gpu_time:
                record.attributes[UNAVAILABLE_ATTR] = "cuda_error"
            return
        n = len(self.metas)
        out = self.out_metas
        ring = self.ring
        first = 0
        try:
            rows = ring.read_bytes(slot, n + max(len(out) if out else 0, self.gpu_time))
            if self.gpu_time and ring._anchor is not None:  # noqa: SLF001 - a graph's child
                first = ring.anchor_ns(slot)
        finally:
            ring.release(slot)
        if self.gpu_time:
            stamps = _gpu_time(record.attributes, rows, n)
            if stamps is not None and 0 < first <= stamps[0]:
                # on the GPU timeline, from the replay's host start (its first launch)
                record.start_ns += stamps[0] - first
                record.end_ns = record.start_ns + stamps[1] - stamps[0]
                record.attributes[TIME_SOURCE_ATTR] = "gpu"
        if n or not out:
            if raw:
                record.events.append(RawStats((rows, self.metas, 0, self.ts_ns)))
            else:
                _add_events(record, decode_buffer(rows, self.metas), self.ts_ns)
            if self.note:
                record.attributes[DROPPED_ATTR] = self.note
        if out:
            if raw:
                record.events.append(RawStats((rows, out, n * ROW_BYTES, self.out_ts)))
            else:
                _add_events(record, decode_buffer(rows, out, n * ROW_BYTES), self.out_ts)
            if self.out_note:
                record.attributes[DROPPED_ATTR] = self.out_note

    def abandon(self, record: Any, reason: str) -> None:
        if self.slot >= 0:
            slot, self.slot = self.slot, -1
            self.ring.abandon(slot)
        health.count("stats_dropped")
        if self.out_metas and self.metas:  # two launches' statistics (inputs and outputs)
            health.count("stats_dropped")
        record.attributes[DROPPED_ATTR] = reason
        if self.gpu_time:
            record.attributes[UNAVAILABLE_ATTR] = reason


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
        """Give up on the parts not in yet; those in (a device that finished) still
        go on the span rather than count as dropped."""
        for p in self.parts:
            if p.ready():
                p.apply(record)
            else:
                p.abandon(record, reason)


_STAMP = struct.Struct("<q")
_STAMP_AT = 7 * 8  # the spare word of a row (layout.py)


def _gpu_time(attributes: dict[str, Any], raw: bytes, nin: int) -> tuple[int, int] | None:
    """The call's GPU time from its two stamps onto ``attributes``; the stamps."""
    start = _STAMP.unpack_from(raw, _STAMP_AT)[0]
    end = _STAMP.unpack_from(raw, nin * ROW_BYTES + _STAMP_AT)[0]
    if 0 < start <= end:
        attributes[TIME_ATTR] = end - start
        return start, end
    attributes[UNAVAILABLE_ATTR] = "no_stamp"
    return None


def _add_events(record: Any, events: list[dict[str, Any]], ts_ns: int) -> None:
    for attrs in events:
        record.events.append((EVENT_NAME, attrs, ts_ns))
    if is_nonfinite(events):
        record.attributes[NONFINITE_ATTR] = True


def _dropped(reason: str) -> ReadyPending:
    health.count("stats_dropped")
    return ReadyPending([], time.time_ns(), reason)
