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

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from .. import health
from . import kernel as _kernel
from . import overlap, torch_ops
from .decode import ROW_BYTES, RowMeta, decode_rows
from .graph_rows import GraphRows, lend_encoder
from .layout import ROW_WORDS
from .pending import (
    MultiPending,
    ReadyPending,
    StatsPending,
    _dropped,
)
from .planning import (
    Entry,
    Job,
    PagedSpec,
    _flat_of,
    _jobs_of,
    _kernel_can_run,
    _plan_flat,
    _to_cpu,
    plan,
)
from .ring import SlotRing

__all__ = ["GraphStatsSlot", "PagedSpec", "StatsRecorder", "plan"]

_SPARE = 7 * 8  # a row's spare word (layout.py): where GPU-clock stamps go


def _launch_into(out: torch.Tensor, jobs: Sequence[Job], module: Any, row0: int = 0,
                 zero: bool = True, launch: dict[str, int] | None = None,
                 **stamps: int) -> bool:
    """Statistics of ``jobs`` into rows ``row0..`` of device buffer ``out`` on the current
    stream.  With ``row0`` the rows before it are left alone, and the kernel adds into
    rows already zeroed (a captured call's outputs after its inputs: one memset node);
    ``zero=False``: every row is zeroed already (a graph's chunk, ``GraphRows``).
    ``stamps`` (``counter``, ``stamp_start``, ``stamp_end``: device addresses) have the
    kernel stamp the GPU clock; ``launch`` says how it runs, not what it stamps
    (``gate``: skipped on untraced replays, ``sm_limit``: its wave's size, ``branch``:
    on our branch beside the call).  Returns
    whether it ran (torch ops stamp nothing)."""
    if module is not None and _kernel_can_run(jobs):
        launched = module.stats_into(out, [j.tensor for j in jobs], [j.row for j in jobs],
                                     [j.step for j in jobs], [j.indices for j in jobs],
                                     [j.indptr for j in jobs], [j.batch for j in jobs],
                                     zero and row0 == 0, [j.last_page_len for j in jobs],
                                     [j.slot_dim for j in jobs], **stamps,
                                     **(launch or {}))
        return bool(launched)  # nothing to read (empty tensors): no launch, no stamp
    with torch.no_grad():
        torch_ops.fill_rows(out[row0:], [replace(j, row=j.row - row0) for j in jobs])
    return False


class _Open:
    """A call's input statistics launched into a slot, waiting for its outputs
    (``StatsRecorder.finish``): the rows after the inputs are left for the outputs, so
    both sides share one event."""

    __slots__ = ("device", "metas", "note", "ring", "slot", "stream", "ts_ns")

    def __init__(self, ring: SlotRing, slot: int, metas: list[Any], ts_ns: int, note: str,
                 stream: int, device: int) -> None:
        self.ring, self.slot, self.metas, self.ts_ns, self.note = ring, slot, metas, ts_ns, note
        self.stream, self.device = stream, device


class _GraphOpen:
    """A captured call's input statistics, waiting for its outputs (``finish``): the
    outputs' launch adds into the rows after the inputs' in the same device buffer, which
    one memset node zeroes per replay and one copy per replay reads back."""

    __slots__ = ("slot",)

    def __init__(self, slot: GraphStatsSlot) -> None:
        self.slot = slot


class GraphStatsSlot:
    """The statistics launch of one captured call: device rows that every replay of the
    graph refills.  Rows of the graph's ``GraphRows`` (``graph_rows``, ``at``) are read
    back with the rest of the graph, one copy per traced replay; rows of their own are
    copied by ``snapshot`` (after a sampled replay), which returns the Pending for that
    replay's span."""

    def __init__(self, recorder: StatsRecorder, out: torch.Tensor, metas: list[RowMeta],
                 note: str = "", room: int = 0, graph_rows: GraphRows | None = None,
                 at: tuple[int, int] = (0, 0), stamped: bool = False) -> None:
        self.recorder, self.out, self.metas, self.note = recorder, out, metas, note
        #: Zeroed rows after ``metas`` that a call's outputs can still take (``begin``).
        self.room = room
        self.graph_rows, self.at = graph_rows, at
        #: Rows of the inputs; the outputs' follow them (``finish``).
        self.nin = len(metas)
        #: The inputs' launch stamps the GPU clock as it ends into row 0 (spare word):
        #: the outputs' launch stamping its start into row ``nin`` makes ``timed``.
        self.stamped = stamped
        #: Each replay's child gets the call's GPU time from the two stamps, as an
        #: eager call does (``StatsPending.gpu_time``).
        self.timed = False
        #: The stream the inputs' launch forked onto (``overlap``), until ``finish``
        #: joins it back after the outputs' launch; None: no fork.
        self.branch: Any = None

    def _trim(self, give_back: bool = True) -> GraphStatsSlot:
        """Done adding rows: replays copy only the rows in use.  ``give_back=False``
        (a launch into the room may have happened): the room stays taken."""
        if self.graph_rows is not None and self.room and give_back:
            self.graph_rows.trim(self.at, self.out.shape[0], len(self.metas))
        self.out, self.room = self.out[: len(self.metas)], 0
        return self

    def snapshot(self, stream: Any = None, ts_ns: int | None = None) -> Any:
        ts = ts_ns if ts_ns is not None else time.time_ns()
        try:
            return self.recorder._copy_out(self.out, self.metas, stream, ts, self.note)
        except Exception as exc:  # noqa: BLE001
            health.report("stats_errors", "graph statistics snapshot failed", exc)
            return _dropped("error")


class StatsRecorder:
    """Caller-thread API of level 5 (one per runtime)."""

    def __init__(self, stats_max_mb: float = 64.0, slots: int = 1024, rows_per_slot: int = 64,
                 use_kernel: bool = True, on_low: Callable[[], None] | None = None,
                 gpu_time: bool = False) -> None:
        self.max_bytes = stats_max_mb * 2**20
        #: GPU timing is on: the C++ hooks time each call with their two launches'
        #: clock stamps instead of the hot path's two events (stats.hooks).
        self.gpu_time = gpu_time
        #: Wakes the background resolver when a ring is half taken (``SlotRing``).
        self.on_low = on_low
        #: 1024 slots (8 MB pinned, 8 MB on the device): a replaying thread that runs
        #: 256 replays ahead of the GPU found the earlier 256 all taken on the device.
        self.slots = slots
        self.rows = rows_per_slot
        self.use_kernel = use_kernel
        self._rings: dict[int, SlotRing] = {}
        #: The capturing graph's rows on a device (``graph_rows.graph_rows_of``), None
        #: outside a capture; unset, each captured call gets rows of its own.
        self.graph_rows_of: Callable[[torch.device], GraphRows | None] | None = None
        #: Captured calls whose inputs' branch is not joined yet: id -> (capturing
        #: thread, slot) (``join_forked``).
        self._forked: dict[int, tuple[int, GraphStatsSlot]] = {}
        self._lock = threading.Lock()
        if use_kernel and torch.cuda.is_available():
            _kernel.warmup()
            _kernel.when_ready(lend_encoder)

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

    def begin(self, inputs: Iterable[Entry], api: str | None = None) -> Any:
        """``before`` for a call whose ``finish`` follows (the span hooks).

        On the kernel's eager path the inputs' statistics are launched now and an open
        state is returned that ``finish`` completes together with the outputs (one
        event).  Otherwise the same as ``before``; ``is_open`` tells which.  ``api``
        (the span's name) lets a captured call's inputs run beside it (``overlap``)."""
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
                slot = ring.acquire() if ring is not None and ring.fast_ready else None
                if slot is not None:  # else: capture, ring full... decided by _record
                    try:
                        stream = module.stats_slot(
                            tensors, items, device, ring.dev_rows(slot),
                            ring.rows, 0, len(metas), ring.pub_ptr(slot),
                            ring.counter(slot, 0), 0, -1)
                    except BaseException:
                        ring.release(slot)
                        raise
                    if stream >= 0:
                        note = f"too_many_tensors:{left_out}" if left_out else ""
                        return _Open(ring, slot, metas, ts, note, stream, device)
                    ring.release(slot)
                outcome = self._record(entries, ts, flat, room=self.rows, api=api)
                if type(outcome) is GraphStatsSlot and outcome.room:
                    return _GraphOpen(outcome)  # captured: the outputs join it in finish
                return outcome
            return self._record(entries)
        except Exception as exc:  # noqa: BLE001 - statistics must never break the call
            health.report("stats_errors", "tensor statistics failed", exc)
            return _dropped("error")

    @staticmethod
    def is_open(state: Any) -> bool:
        return type(state) is _Open or type(state) is _GraphOpen

    def finish(self, state: Any, outputs: Iterable[Entry]) -> Any:
        """Outputs' statistics after ``begin``: for an open state one Pending covering
        inputs and outputs (or a tuple of two outcomes when the outputs cannot share
        the slot), else the same as ``after``.  Never raises."""
        if type(state) is _GraphOpen:
            try:
                return self._finish_graph(state.slot, outputs if type(outputs) is list
                                          else list(outputs))
            except Exception as exc:  # noqa: BLE001 - the inputs' statistics still count
                health.report("stats_errors", "tensor statistics failed", exc)
                return state.slot._trim(give_back=False)
            finally:  # after the outputs' launch: a capture ends with its branches joined
                self._join(state.slot)
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
                    ring = SlotRing(torch.device("cuda", index), self.slots, 2 * self.rows,
                                    on_low=self.on_low)
                    self._rings[index] = ring
        return ring

    def _finish_graph(self, slot: GraphStatsSlot, outputs: list[Entry]) -> Any:
        """A captured call's outputs into the rows after its inputs (one buffer, one
        snapshot per replay), or on their own when they cannot join them."""
        nin = len(slot.metas)
        tensors, items, metas, left_out = _plan_flat(outputs, self.max_bytes, self.rows, nin)
        jobs = _jobs_of(tensors, items)
        device = slot.out.device
        if not metas:
            return slot._trim()
        if (len(metas) > slot.room or not torch.cuda.is_current_stream_capturing()
                or any(j.tensor.device != device for j in jobs)):
            return (slot._trim(), self.record(outputs))
        stamps = {}
        if slot.stamped:  # the call ended as this launch starts: its GPU time's end
            stamps["stamp_start"] = slot.out.data_ptr() + nin * ROW_BYTES + _SPARE
        gate = slot.graph_rows.gate_address() if slot.graph_rows is not None else 0
        with torch.cuda.device(device):
            ran = _launch_into(slot.out, jobs, self._module(), row0=nin,
                               zero=slot.graph_rows is None,
                               launch={"gate": gate} if gate else None, **stamps)
        slot.timed = ran and bool(stamps)
        slot.metas = slot.metas + [RowMeta(*m) for m in metas]
        if left_out and not slot.note:
            slot.note = f"too_many_tensors:{left_out}"
        return slot._trim()

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
                    tensors, items, state.device, ring.dev_rows(slot),
                    ring.rows, nin, nin + len(metas), ring.pub_ptr(slot),
                    ring.counter(slot, 1), ring.native_event(slot, module), state.stream)
            except Exception as exc:  # noqa: BLE001 - the inputs' statistics still count
                health.report("stats_errors", "tensor statistics failed", exc)
                stream, failed = -3, True
            if stream >= 0:
                state.slot = -1
                note = f"too_many_tensors:{left_out}" if left_out else ""
                return StatsPending(ring, slot, state.metas, state.ts_ns, state.note,
                                    metas, ts, note)
        # the inputs alone, then the outputs on their own (another device, a capture...)
        stream = module.stats_slot([], [], state.device, ring.dev_rows(slot),
                                   ring.rows, nin, nin, ring.pub_ptr(slot), ring.counter(slot, 1),
                                   ring.native_event(slot, module), state.stream)
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

    def _record(self, entries: list[Entry], ts: int = 0, flat: Any = None, room: int = 0,
                api: str | None = None) -> Any:
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
            if ring is not None and ring.fast_ready:
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
            return self._record_device(device, jobs, metas, ts, note, room, api)
        parts = []
        for device, rows in groups.items():  # rare: one call across devices
            keep = sorted(set(rows))
            remap = {r: i for i, r in enumerate(keep)}
            sub_jobs = [replace(j, row=remap[j.row]) for j in jobs if j.tensor.device == device]
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
                tensors, items, device, ring.dev_rows(slot), ring.rows, 0,
                n, ring.pub_ptr(slot), ring.counter(slot, 0), ring.native_event(slot, module),
                -1)
        except BaseException:
            ring.release(slot)
            raise
        if stream < 0:
            ring.release(slot)
            return None
        return StatsPending(ring, slot, metas, ts, note)

    def _record_device(self, device: torch.device, jobs: list[Job], metas: list[RowMeta],
                       ts: int, note: str, room: int = 0, api: str | None = None) -> Any:
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
            rows = self.graph_rows_of(device) if self.graph_rows_of is not None else None
            taken = rows.take(len(metas) + room) if rows is not None else None
            if taken is not None:  # rows of the graph's chunks: one copy per replay
                fork = self._fork_of(api, jobs, metas, device) if room else None
                return self._launch_captured(device, jobs, metas, note, room, rows, *taken,
                                             fork)
            with torch.cuda.device(device):
                out = torch.empty((len(metas) + room, ROW_WORDS), dtype=torch.int64,
                                  device=device)
                _launch_into(out, jobs, module)
            return GraphStatsSlot(self, out, metas, note, room)
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

    @staticmethod
    def _fork_of(api: str | None, jobs: list[Job], metas: list[RowMeta],
                 device: torch.device) -> Any:
        """The branch stream a captured call's inputs may run on, or None."""
        if api is None or device.index is None:
            return None
        nbytes = sum(j.tensor.numel() * j.tensor.element_size() for j in jobs)
        if not overlap.may_fork(api, (m.name for m in metas), nbytes):
            return None
        return overlap.branch(device.index)

    def _launch_captured(self, device: torch.device, jobs: list[Job], metas: list[RowMeta],
                         note: str, room: int, rows: GraphRows, out: torch.Tensor,
                         at: tuple[int, int], fork: Any) -> GraphStatsSlot:
        """A captured call's launch into rows of its graph's chunks.  With ``room`` (its
        outputs follow) and GPU timing on, the launch stamps the call's start: on the
        call's stream as it ends, taking the graph's anchor as it starts; on a ``fork``
        (a branch beside the call, which waits for what the stream did so far and is
        joined after the outputs' launch) as it starts, into both.  The outputs' launch
        stamps the call's end."""
        stamps: dict[str, int] = {}
        if self.gpu_time and room:  # the anchor: taken on the call's stream, where it lives
            if fork is not None:
                stamps = {"stamp_start": out.data_ptr() + _SPARE,
                          "stamp_also": rows.take_anchor()}
            else:
                counter = rows.take_counter()
                if counter:
                    stamps = {"counter": counter, "stamp_end": out.data_ptr() + _SPARE,
                              "stamp_start": rows.take_anchor()}
        anchor = stamps.get("stamp_also" if fork is not None else "stamp_start", 0)
        launch: dict[str, int] = {}
        gate = rows.gate_address()
        if gate:  # untraced replays skip it (``GraphRows.set_gate``)
            launch["gate"] = gate
        if fork is not None:  # a copy without statistics joins nothing around it
            launch["branch"] = True
        if fork is not None and overlap.BRANCH_SM_SHARE < 1.0:
            sms = overlap.branch_sms(
                torch.cuda.get_device_properties(device).multi_processor_count)
            if sms:
                launch["sm_limit"] = sms
        main = torch.cuda.current_stream(device)
        ran = False
        try:
            if fork is not None:
                fork.wait_stream(main)
            with torch.cuda.device(device), torch.cuda.stream(fork or main):
                ran = _launch_into(out, jobs, self._module(), zero=False, launch=launch,
                                   **stamps)
        except BaseException:
            if fork is not None:
                with contextlib.suppress(Exception):  # the error below is the one to tell
                    main.wait_stream(fork)
            raise
        finally:
            if anchor and not ran:
                rows.give_back_anchor()  # nothing stamped it
        slot = GraphStatsSlot(self, out, metas, note, room, rows, at,
                              stamped=ran and bool(stamps))
        if fork is not None:
            slot.branch = fork
            self._forked[id(slot)] = (threading.get_ident(), slot)
            health.count("stats_forked")  # captured calls whose inputs run beside them
        return slot

    def _join(self, slot: GraphStatsSlot) -> None:
        """The call's stream waits for the branch its inputs' statistics forked onto.
        Never raises (``finish`` must not): a failure is reported and the branch kept
        for ``join_forked`` to try again at the capture's end."""
        fork = slot.branch
        if fork is None:
            return
        try:
            torch.cuda.current_stream(slot.out.device).wait_stream(fork)
        except Exception as exc:  # noqa: BLE001
            health.report("stats_errors", "could not join a statistics branch", exc)
            return
        slot.branch = None
        self._forked.pop(id(slot), None)

    def join_forked(self) -> None:
        """Join the branches this thread's capture still has open (it is ending, so
        its calls' ``finish`` ran or never will): a capture with an unjoined stream
        fails to end."""
        me = threading.get_ident()
        for key, (thread, slot) in list(self._forked.items()):
            if thread == me:
                self._join(slot)
                # Forgotten however the join went: a branch of this capture must never
                # be joined into the next one.
                self._forked.pop(key, None)
                slot.branch = None

    def _copy_out(self, out: torch.Tensor, metas: list[RowMeta], stream: Any, ts: int,
                  note: str) -> Any:
        ring = self._ring(out.device)
        slot = ring.acquire()
        if slot is None:
            return _dropped("ring_full")
        module = self._module()
        try:
            if module is not None and stream is None:
                # The extension guards ``out``'s device and copies on its current
                # stream, where the replay ran: no torch stream objects per replay.
                module.snapshot(out, ring.host_ptr(slot), ring.native_event(slot, module))
            else:
                stream = stream if stream is not None else torch.cuda.current_stream(out.device)
                with torch.cuda.device(out.device), torch.cuda.stream(stream):
                    if module is not None:
                        module.snapshot(out, ring.host_ptr(slot),
                                        ring.native_event(slot, module))
                    else:
                        ring.host[slot, : out.shape[0]].copy_(out, non_blocking=True)
                        ring.torch_event(slot).record(stream)
        except Exception:
            ring.release(slot)
            raise
        return StatsPending(ring, slot, metas, ts, note)
