"""One captured graph's statistics rows, read back with one copy and one event per
traced replay.

Each captured call used to have its own device buffer, and each traced replay took one
ring slot, one copy and one event per captured call.  A 64-call decode step then filled
the 1,024-slot ring in 16 replays (5,376 of 6,400 children's statistics dropped on the
H200), and the replaying thread spent several microseconds per child in the driver.

Here every captured call's rows are a view into a few large device buffers (chunks) of
its graph, which one memset node per chunk zeroes at the chunk's first launch in each
replay.  A traced replay copies the chunks' rows in use into one slot of the graph's own
pinned ring, records one event, and hands each child a ``StatsPending`` over its own
rows of that slot (``RowWindow``): the encoder resolves them as it resolves any other
(csrc/otlp_encoder.c), and the slot goes back once every child's rows were read.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import capture_guard, health
from ..gpu_timing import TIME_ATTR, UNAVAILABLE_ATTR, Unavailable
from . import kernel as _kernel
from . import lean_graph
from .decode import ROW_BYTES
from .layout import ROW_WORDS
from .node_switch import NodeSwitch
from .pending import ReadyPending, StatsPending, _dropped
from .ring import SlotRing

#: Rows per device chunk (128 KB): a 64-call step with 4-6 tensors a call uses about 320.
CHUNK_ROWS = 2048
#: Pinned memory per graph for its replay slots, and the slot count's bounds.  A serving
#: engine captures dozens of graphs (one per batch size), each with its own ring, so a
#: big graph gets few slots (its replays are long); a small one gets up to 1,024, as
#: many as the shared eager ring: a one-call decode graph replays every 50 us on the
#: H200, and 256 slots dropped statistics there before the worker, woken when half a
#: ring is taken, caught up.
RING_BYTES = 1 << 20
MIN_SLOTS, MAX_SLOTS = 16, 1024
#: A replay's rows go to its slot by a small kernel on the replay's stream, not by a
#: copy-engine memcpy: on the captured decode step (H100) the memcpy left the GPU idle
#: about 8 us before it and 11 us after it, every replay (``decode_step_split.py``).
SNAPSHOT_KERNEL = True
#: Where every replay is traced, the graph's first node stamps its start and the
#: snapshot kernel its end (``head_stamp``): no CUDA event pair around the replay
#: (a probe compares both: benchmarks/probes/decode_step_split.py).
HEAD_STAMP = True
_SPARE = 7 * 8  # a row's spare word (layout.py): where GPU-clock stamps go
#: Where in a slot the replay's own GPU time goes, when the graph's head stamps it
#: (``head_word``): word 5 of the anchor row gets the head's stamp and word 6 the
#: snapshot kernel's start, in place of an event pair around the replay.  The anchor
#: row holds no statistics: only its spare word (7) is written by a launch.
HEAD_WORD = 5
#: Last-block counters per graph: one per timed captured call.
COUNTERS = 4096


class RowWindow:
    """A captured call's rows within each replay slot of its graph: what a
    ``StatsPending`` reads as its ring (the encoder reads ``_base``, ``_slot_bytes``,
    ``rows``, ``_kind`` and ``_native`` and calls ``release``)."""

    def __init__(self, owner: GraphRows, row0: int, nrows: int) -> None:
        ring = owner.ring
        assert ring is not None
        self._owner, self._ring, self._row0, self.rows = owner, ring, row0, nrows
        self._base = ring._base + row0 * ROW_BYTES  # noqa: SLF001 - the ring's own layout
        self._slot_bytes = ring._slot_bytes  # noqa: SLF001
        self._kind, self._native = ring._kind, ring._native  # noqa: SLF001 - shared lists
        # The owner's count, called straight (the encoder calls ``release`` per child).
        self.release, self.abandon = owner.release_one, owner.abandon_one
        #: Slot 0's word where the graph's first launch stamps its start (row 0 of the
        #: graph's first chunk): children are placed on the GPU timeline from it.
        self._anchor = ring._base + _SPARE if owner.anchored else None  # noqa: SLF001

    def anchor_ns(self, slot: int) -> int:
        """The graph's first launch's start stamp in ``slot`` (0: none)."""
        start = slot * self._slot_bytes + _SPARE
        return int.from_bytes(self._ring._raw[start:start + 8], "little", signed=True)  # noqa: SLF001

    def query(self, slot: int) -> int:
        return self._ring.query(slot)

    def read_bytes(self, slot: int, nrows: int) -> bytes:
        start = slot * self._slot_bytes + self._row0 * ROW_BYTES
        return self._ring._raw[start:start + min(nrows, self.rows) * ROW_BYTES]  # noqa: SLF001



class GraphStatsPending:
    """One traced replay's statistics for every captured call of a graph: one slot of
    the graph's ring, one event.  The span encoder reads each child's rows in place
    from ``layout`` (csrc/otlp_encoder.c, ``resolve_group``) and hands the slot back
    once; the Python path ``split``s it into one ``StatsPending`` per child.  Plain
    ``__slots__`` fields: the encoder reads them by offset.  ``stamped``: the slot also
    holds the replay's own GPU time (``HEAD_WORD``).

    ``dropped`` (a reason, "" when not): the replay got no slot (the ring full, or the
    copy failed), so every child says why it has no statistics and a stamped replay why
    it has no GPU time.  One object for the whole replay, which the encoder also writes
    in C: a replay dropped child by child went to the worker's Python path (333 us a
    replay of the 64-call step on an H100, where the ring fills most), just when the
    engine runs ahead of the GPU."""

    __slots__ = ("_status", "dropped", "layout", "owner", "ring", "slot", "stamped", "ts_ns")

    def __init__(self, owner: GraphRows, ring: SlotRing | None, slot: int, layout: tuple,
                 ts_ns: int, stamped: bool = False, dropped: str = "") -> None:
        self.owner, self.ring, self.slot, self.layout, self.ts_ns = owner, ring, slot, layout, ts_ns
        self.stamped, self.dropped = stamped, dropped
        self._status = 1

    def split(self) -> list[tuple[int, Any]]:
        """(child index, its StatsPending over its rows of the slot), once; a stamped
        replay's own time first, as index -1 (a ``ReplayStamps``).  A dropped replay:
        (child index, the drop's reason) per child, after the replay's own reason."""
        if self.dropped:
            reason, self.dropped = self.dropped, ""
            parts: list[tuple[int, Any]] = [(e[0], ReadyPending([], self.ts_ns, reason))
                                            for e in self.layout]
            if self.stamped:
                parts.insert(0, (-1, DroppedTime("stats_dropped")))
            return parts
        slot, self.slot = self.slot, -1
        if slot < 0:
            return []
        return self.owner.split(slot, self.layout, self.ts_ns, self.stamped)

    def abandon(self) -> None:
        """Given up whole (the span dropped): the slot goes back once its copy landed.
        A dropped replay's statistics were counted when it was dropped."""
        slot, self.slot = self.slot, -1
        if slot >= 0:
            # as each child's StatsPending would count: inputs and outputs apart
            health.count("stats_dropped", sum(2 if e[2] and e[3] else 1 for e in self.layout))
            self.ring.abandon(slot)


class DroppedTime(Unavailable):
    """Why a replay whose statistics were dropped has no GPU time, unless another source
    timed it (its event pair, another device's group): a span never says both, in
    Python as in C.  ``ReplayRecord.expand`` applies it after the replay's other
    pendings (``after_times``)."""

    __slots__ = ()
    after_times = True

    def apply(self, record: Any) -> None:
        if TIME_ATTR not in record.attributes:
            super().apply(record)


class ReplayStamps:
    """The replay span's GPU time from its slot's two stamps (the Python path; the
    encoder reads them in ``resolve_group``): holds the slot like one more child."""

    __slots__ = ("_status", "slot", "window")

    def __init__(self, window: RowWindow, slot: int) -> None:
        self.window, self.slot, self._status = window, slot, 1

    def ready(self) -> bool:
        if self._status == 1:
            self._status = self.window.query(self.slot)
        return self._status != 1

    def apply(self, record: Any) -> None:
        if self.slot < 0:
            return
        slot, self.slot = self.slot, -1
        if self._status not in (0, 1):  # a CUDA error: the statistics' pendings say which
            self.window.release(slot)
            record.attributes[UNAVAILABLE_ATTR] = "cuda_error"
            return
        try:
            row = self.window.read_bytes(slot, 1)
        finally:
            self.window.release(slot)
        at = HEAD_WORD * 8
        head = int.from_bytes(row[at:at + 8], "little", signed=True)
        end = int.from_bytes(row[at + 8:at + 16], "little", signed=True)
        if TIME_ATTR in record.attributes:
            return  # an event pair timed it too (the slots were mapped during the replay)
        if 0 < head <= end:
            record.attributes[TIME_ATTR] = end - head
        else:
            record.attributes[UNAVAILABLE_ATTR] = "no_stamp"

    def abandon(self, record: Any, reason: str) -> None:
        if self.slot >= 0:
            slot, self.slot = self.slot, -1
            self.window.abandon(slot)
        record.attributes[UNAVAILABLE_ATTR] = reason


class GraphRows:
    """The statistics rows of one captured graph on one device (``graphs.Capture``
    keeps it as a replay group): ``take`` during capture, ``seal`` when the capture
    ends, ``replay`` after each traced replay."""

    def __init__(self, device: torch.device, on_low: Callable[[], None] | None = None,
                 gated: bool = False, head: HeadStamp | None = None) -> None:
        self.device = device
        #: The graph's head node (``head_stamp``), kept with its word as long as the
        #: graph: the node writes the word on every replay, whether it times it or not.
        self._head_stamp = head
        #: The word the graph's first node stamps as each replay starts, or None: the
        #: replay is then timed by an event pair around it.
        self._head = head.word if head is not None and head.ordered else None
        self.on_low = on_low  # the pipeline's wake-up (``SlotRing``)
        #: Some replays go untraced (``REPLAY_EVERY`` not 1): the captured launches read a
        #: gate word that ``set_gate`` writes before each replay, and leave at once on
        #: the untraced ones.  The word is taken without a fill (a fill would be a graph
        #: node that sets it on every replay); the first replay writes it.
        self.gated = gated
        self._gate: torch.Tensor | None = None
        self._gate_module: Any = None
        self._gate_key = -1  # ``gate_key``'s: the stream and answer last written
        self._gate_stream: Any = None  # the stream it was written on
        #: The gated launches' graph nodes, off while replays go untraced (``bind_graph``).
        self._switch: NodeSwitch | None = None
        self._chunks: list[torch.Tensor] = []
        self._used: list[int] = []
        self._current: dict[int, int] = {}  # stream -> the chunk it fills now
        #: stream -> [zeroed int32 words, how many are taken] (``take_counter``)
        self._counters: dict[int, list[Any]] = {}
        #: The captured nodes that zero the chunks and counters (``_zeroed``).
        self._zeroing: list[int] = []
        #: Row 0 of the first chunk is the anchor: its spare word gets the GPU clock as
        #: the graph's first timed launch starts (``take_anchor``), once per replay.
        self._anchor: tuple[int, int] | None = None  # (device address, stream)
        self.anchored = False
        #: (record id, GraphStatsSlot, chunk, row): the captured calls' rows.
        self._members: list[tuple[int, Any, int, int]] = []
        self.ring: SlotRing | None = None
        self._views: list[torch.Tensor] = []  # each chunk's rows in use (sealed)
        self._offsets: list[int] = []  # where each chunk's rows start in a slot, in bytes
        #: The ring's slot 0 as the GPU addresses it (mapped pinned memory), or 0: a
        #: replay's rows are then copied by the copy engine (``_copy``).  Calls with a
        #: buffer of their own (``recorder.GraphStatsSlot``) are still copied by it.
        self._mapped = 0
        self._map_asked = False
        self._windows: list[tuple[int, Any, RowWindow]] = []
        self._layout: tuple[dict[int, int] | None, tuple] = (None, ())
        self._left: list[int] = []  # per slot: children whose rows are not read yet
        self._abandoned: list[bool] = []
        self._lock = threading.Lock()
        self.failed = False

    # -- capture -------------------------------------------------------------------
    def take(self, nrows: int) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """``nrows`` zeroed-per-replay device rows for a captured launch, or None when
        they do not fit a chunk (the call then gets a buffer of its own)."""
        if nrows > CHUNK_ROWS - 1 or self.ring is not None:  # the first chunk's anchor row
            return None
        stream = self._stream()
        k = self._current.get(stream, -1)
        if k < 0 or self._used[k] + nrows > CHUNK_ROWS:
            # A chunk is zeroed by one node (a fill) on the stream that first uses it, so
            # each chunk serves one stream: stream order puts the fill before every
            # launch into it, and each replay's copy before the next replay's fill.
            chunk = self._zeroed(stream, lambda: torch.zeros(
                (CHUNK_ROWS, ROW_WORDS), dtype=torch.int64, device=self.device))
            self._chunks.append(chunk)
            self._used.append(0)
            k = self._current[stream] = len(self._chunks) - 1
            if k == 0:  # the anchor row (see take_anchor)
                self._used[0] = 1
                self._anchor = (chunk.data_ptr() + _SPARE, stream)
        row = self._used[k]
        self._used[k] = row + nrows
        return self._chunks[k][row:row + nrows], (k, row)

    def take_counter(self) -> int:
        """The device address of a zeroed 32-bit word for a launch's last-block count
        (its end stamp, ``stats_into``), or 0 when none is left."""
        stream = self._stream()
        counters = self._counters.get(stream)
        if counters is None:  # zeroed on this stream, like the chunks
            counters = self._counters[stream] = [self._zeroed(stream, lambda: torch.zeros(
                COUNTERS, dtype=torch.int32, device=self.device)), 0]
        words, used = counters
        if used >= COUNTERS:
            return 0
        counters[1] = used + 1
        return words.data_ptr() + 4 * used

    def _zeroed(self, stream: int, zeros: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``zeros()`` on ``stream``; in a gated capture, the one node it made is noted
        (``capture_tail_node``, from the stream's dependencies before it), and the copy
        without statistics nodes leaves it out too.  Only the statistics launches read
        what it zeroes, and only traced replays (torch's graph) run those: in the copy
        it cost a node ahead of the first call (two with the counters': +0.1% to +0.8%
        of the 32-layer decode step, H100).  A zeroing that made no node or several (a
        deterministic torch fills new memory first) stays in the copy, as does one the
        extension could not tell (counted)."""
        module = _kernel.get() if self.gated and self.device.type == "cuda" else None
        if module is None or not hasattr(module, "capture_tail_node"):
            return zeros()
        try:
            before = module.capture_deps(stream)
        except Exception as exc:  # noqa: BLE001 - the copy keeps the node
            health.report("stats_errors", "could not note a graph's zeroing node", exc)
            return zeros()
        tensor = zeros()
        try:
            node = module.capture_tail_node(stream, before)
        except Exception as exc:  # noqa: BLE001 - the copy keeps the node
            health.report("stats_errors", "could not note a graph's zeroing node", exc)
            return tensor
        if node:
            self._zeroing.append(node)
        return tensor

    def gate_address(self) -> int:
        """The device address of this graph's gate word for a captured launch (0: not
        gated, or not on a CUDA device)."""
        if not self.gated or self.device.type != "cuda":
            return 0
        if self._gate is None:
            module = _kernel.get()
            if module is None or not hasattr(module, "gate_write"):
                return 0  # torch ops: they run on every replay
            # An allocation, not a kernel: nothing of it is captured into the graph.
            self._gate = torch.empty(1, dtype=torch.int32, device=self.device)
            self._gate_module = module
            forget = getattr(module, "gate_nodes_forget", None)
            if forget is not None:
                # The capture notes its launches' nodes by this address (gate_nodes.cpp):
                # forgotten with the word, before another allocation can take it.
                weakref.finalize(self, forget, self._gate.data_ptr())
        return self._gate.data_ptr()

    def bind_graph(self, graph: Any) -> None:
        """After the capture of ``graph`` ended and torch instantiated it: switch the
        gated launches' nodes off on untraced replays, where torch kept the graph."""
        if self._gate is None or self.failed:
            return
        try:
            self._switch = NodeSwitch.bind(self._gate_module, self._gate.data_ptr(), graph)
        except Exception as exc:  # noqa: BLE001 - the word gates alone
            health.report("stats_errors", "could not find a graph's statistics nodes", exc)

    def lean_parts(self) -> tuple[Any, int, int, tuple[int, ...]] | None:
        """(extension, gate word, device index, the nodes zeroing its rows) for a copy of
        the graph without this group's gated launches (``stats.lean_graph``); None where
        they were not gated through a word."""
        if self._gate is None or self._gate_module is None or self.device.index is None:
            return None
        return (self._gate_module, self._gate.data_ptr(), self.device.index,
                tuple(self._zeroing))

    @staticmethod
    def build_lean(graph: Any, groups: Any, device: int | None, watch: Any) -> Any:
        """The capture's copy of ``graph`` without the gated groups' nodes
        (``lean_graph.build_for``; ``graphs.Capture.seal`` asks its first gated group)."""
        return lean_graph.build_for(groups, graph, device, watch)

    def set_gate(self, traced: bool) -> None:
        """Before a replay, on the replaying thread: its launches run only if ``traced``.
        One call into the extension per replay; a write only when the answer or the
        stream changed.  A new stream waits for the last one first: a replay there may
        still be reading the word.  A gate that cannot be written fails the graph's
        statistics (``failed``): a traced replay then says they were dropped, never
        reads rows left unwritten."""
        gate = self._gate
        if gate is None or self.failed:
            return
        switch = self._switch
        if switch is not None and switch.on != traced:
            self._switch_nodes(switch, traced)
            if self.failed:
                return
        try:
            module, index = self._gate_module, self.device.index
            key = module.gate_key(index, traced)
            if key == self._gate_key:
                return
            stream = torch.cuda.current_stream(self.device)
            last = self._gate_stream
            if last is not None and key >> 1 != self._gate_key >> 1:
                stream.wait_stream(last)
            module.gate_write(index, gate.data_ptr(), traced)
            self._gate_key, self._gate_stream = key, stream
        except Exception as exc:  # noqa: BLE001
            self.failed = True
            health.report("stats_errors", "could not gate a graph's statistics", exc)

    def _switch_nodes(self, switch: NodeSwitch, on: bool) -> None:
        """The nodes on or off; a failure stops the switching (every node back on), and
        fails the graph's statistics where some stay off: a traced replay's launches
        might not run.  The word is then closed for good, so that the nodes still on
        return at once on every replay."""
        try:
            switch.set(on)
        except Exception as exc:  # noqa: BLE001
            self._switch = None
            health.report("stats_errors", "could not switch a graph's statistics nodes", exc)
            if switch.restore():
                return
            self.set_gate(False)  # the switch is gone: this only closes the word
            self.failed = True

    def closed_gate(self) -> tuple[Callable[[int, bool], int], int, int] | None:
        """For the C replay gate (``graphs.Capture.arm_gate``): the extension's
        ``gate_key``, the device index and the key last written, while that write closed
        the word; else None (not written yet, open, failed, or no device word)."""
        key = self._gate_key
        if self._gate is None or self.failed or key < 0 or key & 1:
            return None
        return self._gate_module.gate_key, self.device.index, key

    def take_anchor(self) -> int:
        """The device address the graph's first timed launch stamps its start into (0
        after the first, or on another stream than the anchor's chunk)."""
        if self.anchored or self._anchor is None or self._anchor[1] != self._stream():
            return 0
        self.anchored = True
        return self._anchor[0]

    def give_back_anchor(self) -> None:
        """The launch that took the anchor did not stamp (torch ops, a failure): the
        next timed launch on its stream takes it."""
        self.anchored = False

    # -- the replay's own GPU time ----------------------------------------------------
    def order_head(self) -> None:
        """Before the capture ends (a capture hook, ``head_orderer``): the head node ahead
        of the roots that captures after it added (a stream that joined the capture with
        no dependencies); where that fails, replays keep the event pair."""
        head = self._head_stamp
        if head is None or self._head is None:
            return
        try:
            if not _kernel.get().head_stamp_order(head.graph, head.node):  # type: ignore[union-attr]
                self._head = None
        except Exception as exc:  # noqa: BLE001 - the event pair times the replays
            self._head = None
            health.report("stats_errors", "could not put a graph's head stamp first", exc)

    def times_replay(self) -> bool:
        """Whether this replay's GPU time can come from the graph's head stamp and the
        snapshot kernel's start (``HEAD_WORD``) instead of an event pair: a head word,
        mapped slots (the copy engine stamps nothing) and the anchor row in chunk 0."""
        return (self._head is not None and self._mapped != 0 and self.ring is not None
                and not self.failed and bool(self._views))

    def begin(self) -> int:
        """The replay timer's protocol (``graphs._begin``): nothing to record before."""
        return 0

    def end_handle(self, _mark: int) -> GraphRows:
        """... nor after: the replay's pending from ``replay`` carries the time."""
        return self

    def replay_time(self, whole: list[Any] | None) -> Any:
        """None when one of ``whole`` (the replay's group pendings) holds this replay's
        stamps, or says why there are none (dropped); else why the replay has no GPU
        time."""
        if any(type(p) is GraphStatsPending and p.stamped and p.owner is self
               for p in whole or ()):
            return None
        return Unavailable("stats_dropped")

    def _stream(self) -> int:
        if self.device.type != "cuda":
            return 0
        return torch.cuda.current_stream(self.device).cuda_stream

    def trim(self, at: tuple[int, int], taken: int, kept: int) -> None:
        """A launch that took ``taken`` rows at ``at`` keeps ``kept``: the rest goes back
        when nothing was taken after it (a nested call keeps its parent's room)."""
        k, row = at
        if self._used[k] == row + taken:
            self._used[k] = row + kept

    def bind(self, record: Any, slot: Any) -> None:
        """``slot`` (a ``GraphStatsSlot`` over rows of this graph) is the captured call
        ``record``'s statistics."""
        k, row = slot.at
        self._members.append((id(record), slot, k, row))

    def seal(self) -> None:
        """After the capture: the replay ring, sized for every chunk's rows in use."""
        if self.ring is not None or self.failed or not self._members:
            return
        with capture_guard.gpu_queries() as allowed:
            if allowed:  # else (another thread captures): at the first traced replay
                self._seal()

    def _seal(self) -> None:
        try:
            rows = sum(self._used)
            slot_bytes = rows * ROW_BYTES
            slots = max(MIN_SLOTS, min(MAX_SLOTS, RING_BYTES // max(slot_bytes, 1)))
            pin = self.device.type == "cuda"
            ring = SlotRing(self.device, slots, rows, pin_memory=pin, on_low=self.on_low)
            offsets, at = [], 0
            for used in self._used:
                offsets.append(at)
                at += used * ROW_BYTES
            self._views = [c[:u] for c, u in zip(self._chunks, self._used, strict=True)]
            self._offsets = offsets
            self._left = [0] * slots
            self._abandoned = [False] * slots
            if self.anchored:  # the encoder reads it beside ``_base`` (SlotRing._anchor)
                ring._anchor = ring._base + _SPARE  # noqa: SLF001
            self.ring = ring
            self._windows = [
                (rid, slot, RowWindow(self, offsets[k] // ROW_BYTES + row, len(slot.metas)))
                for rid, slot, k, row in self._members]
        except Exception as exc:  # noqa: BLE001 - the graph replays untraced statistics
            self.failed = True
            health.report("stats_errors", "could not set up a graph's statistics slots", exc)
            return
        module = _kernel.get() if self.device.type == "cuda" else None
        if module is not None:
            # Each slot's event now, while the capture ends: cudaEventCreate costs
            # microseconds that the first replays through each slot would pay otherwise.
            try:
                for slot in range(ring.host.shape[0]):
                    ring.native_event(slot, module)
            except Exception as exc:  # noqa: BLE001 - the others are made as needed
                health.report("stats_errors", "could not make a graph's CUDA events ahead",
                              exc)
            self._map(module, ring)

    def _map(self, module: Any, ring: SlotRing) -> None:
        """The ring's slot 0 as the GPU addresses it (``_mapped``), asked once: at the
        seal, or at the first traced replay after the extension built, outside any
        capture (0: not mapped, the copy engine copies)."""
        if self._map_asked or not SNAPSHOT_KERNEL or not hasattr(module, "snapshot_kernel"):
            return
        with capture_guard.gpu_queries() as allowed:
            if not allowed:
                return  # another thread captures: asked again at the next replay
            self._map_asked = True
            try:
                on = self.device.type == "cuda"
                with torch.cuda.device(self.device) if on else contextlib.nullcontext():
                    self._mapped = int(module.host_device_ptr(ring.host_ptr(0)))
            except Exception as exc:  # noqa: BLE001
                health.report("stats_errors", "could not map a graph's statistics "
                              "slots; they are copied by the copy engine", exc)

    # -- replay --------------------------------------------------------------------
    def replay(self, index: dict[int, int], module: Any = None, ts_ns: int | None = None
               ) -> GraphStatsPending | list[tuple[int, Any]]:
        """After a traced replay, on the replaying thread: one copy per chunk into a
        slot and one event, for the captured calls that ``index`` (record id -> child
        index) knows: a ``GraphStatsPending`` (``dropped`` when the ring is full or the
        copy failed), or (child index, Pending) per call when the graph has no ring.
        ``module``: the statistics extension (None: the built one, if any, on a CUDA
        device; torch copies otherwise)."""
        if self.ring is None and not self.failed:
            self._seal()
        ring = self.ring
        layout = self.layout(index)
        if ring is None or not layout or self.failed:
            return [(index[rid], _dropped("error")) for rid, _, _, _ in self._members
                    if rid in index]
        if module is None and self.device.type == "cuda":
            module = _kernel.get()
        ts = ts_ns if ts_ns is not None else time.time_ns()
        slot = ring.acquire()
        if slot is None:
            return self._dropped(layout, ts, "ring_full")
        try:
            stamped = self._copy(module, ring, slot)
        except Exception as exc:  # noqa: BLE001
            # Copies already queued may still land in it: the slot is not reused.
            health.report("stats_errors", "graph statistics snapshot failed", exc)
            return self._dropped(layout, ts, "error")
        return GraphStatsPending(self, ring, slot, layout, ts, stamped)

    def _dropped(self, layout: tuple, ts: int, reason: str) -> GraphStatsPending:
        """A replay whose statistics are dropped, counted once per child here (as each
        child's ``_dropped`` was), on the replaying thread."""
        health.count("stats_dropped", len(layout))
        return GraphStatsPending(self, None, -1, layout, ts, self.times_replay(), reason)

    def layout(self, index: dict[int, int]) -> tuple:
        """Per captured call that ``index`` knows: (child index, byte offset of its rows
        in a slot, input metas, output metas or None, timed, note, its RowWindow), made
        once per capture template (``index`` is the template's)."""
        known, layout = self._layout
        if known is not index:
            entries = []
            for rid, gslot, window in self._windows:
                i = index.get(rid)
                if i is None:
                    continue
                metas = tuple(gslot.metas)
                if gslot.timed:
                    ins, outs = metas[:gslot.nin], metas[gslot.nin:]
                else:
                    ins, outs = metas, None
                entries.append((i, window._row0 * ROW_BYTES, ins, outs,  # noqa: SLF001
                                gslot.timed, gslot.note, window))
            layout = tuple(entries)
            self._layout = (index, layout)
        return layout

    def split(self, slot: int, layout: tuple, ts: int, stamped: bool = False
              ) -> list[tuple[int, Any]]:
        """Per child a StatsPending over its rows of ``slot`` (the Python path), after
        the replay's own ``ReplayStamps`` (index -1) where ``stamped``; the slot goes
        back after the last of them."""
        with self._lock:
            self._left[slot] = len(layout) + stamped
            self._abandoned[slot] = False
        parts: list[tuple[int, Any]] = [(i, StatsPending(window, slot, ins, ts, note, outs,
                                                         ts, "", timed))
                                        for i, _, ins, outs, timed, note, window in layout]
        if stamped:
            parts.insert(0, (-1, ReplayStamps(RowWindow(self, 0, 1), slot)))
        return parts

    def _copy(self, module: Any, ring: SlotRing, slot: int) -> bool:
        """The replay's rows into ``slot``; whether the replay's own GPU time went with
        them (``times_replay``: the first chunk's copy writes the head's stamp and its
        own start into the anchor row)."""
        host = ring.host_ptr(slot)
        last = len(self._views) - 1
        if module is not None:
            event = ring.native_event(slot, module)
            if not self._map_asked:  # the extension built after the seal
                self._map(module, ring)
            # On the current stream, where the replay ran: no stream object per replay.
            # Mapped: to the slot's device address by a kernel, not the copy engine.
            if self._mapped:
                at = self._mapped + (host - ring.host_ptr(0))
                copy = module.snapshot_kernel
                stamped = self.times_replay()
                for k, view in enumerate(self._views):
                    if k == 0 and stamped:
                        copy(view, at, event if k == last else 0,
                             self._head.data_ptr(), HEAD_WORD)  # type: ignore[union-attr]
                    else:
                        copy(view, at + self._offsets[k], event if k == last else 0)
                return stamped
            for k, view in enumerate(self._views):
                module.snapshot(view, host + self._offsets[k], event if k == last else 0)
            return False
        flat = ring.host[slot].view(-1)
        for k, view in enumerate(self._views):
            at = self._offsets[k] // 8
            flat[at:at + view.numel()].copy_(view.reshape(-1), non_blocking=True)
        if self.device.type == "cuda":
            ring.torch_event(slot).record()
        return False

    def release_one(self, slot: int) -> None:
        """One child's rows read: the slot goes back after the last."""
        with self._lock:
            left = self._left[slot] = self._left[slot] - 1
        if left == 0:
            self._back(slot)

    def abandon_one(self, slot: int) -> None:
        """One child given up (maybe before the copy landed)."""
        with self._lock:
            left = self._left[slot] = self._left[slot] - 1
            self._abandoned[slot] = True
        if left == 0:
            self._back(slot)

    def _back(self, slot: int) -> None:
        ring = self.ring
        assert ring is not None
        # a child given up before the copy landed: the ring waits for the event
        (ring.abandon if self._abandoned[slot] else ring.release)(slot)


def lend_encoder(module: Any) -> None:
    """Once the statistics extension has built: the span encoder resolves
    ``StatsPending`` and ``GraphStatsPending`` itself through the extension's event query
    (``csrc/stats_api.h``)."""
    capsule = getattr(module, "stats_api", None)
    if capsule is not None:
        from .. import native

        native.register_stats(capsule, StatsPending, GraphStatsPending)


def graph_rows_of(capture_state: Callable[[], Any], on_low: Callable[[], None] | None = None,
                  stamp_heads: bool = False) -> Callable[[torch.device], Any]:
    """The recorder's lookup of the capturing graph's rows on ``device`` (``None``
    outside a capture), over ``graphs.capture_state``; ``on_low`` wakes the worker;
    ``stamp_heads``: GPU timing is on (``head_word``)."""

    def lookup(device: torch.device) -> GraphRows | None:
        capture = capture_state()
        if capture is None:
            return None
        sampler = capture.sampler
        gated = sampler is not None and sampler.every != 1

        def make() -> GraphRows:
            head = head_stamp(device) if stamp_heads and not gated else None
            return GraphRows(device, on_low, gated, head)

        return capture.group(("stats", str(device)), make)

    return lookup


def head_orderer(capture_state: Callable[[], Any]) -> Callable[[], None]:
    """The capture hook run before a capture ends: each group's head node ahead of the
    roots added after it (``GraphRows.order_head``)."""

    def order() -> None:
        capture = capture_state()
        if capture is not None:
            for group in list(capture.groups.values()):
                if type(group) is GraphRows:
                    group.order_head()

    return order


class HeadStamp:
    """A graph's head node (``head_stamp``): the word it stamps, whether it was put
    ahead of every node, and the node and graph handles to order it again at the end."""

    __slots__ = ("graph", "node", "ordered", "word")

    def __init__(self, word: torch.Tensor, ordered: bool, node: int, graph: int) -> None:
        self.word, self.ordered, self.node, self.graph = word, ordered, node, graph


def head_stamp(device: torch.device) -> HeadStamp | None:
    """At a capture's first statistics launch on ``device``: a node ahead of every node
    captured so far (``head_stamp_node``, csrc/lean_graph.cpp) that stamps a word of the
    graph's own with the GPU clock on every replay, which the snapshot kernel copies
    beside its own start into the slot: the replay's GPU time without a CUDA event pair
    around it (two records on the replaying thread: about 5 us of its CPU and 3 of the
    GPU's a traced replay on the H100's decode step).  Only where every replay runs the
    graph's statistics (``REPLAY_EVERY=1``): a gated graph's untraced replays skip our
    nodes.  None where there is no node (the extension not built yet, not capturing: the
    event pair stays)."""
    if device.type != "cuda" or not SNAPSHOT_KERNEL or not HEAD_STAMP:
        return None
    module = _kernel.get()
    if module is None or not hasattr(module, "head_stamp_node"):
        return None
    try:
        word = _word(device)
        state, node, graph = module.head_stamp_node(device.index, torch.cuda.current_stream(
            device).cuda_stream, word.data_ptr())
    except Exception as exc:  # noqa: BLE001 - no node was added: the event pair stays
        health.report("stats_errors", "could not stamp a graph's head", exc)
        return None
    # A node in the graph writes the word on every replay: kept with the graph, also
    # where it could not be put first (state 2: the event pair times the replays).
    return HeadStamp(word, state == 1, node, graph) if state else None


def _word(device: torch.device) -> torch.Tensor:
    """An int64 on ``device`` with no node made for it: ``torch.empty`` in a capture is
    an allocation from the graph's pool, unless deterministic mode fills new memory (a
    node that would overwrite the head's stamp after it, on every replay)."""
    deterministic = getattr(torch.utils, "deterministic", None)
    fill = getattr(deterministic, "fill_uninitialized_memory", False)
    if not fill or not torch.are_deterministic_algorithms_enabled():
        return torch.empty(1, dtype=torch.int64, device=device)
    deterministic.fill_uninitialized_memory = False  # type: ignore[union-attr]
    try:
        return torch.empty(1, dtype=torch.int64, device=device)
    finally:
        deterministic.fill_uninitialized_memory = fill  # type: ignore[union-attr]
