"""A captured graph's statistics rows read back with one copy per traced replay
(``stats.graph_rows``): every captured call's rows share the graph's chunks, one slot of
the graph's own ring holds a whole replay, each child reads its own rows of it, and the
slot goes back after the last child.

On the CPU the chunks are host tensors that the test fills as the captured kernels
would on each replay; the copy into the slot is the torch path of ``GraphRows._copy``.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from typing import Any

import pytest
import torch
from test_native_stats import FakeEvents, _pending, _ring, _rows, answering_pool, events  # noqa: F401
from test_replay_template import _capture, _decode, _python_path, _replay, _without_span_id

from otel_flashinfer import capture_guard, export, graphs, health
from otel_flashinfer.pipeline import _EMPTY, CallRecord, Pipeline
from otel_flashinfer.stats import graph_rows as gr
from otel_flashinfer.stats.decode import decode_buffer
from otel_flashinfer.stats.pending import ReadyPending, StatsPending
from otel_flashinfer.stats.recorder import GraphStatsSlot

CPU = torch.device("cpu")


class _Recorder:  # what GraphStatsSlot keeps of its recorder (not used by these tests)
    pass


def _captured(rows: gr.GraphRows, capture: graphs.Capture, sizes: list[int], room: int = 0,
              ) -> list[GraphStatsSlot]:
    """Each captured call takes its rows (and ``room`` more for its outputs, which it
    gives back), as ``StatsRecorder`` does under capture; returns their slots."""
    slots = []
    for record, n in zip(capture.records, sizes, strict=True):
        out, at = rows.take(n + room)
        metas = [(f"t{i}", "full", 1) for i in range(n)]
        slot = GraphStatsSlot(_Recorder(), out, metas, "", room, rows, at)._trim()
        rows.bind(record, slot)
        slots.append(slot)
    return slots


def _index(capture: graphs.Capture) -> dict[int, int]:
    return {id(r): i for i, r in enumerate(capture.records)}


def _sealed(sizes: list[int]) -> tuple[graphs.Capture, gr.GraphRows, Any]:
    """A capture of calls with ``sizes`` rows each, its rows sealed: (capture, rows,
    ring)."""
    capture = _capture(len(sizes))
    rows = gr.GraphRows(CPU)
    _captured(rows, capture, sizes)
    rows.seal()
    assert rows.ring is not None
    return capture, rows, rows.ring


def _timed_graph(anchored: bool) -> tuple[Any, graphs.Capture, gr.GraphRows, list[Any], Any]:
    """Two captured calls timed by their statistics launches (2 input rows, 2 output
    rows each), the graph's anchor taken or not: (rows data, capture, graph rows, their
    slots, the sealed ring)."""
    data, metas = _rows()
    capture = _capture(2)
    rows = gr.GraphRows(CPU)
    slots = _captured(rows, capture, [4, 4])
    if anchored:
        assert rows.take_anchor() == rows._chunks[0].data_ptr() + 56  # noqa: SLF001
        assert rows.take_anchor() == 0  # the first timed launch only
    for slot in slots:
        slot.metas, slot.nin, slot.timed = list(metas), 2, True
    rows.seal()
    assert rows.ring is not None
    return data, capture, rows, slots, rows.ring


def _replay_of(capture: graphs.Capture, index: int, whole: Any) -> Any:
    """The replay record the replaying thread leaves: the graph's statistics whole."""
    replay = _replay(capture, index=index)
    replay.group = [whole]
    return replay


def _fill(slots: list[GraphStatsSlot], data: torch.Tensor) -> None:
    """What the captured kernels leave in each call's rows on a replay."""
    at = 0
    for slot in slots:
        n = len(slot.metas)
        slot.out.copy_(data[at:at + n])
        at += n


def test_calls_share_chunks_and_a_replay_takes_one_slot() -> None:
    capture = _capture(3)
    rows = gr.GraphRows(CPU)
    slots = _captured(rows, capture, [4, 2, 3], room=64)
    # the room each call did not use went back: the three calls sit end to end, after
    # the anchor row (where the graph's first timed launch stamps its start)
    assert [s.at for s in slots] == [(0, 1), (0, 5), (0, 7)]
    assert [s.out.shape[0] for s in slots] == [4, 2, 3]
    assert [s.out.data_ptr() - slots[0].out.data_ptr() for s in slots] == [0, 256, 384]
    rows.seal()
    assert rows.ring is not None and rows.ring.rows == 10
    real, _ = _rows()
    data = torch.cat([real, real, real[:1]])  # 9 rows as the kernel writes them
    _fill(slots, data)
    whole = rows.replay(_index(capture), ts_ns=5)
    assert type(whole) is gr.GraphStatsPending and whole.slot == 0
    got = whole.split()  # the Python path: one StatsPending per child over its rows
    assert [i for i, _ in got] == [0, 1, 2] and whole.slot == -1 and not whole.split()
    pendings = [p for _, p in got]
    assert {p.slot for p in pendings} == {0} and len(rows.ring._free) == rows.ring.host.shape[0] - 1  # noqa: SLF001
    # each child reads its own rows of the slot, bytes as the kernels left them
    assert [p.ring.read_bytes(0, 16) for p in pendings] == [
        data[0:4].numpy().tobytes(), data[4:6].numpy().tobytes(), data[6:9].numpy().tobytes()]
    # the slot goes back after the last child read its rows, not before
    records = [CallRecord.for_call("c", 1, 2 + i, None, {}) for i in range(3)]
    for i, (p, r) in enumerate(zip(pendings, records, strict=True)):
        assert p.ready()
        r.own()
        p.apply(r)
        assert (0 in rows.ring._free) == (i == 2)  # noqa: SLF001
    assert [len(r.events) for r in records] == [4, 2, 3]
    assert records[2].events[0][1]["flashinfer.tensor"] == "t0"
    want = decode_buffer(data[6:9].numpy().tobytes(), slots[2].metas)
    assert [e[1]["min"] for e in records[2].events] == [w["min"] for w in want]
    assert [e[1]["numel"] for e in records[1].events] == [  # rows 4, 5: real's 0 and 1
        w["numel"] for w in decode_buffer(real[:2].numpy().tobytes(), slots[1].metas)]


def test_a_nested_call_keeps_its_parents_room_and_big_calls_get_new_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gr, "CHUNK_ROWS", 16)
    rows = gr.GraphRows(CPU)
    _outer, at_outer = rows.take(2 + 8)
    _inner, at_inner = rows.take(3)  # taken before the outer call trims
    rows.trim(at_inner, 3, 3)
    rows.trim(at_outer, 10, 2)  # not the tail: its room stays taken
    assert (at_outer, at_inner) == ((0, 1), (0, 11))
    assert rows.take(3)[1] == (1, 0)  # 14 + 3 > 16: a second chunk
    assert rows.take(17) is None  # more than a chunk: a buffer of its own
    assert gr.GraphRows(CPU).take(16) is None  # the first chunk keeps its anchor row


def test_a_full_ring_drops_each_childs_statistics_counted() -> None:
    """No slot free: one object for the whole replay (not one per child), the drop
    counted once per child on the replaying thread and never again; the Python path
    splits it into each child's reason."""
    capture, rows, ring = _sealed([1, 1])
    taken = [ring.acquire() for _ in range(ring.host.shape[0])]
    before = health.counters().get("stats_dropped", 0)
    got = rows.replay(_index(capture), ts_ns=7)
    assert type(got) is gr.GraphStatsPending and got.dropped == "ring_full"
    assert got.slot == -1 and not got.stamped  # nothing copied, no head to time it
    assert health.counters()["stats_dropped"] - before == 2
    got.abandon()  # a dropped span: nothing held, nothing counted twice
    parts = got.split()
    assert [i for i, _ in parts] == [0, 1] and not got.split()
    assert all(type(p) is ReadyPending and p.note == "ring_full" and p.ts_ns == 7
               for _, p in parts)
    assert health.counters()["stats_dropped"] - before == 2
    for slot in taken:
        ring.release(slot)


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
@pytest.mark.parametrize("stamped", [False, True])
def test_a_dropped_replay_is_written_in_c_as_python_writes_it(
        fmt: str, stamped: bool, events: FakeEvents) -> None:  # noqa: F811
    """A replay whose statistics were dropped (the ring full) is written by the encoder
    in C, not child by child in Python (333 us a replay of the 64-call step on an H100):
    each child says why it has none, a stamped replay why it has no GPU time, the same
    spans as the Python path, whether a prototype's template came from a dropped replay
    or from a full one, and from either to the other."""
    head = torch.zeros(1, dtype=torch.int64)
    data, capture, rows, slots, ring, ext = _stamped_graph(head if stamped else None)
    assert rows.times_replay() == stamped
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def full(index: int) -> Any:
        a = data.clone()
        a[0, 7], a[2, 7] = 5_002_000, 5_009_000
        _fill(slots, torch.cat([a, a]))
        rows._chunks[0][0, 7] = 5_001_000  # noqa: SLF001 - the anchor
        head[0], ext.now = 5_000_000, 5_040_000
        whole = rows.replay(_index(capture), ext, ts_ns=7)
        ring._native[whole.slot], ring._kind[whole.slot] = 90, "native"  # noqa: SLF001
        return _replay_of(capture, index, whole)

    def dropped(index: int) -> Any:
        taken = [ring.acquire() for _ in range(len(ring._free))]  # noqa: SLF001
        try:
            whole = rows.replay(_index(capture), ext, ts_ns=7)
        finally:
            for slot in taken:
                ring.release(slot)
        assert whole.dropped == "ring_full" and whole.stamped == stamped
        if stamped:  # the group says why the replay has no time (else: its event pair)
            assert rows.replay_time([whole]) is None
        return _replay_of(capture, index, whole)

    def attrs(span: Any) -> dict[str, Any]:
        return {kv.key: kv.value for kv in span.attributes}

    counted = health.counters().get("stats_dropped", 0)
    for index, make in enumerate((dropped, dropped, full, dropped, full), start=1):
        record = make(index)
        slow: list[Any] = []
        assert encoder.drain(deque([record]), slow, 1, deque(), 1.0, 2.0) == 1 and not slow
        got = _decode(encoder.take(), fmt)
        want = _python_path(fmt, make(index))
        assert [_without_span_id(g) for g in got] == [_without_span_id(w) for w in want]
        children = got[1:]
        if make is dropped:
            assert [attrs(c)["flashinfer.stats.dropped"].string_value
                    for c in children] == ["ring_full"] * 2
            assert not any(c.events for c in children)
            assert all(attrs(c)["flashinfer.cuda_graph.time_source"].string_value
                       == "replay" for c in children)
            own = attrs(got[0])
            assert ("flashinfer.gpu.time_unavailable" in own) == stamped
            if stamped:
                assert own["flashinfer.gpu.time_unavailable"].string_value == "stats_dropped"
        else:
            assert not any("flashinfer.stats.dropped" in attrs(c) for c in children)
            assert [len(c.events) for c in children] == [4, 4]
        assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001
    stats = encoder.stats()
    # every replay in C; each child but the prototypes' first from its byte template
    assert (stats["replays"], stats["replay_children"]) == (5, 10)
    assert stats["replay_templated"] == 8 and stats["stats_resolved"] == 2 * 2
    # three dropped replays of two children each, counted when dropped (twice: the
    # Python path's replays too), never by the encoder
    assert health.counters()["stats_dropped"] - counted == 3 * 2 * 2


def _dropped_replay(rows: gr.GraphRows, capture: graphs.Capture, ext: Any) -> Any:
    """``rows``' statistics for a replay, dropped: every slot of its ring taken."""
    ring = rows.ring
    taken = [ring.acquire() for _ in range(len(ring._free))]  # noqa: SLF001
    try:
        return rows.replay(_index(capture), ext, ts_ns=7)
    finally:
        for slot in taken:
            ring.release(slot)


def _replay_keys(spans: list[Any]) -> list[str]:
    return [kv.key for kv in spans[0].attributes]


def test_a_dropped_replay_timed_by_its_event_pair_keeps_its_time(
        events: FakeEvents) -> None:  # noqa: F811
    """A replay whose event pair timed it (its group became its stamper only later)
    and whose statistics were dropped: the span has its time and never also says it
    has none, in C as in Python (found by review: Python wrote both)."""
    head = torch.zeros(1, dtype=torch.int64)
    _data, capture, rows, _slots, _ring, ext = _stamped_graph(head)

    def replay() -> Any:
        record = _replay_of(capture, 1, _dropped_replay(rows, capture, ext))
        assert record.group[0].stamped and record.group[0].dropped == "ring_full"
        return record

    with answering_pool(717_000):
        record = replay()
        record.gpu = 3 << 16 | 4  # a packed event pair
        tracer, _ = _sdk_tracer()
        encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
        assert encoder.drain(deque([record]), [], 1, deque(), 1.0, 2.0) == 1
        got = _decode(encoder.take(), "protobuf")
    python = replay()
    python.attributes["flashinfer.gpu.time_ns"] = 717_000  # the worker: the pair first
    want = _python_path("protobuf", python)
    assert "flashinfer.gpu.time_unavailable" not in _replay_keys(want)
    assert [_without_span_id(g) for g in got] == [_without_span_id(w) for w in want]


@pytest.mark.parametrize("full_first", [True, False])
def test_a_replay_with_one_devices_statistics_dropped_keeps_the_others_time(
        full_first: bool, events: FakeEvents) -> None:  # noqa: F811
    """Two devices' groups in one capture, each able to time the replay: one full, one
    dropped.  The full one's stamps time the replay whichever comes first, and the
    span does not also say it has no time (found by review: C and Python disagreed)."""
    data, metas = _rows()
    capture = _capture(4)
    heads = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    groups = []
    for k, head in enumerate(heads):
        rows = gr.GraphRows(CPU, head=gr.HeadStamp(head, True, 0, 0))
        part = graphs.Capture(5)
        part.records = capture.records[2 * k:2 * k + 2]
        slots = _captured(rows, part, [4, 4])
        rows.take_anchor()
        for slot in slots:
            slot.metas, slot.nin, slot.timed = list(metas), 2, True
        ext = _MappedExtension()
        rows.seal()
        rows._map(ext, rows.ring)  # noqa: SLF001
        rows.ring._native[:] = [600 + i for i in range(len(rows.ring._native))]  # noqa: SLF001
        groups.append((rows, slots, ext))

    def replay() -> Any:
        (a, a_slots, a_ext), (b, _, b_ext) = groups
        rows_data = data.clone()
        rows_data[0, 7], rows_data[2, 7] = 5_002_000, 5_009_000
        _fill(a_slots, torch.cat([rows_data, rows_data]))
        a._chunks[0][0, 7] = 5_001_000  # noqa: SLF001 - the anchor
        heads[0][0], a_ext.now = 5_000_000, 5_040_000
        full = a.replay(_index(capture), a_ext, ts_ns=7)
        a.ring._native[full.slot], a.ring._kind[full.slot] = 90, "native"  # noqa: SLF001
        dropped = _dropped_replay(b, capture, b_ext)
        record = _replay_of(capture, 1, full)
        record.group = [full, dropped] if full_first else [dropped, full]
        return record

    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    slow: list[Any] = []
    assert encoder.drain(deque([replay()]), slow, 1, deque(), 1.0, 2.0) == 1 and not slow
    got = _decode(encoder.take(), "protobuf")
    want = _python_path("protobuf", replay())
    keys = _replay_keys(got)
    assert "flashinfer.gpu.time_ns" in keys and "flashinfer.gpu.time_unavailable" not in keys
    assert [_without_span_id(g) for g in got] == [_without_span_id(w) for w in want]


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_the_encoder_writes_each_child_from_the_shared_slot(
        fmt: str, events: FakeEvents) -> None:  # noqa: F811
    """Through the native encoder: the same spans as the Python path, the slot back once
    the replay is written, and a replay whose copy has not landed held back whole."""
    data, metas = _rows()
    capture = _capture(3)
    rows = gr.GraphRows(CPU)
    slots = _captured(rows, capture, [4, 2, 4])
    slots[0].metas = slots[2].metas = list(metas)
    slots[1].metas = list(metas[2:])
    rows.seal()
    ring = rows.ring
    assert ring is not None
    _fill(slots, torch.cat([data, data[2:], data]))
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def replay(index: int, event: int) -> Any:
        whole = rows.replay(_index(capture), ts_ns=7)
        ring._native[whole.slot], ring._kind[whole.slot] = event, "native"  # noqa: SLF001
        return _replay_of(capture, index, whole)

    events.status[81] = 1
    held = replay(1, 81)
    later: deque[Any] = deque()
    assert encoder.drain(deque([held]), [], 1, later, 1.0, 2.0) == 0
    assert list(later) == [held] and 0 not in ring._free  # noqa: SLF001
    events.status[81] = 0
    for index in (1, 2):  # the second from the byte templates
        assert encoder.drain(deque([later.popleft() if later else replay(index, 82)]),
                             [], 1, later, 1.5, 2.0) == 1
        got = _decode(encoder.take(), fmt)
        assert [len(s.events) for s in got] == [0, 4, 2, 4]
        assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001 - slot back once
        want = _python_path(fmt, replay(index, 83))
        assert [_without_span_id(g) for g in got[1:]] == [_without_span_id(w)
                                                          for w in want[1:]]
        assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001
    assert encoder.stats()["stats_resolved"] == 6


def test_a_dropped_span_hands_its_slots_back() -> None:
    """The span queue full: the oldest record is dropped, and the worker (which may query
    CUDA) hands back its statistics slot and each slot a dropped replay's children hold,
    without writing into attributes the dropped span shares with later ones."""
    capture, rows, ring = _sealed([1, 2])
    eager = _ring()
    data, metas = _rows()
    shared = {"flashinfer.api": "rmsnorm"}
    call = CallRecord.for_call("rmsnorm", 1, 3, None, shared)
    call.add_pending(_pending(eager, 0, data, metas, 2, event=0))
    tracer, _ = _sdk_tracer()
    pipeline = Pipeline(tracer=tracer, max_queue=1)
    try:
        whole = rows.replay(_index(capture))
        before = health.counters().get("stats_dropped", 0)
        spans_before = health.counters().get("spans_dropped", 0)
        queue_before = health.counters().get("spans_dropped_queue", 0)
        # A graph capture open meanwhile: nothing may query CUDA, so the worker waits and
        # the callers that drop records hand back nothing themselves.
        capture_guard.begin_capture()
        try:
            pipeline.submit(_replay_of(capture, 9, whole))
            pipeline.submit(call)  # drops the replay
            pipeline.submit(CallRecord.for_call("next", 1, 2, None, {}))  # drops the call
            time.sleep(0.2)
            assert 0 not in ring._free and 0 not in eager._free  # noqa: SLF001 - not yet
        finally:
            capture_guard.end_capture()
        # the replay's span and its two children's, and the call's
        assert health.counters()["spans_dropped"] - spans_before == 3 + 1
        assert health.counters()["spans_dropped_queue"] - queue_before == 3 + 1  # unencoded
        assert pipeline.flush(10)
        assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001
        assert len(eager._free) == eager.host.shape[0]  # noqa: SLF001
        assert health.counters()["stats_dropped"] - before >= 3  # 2 children, the call's 2
        assert shared == {"flashinfer.api": "rmsnorm"}
    finally:
        pipeline.shutdown()


def test_replays_with_groups_and_hooks_that_need_the_child(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """``emit_replay`` with a group's pendings and a hook that names each child (level
    10): the children are made on the replaying thread and carry both; a GPU time that
    will not come (the event pool still compiling) goes on the replay span."""
    from otel_flashinfer.gpu_timing import Unavailable

    capture = _capture(2)
    rows = capture.group(("stats", "cpu"), lambda: gr.GraphRows(CPU))
    _captured(rows, capture, [1, 1])
    capture.seal()
    seen: list[Any] = []
    capture.add_replay_hook(capture.records[1], lambda stream, child: seen.append(child))
    submitted: list[Any] = []

    class _Runtime:
        pipeline = type("P", (), {"submit": staticmethod(submitted.append)})()

        def sample_root(self, trace_id: int, name: str) -> bool:
            return True

    graphs.emit_replay(_Runtime(), capture, 4, 10, 20, Unavailable("compiling"))
    *children, replay = submitted
    assert [c.name for c in children] == ["call0", "call1"] and seen == [children[1]]
    assert [type(p) for c in children for p in c.pending] == [StatsPending, StatsPending]
    assert replay.pending[0].reason == "compiling" and replay.template is None


def _sdk_tracer() -> Any:
    from test_native_export import _sdk_tracer as make

    return make()


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_children_carry_their_gpu_time_from_the_launches_stamps(
        fmt: str, events: FakeEvents) -> None:  # noqa: F811
    """A captured call's inputs' launch stamps the GPU clock as it ends, its outputs'
    launch as it starts: each replay's child says that replay's GPU time of the call,
    written by the encoder (byte templates included) as the Python path writes it."""
    data, capture, rows, slots, ring = _timed_graph(anchored=False)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def replay(index: int, times: tuple[int, int], missing: bool = False) -> Any:
        stamped = data.clone()
        stamped[0, 7], stamped[2, 7] = 1_000_000, 1_000_000 + times[0]
        other = stamped.clone()
        other[2, 7] = 0 if missing else 1_000_000 + times[1]
        _fill(slots, torch.cat([stamped, other]))
        whole = rows.replay(_index(capture), ts_ns=7)
        ring._native[whole.slot], ring._kind[whole.slot] = 90, "native"  # noqa: SLF001
        return _replay_of(capture, index, whole)

    for index, times in ((1, (21_000, 4_500)), (2, (22_000, 5_000))):
        assert encoder.drain(deque([replay(index, times)]), [], 1, deque(), 1.0, 2.0) == 1
        got = _decode(encoder.take(), fmt)
        assert [len(s.events) for s in got] == [0, 4, 4]
        gpu = [{kv.key: kv.value for kv in s.attributes}["flashinfer.gpu.time_ns"].int_value
               for s in got[1:]]
        assert gpu == list(times)
        want = _python_path(fmt, replay(index, times))
        assert [_without_span_id(g) for g in got[1:]] == [_without_span_id(w)
                                                          for w in want[1:]]
    assert encoder.stats()["replay_templated"] == 2
    # a stamp that never came: Python writes that child, saying so
    slow: list[Any] = []
    assert encoder.drain(deque([replay(3, (1, 1), missing=True)]), slow, 1, deque(), 1.0,
                         2.0) == 0
    (held,) = slow
    children = held.expand()
    for child in children:
        child.own()
        (pending,) = child.pending
        assert pending.ready()
        pending.apply(child)
    assert children[0].attributes["flashinfer.gpu.time_ns"] == 1
    assert children[1].attributes["flashinfer.gpu.time_unavailable"] == "no_stamp"
    assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001


class _Extension:
    """The statistics extension's ``snapshot`` and events on the CPU: the copy is a
    memmove of the chunk's rows to the host address, as cudaMemcpyAsync would land it."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, int, int]] = []

    def snapshot(self, view: torch.Tensor, host: int, event: int) -> None:
        import ctypes

        ctypes.memmove(host, view.data_ptr(), view.numel() * 8)
        self.copies.append((view.shape[0], host, event))


def test_the_extensions_copies_land_each_chunk_where_its_rows_are(
        monkeypatch: pytest.MonkeyPatch, events: FakeEvents) -> None:  # noqa: F811
    """The path a device takes: one extension copy per chunk (the event on the last),
    the slot's event native, and every child resolved by the encoder in C."""
    monkeypatch.setattr(gr, "CHUNK_ROWS", 4)
    data, metas = _rows()
    capture = _capture(3)
    rows = gr.GraphRows(CPU)
    slots = _captured(rows, capture, [3, 2, 2])
    assert [s.at for s in slots] == [(0, 1), (1, 0), (1, 2)]  # 1 + 3 + 2 > 4: a second chunk
    for slot, n in zip(slots, [3, 2, 2], strict=True):
        slot.metas = list(metas[:n])
    rows.seal()
    ring = rows.ring
    assert ring is not None and ring.rows == 8
    ring._native[:] = [600 + i for i in range(len(ring._native))]  # noqa: SLF001 - made
    _fill(slots, torch.cat([data[:3], data[:2], data[1:3]]))
    ext = _Extension()
    whole = rows.replay(_index(capture), ext, ts_ns=7)
    slot = whole.slot
    host = ring.host_ptr(slot)
    assert ext.copies == [(4, host, 0), (4, host + 4 * 64, 600 + slot)]
    assert ring._kind[slot] == "native"  # noqa: SLF001
    assert [e[1] for e in whole.layout] == [64, 4 * 64, 6 * 64]  # each child's rows
    at = ring.host_ptr(slot) - ring.host_ptr(0)
    raw = bytes(ring._raw[at:at + 8 * 64])  # noqa: SLF001
    assert [raw[e[1]:e[1] + len(e[2]) * 64] for e in whole.layout] == [
        data[:3].numpy().tobytes(), data[:2].numpy().tobytes(), data[1:3].numpy().tobytes()]
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    replay = _replay_of(capture, 9, whole)
    assert encoder.drain(deque([replay]), [], 1, deque(), 1.0, 2.0) == 1
    assert [len(s.events) for s in _decode(encoder.take(), "protobuf")] == [0, 3, 2, 2]
    assert encoder.stats()["stats_resolved"] == 3
    assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001


class _MappedExtension(_Extension):
    """A device whose pinned slots are mapped (here the "device address" is the host
    one): the rows go by ``snapshot_kernel`` to the slot's device address."""

    def __init__(self, mapped: bool = True) -> None:
        super().__init__()
        self.mapped = mapped
        self.kernel_copies: list[tuple[int, int, int]] = []
        self.heads: list[tuple[int, int]] = []  # (slot address, head word) per stamped copy
        self.now = 0  # the GPU clock as a stamped copy starts

    def host_device_ptr(self, host: int) -> int:
        return host if self.mapped else 0

    def snapshot_kernel(self, view: torch.Tensor, dst: int, event: int, head: int = 0,
                        head_at: int = -1) -> None:
        """As copy_rows_kernel: with ``head``, the head's stamp and this copy's start
        (``now``) go into words ``head_at`` and ``head_at + 1`` of the slot."""
        import ctypes

        ctypes.memmove(dst, view.data_ptr(), view.numel() * 8)
        if head:
            ctypes.memmove(dst + head_at * 8, head, 8)
            ctypes.c_int64.from_address(dst + head_at * 8 + 8).value = self.now
            self.heads.append((dst, head))
        self.kernel_copies.append((view.shape[0], dst, event))


@pytest.mark.parametrize("mapped", [True, False])
def test_mapped_slots_take_the_copy_kernel_once_the_extension_is_there(
        monkeypatch: pytest.MonkeyPatch, events: FakeEvents, mapped: bool) -> None:  # noqa: F811
    """Sealed before the extension was built (as here: no extension at the seal), the
    first traced replay maps the slots; each chunk's rows then land at the slot's
    device address by ``snapshot_kernel``, or by ``snapshot`` where nothing is mapped."""
    monkeypatch.setattr(gr, "CHUNK_ROWS", 4)
    data, metas = _rows()
    capture = _capture(3)
    rows = gr.GraphRows(CPU)
    slots = _captured(rows, capture, [3, 2, 2])
    for slot, n in zip(slots, [3, 2, 2], strict=True):
        slot.metas = list(metas[:n])
    rows.seal()
    ring = rows.ring
    assert ring is not None and rows._mapped == 0  # noqa: SLF001 - nothing at the seal
    ring._native[:] = [600 + i for i in range(len(ring._native))]  # noqa: SLF001 - made
    _fill(slots, torch.cat([data[:3], data[:2], data[1:3]]))
    ext = _MappedExtension(mapped)
    for _ in range(2):  # the second replay takes another slot: the address moves with it
        whole = rows.replay(_index(capture), ext, ts_ns=7)
        host = ring.host_ptr(whole.slot)
        want = [(4, host, 0), (4, host + 4 * 64, 600 + whole.slot)]
        assert (ext.kernel_copies[-2:] if mapped else ext.copies[-2:]) == want
        at = host - ring.host_ptr(0)
        raw = bytes(ring._raw[at:at + 8 * 64])  # noqa: SLF001
        assert [raw[e[1]:e[1] + len(e[2]) * 64] for e in whole.layout] == [
            data[:3].numpy().tobytes(), data[:2].numpy().tobytes(),
            data[1:3].numpy().tobytes()]
        whole.abandon()
    assert len(ext.kernel_copies if mapped else ext.copies) == 4
    assert not (ext.copies if mapped else ext.kernel_copies)
    assert rows._mapped == (ring.host_ptr(0) if mapped else 0)  # noqa: SLF001


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_children_are_placed_on_the_gpu_timeline_from_the_graphs_first_launch(
        fmt: str, events: FakeEvents) -> None:  # noqa: F811
    """The graph's first timed launch stamps its start into the anchor row: each child
    then starts at the replay's host start plus its own start stamp's distance from the
    anchor, lasts its GPU time, and says so (time_source "gpu"), in C as in Python."""
    data, capture, rows, slots, ring = _timed_graph(anchored=True)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def replay(index: int, base: int, anchor: int | None = None) -> Any:
        a, b = data.clone(), data.clone()
        a[0, 7], a[2, 7] = base, base + 21_000
        b[0, 7], b[2, 7] = base + 30_000, base + 34_500
        _fill(slots, torch.cat([a, b]))
        rows._chunks[0][0, 7] = base - 3_000 if anchor is None else anchor  # noqa: SLF001
        whole = rows.replay(_index(capture), ts_ns=7)
        ring._native[whole.slot], ring._kind[whole.slot] = 90, "native"  # noqa: SLF001
        return _replay_of(capture, index, whole)

    def times(spans: list[Any]) -> list[tuple[int, int, str]]:
        return [(s.start_time_unix_nano, s.end_time_unix_nano,
                 {kv.key: kv.value for kv in s.attributes}[
                     "flashinfer.cuda_graph.time_source"].string_value) for s in spans]

    for index, base in ((1, 5_000_000), (2, 9_000_000)):  # the second from the templates
        assert encoder.drain(deque([replay(index, base)]), [], 1, deque(), 1.0, 2.0) == 1
        got = _decode(encoder.take(), fmt)
        # the replay's host start is 1,000: the GPU began 3 us before the first call
        assert times(got[1:]) == [(4_000, 25_000, "gpu"), (34_000, 38_500, "gpu")]
        assert (got[0].start_time_unix_nano, got[0].end_time_unix_nano) == (1_000, 2_000)
        want = _python_path(fmt, replay(index, base))
        assert [_without_span_id(g) for g in got[1:]] == [_without_span_id(w)
                                                          for w in want[1:]]
    assert encoder.stats()["replay_templated"] == 2
    # no anchor stamp in this replay: the replay's times, and the span says so
    assert encoder.drain(deque([replay(3, 7_000_000, anchor=0)]), [], 1, deque(), 1.0,
                         2.0) == 1
    got = _decode(encoder.take(), fmt)
    assert times(got[1:]) == [(1_000, 2_000, "replay")] * 2
    want = _python_path(fmt, replay(3, 7_000_000, anchor=0))
    assert [_without_span_id(g) for g in got[1:]] == [_without_span_id(w) for w in want[1:]]
    # children made as records (level 10 makes them on the replaying thread): the
    # encoder leaves their placement to Python, which places them the same way
    children = replay(4, 5_000_000).expand()
    slow: list[Any] = []
    assert encoder.drain(deque(children), slow, 2, deque(), 1.0, 2.0) == 0
    assert slow == children
    for child in children:
        child.own()
        (pending,) = child.pending
        assert pending.ready()
        pending.apply(child)
    assert [(c.start_ns, c.end_ns, c.attributes["flashinfer.cuda_graph.time_source"])
            for c in children] == [(4_000, 25_000, "gpu"), (34_000, 38_500, "gpu")]
    assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001


def _stamped_graph(head: torch.Tensor | None) -> tuple[Any, ...]:
    """Two timed calls of a graph whose first node stamps ``head`` (None: no head
    word), sealed with mapped slots: (data, capture, rows, slots, ring, extension)."""
    data, metas = _rows()
    capture = _capture(2)
    stamp = gr.HeadStamp(head, True, 0, 0) if head is not None else None
    rows = gr.GraphRows(CPU, head=stamp)
    slots = _captured(rows, capture, [4, 4])
    assert rows.take_anchor() == rows._chunks[0].data_ptr() + 56  # noqa: SLF001
    for slot in slots:
        slot.metas, slot.nin, slot.timed = list(metas), 2, True
    ext = _MappedExtension()
    rows.seal()
    assert rows.ring is not None
    rows._map(ext, rows.ring)  # noqa: SLF001 - as at a device's seal
    rows.ring._native[:] = [600 + i for i in range(len(rows.ring._native))]  # noqa: SLF001
    return data, capture, rows, slots, rows.ring, ext


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_a_stamped_replay_takes_its_gpu_time_from_the_graphs_head_and_the_copy(
        fmt: str, events: FakeEvents) -> None:  # noqa: F811
    """With a head word (the graph's first node stamps it) and mapped slots, the replay
    needs no event pair: the first chunk's copy writes the head's stamp and its own
    start into the anchor row, and the replay span's GPU time is their difference, in
    C as in Python.  A stamp that did not come (0) says so; the slot goes back each
    time."""
    head = torch.zeros(1, dtype=torch.int64)
    data, capture, rows, slots, ring, ext = _stamped_graph(head)
    assert rows.times_replay() and capture.replay_stamper() is None  # not its group
    capture.groups["stats"] = rows
    assert capture.replay_stamper() is rows
    assert rows.end_handle(rows.begin()) is rows  # no event recorded around the replay
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def replay(index: int, start: int, end: int) -> Any:
        a = data.clone()
        a[0, 7], a[2, 7] = start + 2_000, start + 9_000  # the first call's launches
        _fill(slots, torch.cat([a, a]))
        rows._chunks[0][0, 7] = start + 1_000  # noqa: SLF001 - the anchor
        head[0], ext.now = start, end
        whole = rows.replay(_index(capture), ext, ts_ns=7)
        assert whole.stamped and rows.replay_time([whole]) is None
        # the first chunk's copy, to the slot's start, read the head's word
        assert ext.heads[-1] == (ring.host_ptr(whole.slot), head.data_ptr())
        ring._native[whole.slot], ring._kind[whole.slot] = 90, "native"  # noqa: SLF001
        return _replay_of(capture, index, whole)

    def replay_time(span: Any) -> tuple[str, Any]:
        attrs = {kv.key: kv.value for kv in span.attributes}
        if "flashinfer.gpu.time_ns" in attrs:
            return "time_ns", attrs["flashinfer.gpu.time_ns"].int_value
        return "unavailable", attrs["flashinfer.gpu.time_unavailable"].string_value

    for index, (start, end) in ((1, (5_000_000, 5_040_000)), (2, (9_000_000, 9_035_500))):
        record = replay(index, start, end)
        assert encoder.drain(deque([record]), [], 1, deque(), 1.0, 2.0) == 1
        got = _decode(encoder.take(), fmt)
        assert replay_time(got[0]) == ("time_ns", end - start)
        assert record.attributes["flashinfer.gpu.time_ns"] == end - start  # for ``auto``
        want = _python_path(fmt, replay(index, start, end))
        assert [_without_span_id(g) for g in got] == [_without_span_id(w) for w in want]
    assert encoder.stats()["replay_templated"] == 2
    # the head's word unwritten (0): Python writes the replay, saying why it has no time
    slow: list[Any] = []
    assert encoder.drain(deque([replay(3, 0, 40_000)]), slow, 1, deque(), 1.0, 2.0) == 0
    (held,) = slow
    children = held.expand()
    (own,) = held.pending
    assert own.ready()
    own.apply(held)
    assert held.attributes["flashinfer.gpu.time_unavailable"] == "no_stamp"
    for child in children:  # the slot goes back after the children's rows too
        child.own()
        (pending,) = child.pending
        assert pending.ready()
        pending.apply(child)
    assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001


def test_a_replay_is_timed_by_events_where_nothing_stamps_it(
        events: FakeEvents) -> None:  # noqa: F811
    """No head word, or slots the copy engine fills (not mapped): no group stamps the
    replay, which keeps its event pair; a stamped group whose statistics were dropped
    (the ring full) says why the replay has no GPU time."""
    *_, capture, rows, _slots, _ring2, _ext = _stamped_graph(None)
    capture.groups["stats"] = rows
    assert not rows.times_replay() and capture.replay_stamper() is None
    head = torch.zeros(1, dtype=torch.int64)
    _data, capture, rows, _slots, ring, ext = _stamped_graph(head)
    rows._mapped = 0  # noqa: SLF001 - as where cudaHostGetDevicePointer failed
    assert not rows.times_replay()
    rows._mapped = ring.host_ptr(0)  # noqa: SLF001
    assert rows.times_replay()
    taken = [ring.acquire() for _ in range(ring.host.shape[0])]
    dropped = rows.replay(_index(capture), ext, ts_ns=7)
    assert dropped.dropped == "ring_full" and not ext.heads  # nothing copied, stamped
    assert rows.replay_time([dropped]) is None  # it says why the replay has no time
    reason = rows.replay_time(None)  # no group at all
    assert type(reason).__name__ == "Unavailable" and reason.reason == "stats_dropped"
    for slot in taken:
        ring.release(slot)


def test_a_traced_replay_records_no_event_pair_where_its_group_stamps_it(
        events: FakeEvents) -> None:  # noqa: F811
    """``graphs._begin`` takes the stamping group as the replay's timer (the runtime's
    event pair is not touched), and ``emit_replay`` leaves the time to the group's
    pending: no handle and no pending of the replay's own, its attributes kept for
    ``auto``.  Made on the replaying thread (level 10's hooks), the replay holds the
    group's stamps as its own pending."""
    head = torch.zeros(1, dtype=torch.int64)
    _data, capture, rows, _slots, ring, ext = _stamped_graph(head)
    capture.groups[("stats", "cpu")] = rows
    rows.seal()
    submitted: list[Any] = []

    class _Runtime:
        pipeline = type("P", (), {"submit": staticmethod(submitted.append)})()

        def replay_timer(self) -> Any:  # GPU timing on: an event pair, never recorded
            class _Pair:
                def begin(self) -> int:
                    raise AssertionError("an event pair was recorded")

            return _Pair()

        def sample_root(self, trace_id: int, name: str) -> bool:
            return True

    # the device's path: the extension's copies (a CPU group would copy by torch)
    rows.replay = functools.partial(gr.GraphRows.replay, rows, module=ext)  # type: ignore[method-assign]
    try:
        timer, mark, _start = graphs._begin(_Runtime(), capture)  # noqa: SLF001
        assert timer is rows
        graphs.emit_replay(_Runtime(), capture, 4, 10, 20, timer.end_handle(mark))
        (replay,) = submitted
        assert replay.gpu is None and not replay.pending
        (whole,) = replay.group
        assert whole.stamped and capture.timed is replay.attributes
        whole.abandon()
        # level 10: the children are made on the replaying thread
        capture.add_replay_hook(capture.records[0], lambda stream, child: None)
        submitted.clear()
        graphs.emit_replay(_Runtime(), capture, 5, 10, 20, timer.end_handle(mark))
        *children, replay = submitted
        assert [type(p) for p in replay.pending] == [gr.ReplayStamps]
        for record in (replay, *children):
            record.own()
            for pending in record.pending:
                assert pending.ready()
                pending.apply(record)
        assert replay.attributes["flashinfer.gpu.time_unavailable"] == "no_stamp"  # head 0
        assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001
        # the ring full: no slot, no stamps, and the replay says why it has no time
        taken = [ring.acquire() for _ in range(ring.host.shape[0])]
        submitted.clear()
        graphs.emit_replay(_Runtime(), capture, 6, 10, 20, timer.end_handle(mark))
        *children, replay = submitted
        assert [p.reason for p in replay.pending] == ["stats_dropped"]
        for slot in taken:
            ring.release(slot)
    finally:
        del rows.replay


def _one_stamped_replay(gpu_ns: int) -> tuple[Any, Any]:
    """A stamped graph's replay record whose slot says the head stamped 1,000 and the
    copy began ``gpu_ns`` later (its event 90): (the ring, the record)."""
    head = torch.zeros(1, dtype=torch.int64)
    data, capture, rows, slots, ring, ext = _stamped_graph(head)
    _fill(slots, torch.cat([data, data]))
    head[0], ext.now = 1_000, 1_000 + gpu_ns
    whole = rows.replay(_index(capture), ext, ts_ns=7)
    ring._native[whole.slot], ring._kind[whole.slot] = 90, "native"  # noqa: SLF001
    return ring, _replay_of(capture, 1, whole)


def test_a_stamped_replay_waits_for_its_slot_on_the_python_path(
        monkeypatch: pytest.MonkeyPatch, events: FakeEvents) -> None:  # noqa: F811
    """The worker's Python path (no native encoder) expands a stamped replay: its own
    time waits for the slot's copy like its children's rows, under the same deadline,
    instead of timing out at the first look."""
    from otel_flashinfer.stats import ring as ring_module

    _ring, record = _one_stamped_replay(40_000)
    events.status[90] = 1  # the copy has not landed at the first look
    monkeypatch.setattr(ring_module._kernel, "get",  # noqa: SLF001 - the Python path's query
                        lambda *a, **k: type("M", (), {"event_query": staticmethod(
                            events._query)})())  # noqa: SLF001
    tracer, _ = _sdk_tracer()
    pipeline = Pipeline(tracer=tracer)
    try:
        now = time.monotonic()
        pipeline._consider(record, now)  # noqa: SLF001
        assert record in pipeline._waiting and record.deadline > now  # noqa: SLF001
        assert "flashinfer.gpu.time_unavailable" not in record.attributes
        events.status[90] = 0
        pipeline._waiting.remove(record)  # noqa: SLF001
        pipeline._consider(record, now + 0.01)  # noqa: SLF001
        assert record.attributes["flashinfer.gpu.time_ns"] == 40_000
        assert "flashinfer.gpu.time_unavailable" not in record.attributes
    finally:
        pipeline.shutdown(5)


def test_a_replay_timed_by_its_event_pair_keeps_that_time(events: FakeEvents) -> None:  # noqa: F811
    """Slots mapped during the replay (the extension built meanwhile): the replay had its
    event pair and its copy stamped too.  The pair's time stands; the stamps only hand
    the slot back."""
    ring, record = _one_stamped_replay(40_000)
    record.attributes["flashinfer.gpu.time_ns"] = 52_000  # the pair's, applied first
    children = record.expand()
    (own,) = record.pending
    assert own.ready()
    own.apply(record)
    assert record.attributes["flashinfer.gpu.time_ns"] == 52_000
    assert "flashinfer.gpu.time_unavailable" not in record.attributes
    for child in children:
        child.own()
        for pending in child.pending:
            assert pending.ready()
            pending.apply(child)
    assert len(ring._free) == ring.host.shape[0]  # noqa: SLF001


def test_a_head_not_put_first_leaves_the_replays_to_the_event_pair(
        monkeypatch: pytest.MonkeyPatch, events: FakeEvents) -> None:  # noqa: F811
    """A head node the driver would not order ahead of every node (state 2) still
    writes its word on every replay: the graph keeps the word, and its replays keep
    the event pair; so does a head that could not be put ahead of the roots added after
    it (``order_head`` at the capture's end)."""
    word = torch.zeros(1, dtype=torch.int64)
    unordered = gr.GraphRows(CPU, head=gr.HeadStamp(word, False, 7, 8))
    assert unordered._head is None and unordered._head_stamp.word is word  # noqa: SLF001
    _data, _capture, rows, _slots, _ring, _ext = _stamped_graph(word)
    assert rows.times_replay()
    asked: list[tuple[int, int]] = []

    class _Module:
        def head_stamp_order(self, graph: int, node: int) -> bool:
            asked.append((graph, node))
            return False

    monkeypatch.setattr(gr._kernel, "get", lambda: _Module())  # noqa: SLF001
    rows.order_head()
    assert asked == [(0, 0)] and not rows.times_replay()
    unordered.order_head()  # nothing to order
    assert asked == [(0, 0)]


def test_the_head_word_makes_no_fill_in_deterministic_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic mode fills new memory, which in a capture is a node after the head
    that would overwrite its stamp on every replay: the word is taken without it, and
    the setting is back afterwards."""
    seen: list[bool] = []
    empty = torch.empty

    def watch(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(torch.utils.deterministic.fill_uninitialized_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", watch)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert gr._word(CPU).dtype == torch.int64  # noqa: SLF001
    finally:
        torch.use_deterministic_algorithms(was)
    assert seen == [False] and torch.utils.deterministic.fill_uninitialized_memory
