"""Graph replays written whole by the native encoder from the capture's prototypes
(``pipeline.ReplayRecord``, csrc/otlp_encoder.c ``encode_replay``; issue 19, item 1).

The replaying thread leaves one record per traced replay; the encoder writes the
replay span and one child per captured call.  The Python path (``ReplayRecord.expand``,
what every other exporter setup uses) is the reference: the same replay must decode to
the same spans either way, child span ids aside (fresh random ones, unique).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanContext, TraceFlags
from test_native_export import BASE, DESCRIBER, Q, _sdk_tracer, _spans_in
from test_native_stats import (  # noqa: F401
    FakeEvents,
    _pending,
    _ring,
    _rows,
    answering_pool,
    events,
)

from otel_flashinfer import describe, export, graphs
from otel_flashinfer.otlp_json import json_to_request
from otel_flashinfer.pipeline import _EMPTY, CallRecord, ReplayRecord

_otlp = pytest.importorskip("otel_flashinfer._otlp", reason="native encoder not built")
ROOT = Path(__file__).resolve().parents[1]
TRACE, REPLAY_ID = 0x1234567890ABCDEF1234567890ABCDEF, 0x7777
PARENT = SpanContext(TRACE, 0x42, False, TraceFlags(1))


def _capture(n: int = 3) -> graphs.Capture:
    """A capture of ``n`` calls as the wrapper leaves them: names, base attributes,
    argument snapshots described in the background, each with its own span."""
    capture = graphs.Capture(5)
    for i in range(n):
        r = CallRecord.for_call(f"call{i}", TRACE, 0x100 + i, PARENT,
                                {**BASE, "flashinfer.cuda_graph.capturing": True})
        if i != 1:
            r.describe = DESCRIBER
            r.data = [describe.snapshot(Q), describe.snapshot(Q[:, :2]),
                      describe.snapshot(Q)]
            r.kw = {"scale": 0.5}
            r.result = describe.snapshot(Q)
        capture.add(r)
    return capture


def _replay(capture: graphs.Capture, index: int = 9, replay_id: int = REPLAY_ID,
            child_pending: list[Any] | None = None) -> ReplayRecord:
    protos, _hooks = capture.template()
    context = SpanContext(TRACE, replay_id, False, TraceFlags(1))
    return ReplayRecord(TRACE, replay_id, PARENT, 1_000, 2_000,
                        {"flashinfer.cuda_graph.id": 5, "flashinfer.cuda_graph.replay": index,
                         "flashinfer.cuda_graph.replays_skipped": 0},
                        context, index, protos, child_pending)


def _decode(payload: bytes, fmt: str) -> list[Any]:
    request = (ExportTraceServiceRequest.FromString(payload) if fmt == "protobuf"
               else json_to_request(payload.decode()))
    return list(request.resource_spans[0].scope_spans[0].spans)


def _python_path(fmt: str, replay: ReplayRecord) -> list[Any]:
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    children = replay.expand()
    for pending in replay.pending:  # its own GPU time from a group's slot (stamped)
        if hasattr(pending, "_status"):  # not a time that will not come (dropped)
            pending._status = 0  # noqa: SLF001 - its event completed
        pending.apply(replay)
    replay.pending = _EMPTY
    encoder.add(replay)
    for child in children:
        for pending in child.pending:  # as the worker resolves them (ready, then applied)
            child.own()
            if not hasattr(pending, "apply_raw"):  # ready already: a drop to report
                pending.apply(child)
                continue
            pending._status = 0  # noqa: SLF001 - its event completed
            pending.apply_raw(child)
        child.pending = _EMPTY
        encoder.add(child)
    return _decode(encoder.take(), fmt)


def _without_span_id(span: Any) -> Any:
    out = type(span)()
    out.CopyFrom(span)
    out.span_id = b""
    return out


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
@pytest.mark.parametrize("index", [9, 10, 2**40])  # the first child, then byte templates
def test_replay_written_in_c_is_what_python_expands(fmt: str, index: int) -> None:
    capture = _capture()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    if index != 9:  # earlier replays: each prototype's first child made its template
        assert encoder.drain(deque([_replay(capture, index=3, replay_id=0x55)]), [], 1,
                             deque(), 1.0, 2.0) == 1
        encoder.take()
    replay = _replay(capture, index=index)
    queue, slow, later = deque([replay]), [], deque()
    assert encoder.drain(queue, slow, 1, later, 1.0, 2.0) == 1
    assert not slow and not later
    got = _decode(encoder.take(), fmt)
    want = _python_path(fmt, _replay(capture, index=index))
    assert len(got) == len(want) == 4
    assert got[0] == want[0]  # the replay span itself, byte for byte
    for g, w in zip(got[1:], want[1:], strict=True):
        assert _without_span_id(g) == _without_span_id(w)
    # what a reader sees: each child under the replay, in its trace, linked to its
    # capture-time span, with the replay index and the capture-time argument shapes
    for i, child in enumerate(got[1:]):
        assert child.name == f"call{i}"
        assert child.trace_id == TRACE.to_bytes(16, "big")
        assert child.parent_span_id == REPLAY_ID.to_bytes(8, "big")
        assert child.span_id not in (b"", REPLAY_ID.to_bytes(8, "big"))
        assert [link.span_id for link in child.links] == [(0x100 + i).to_bytes(8, "big")]
        attrs = {kv.key: kv.value for kv in child.attributes}
        assert attrs["flashinfer.cuda_graph.replay"].int_value == index
        # the child's start and end are its replay's, and it says so
        assert attrs["flashinfer.cuda_graph.time_source"].string_value == "replay"
        assert "flashinfer.cuda_graph.capturing" not in attrs
        assert ("flashinfer.arg.q.shape" in attrs) == (i != 1)
        assert (child.start_time_unix_nano, child.end_time_unix_nano) == (1_000, 2_000)
    stats = encoder.stats()
    assert stats["replays"] == 1 + (index != 9) and stats["replay_children"] == 3 * stats["replays"]
    assert stats["replay_templated"] == (3 if index != 9 else 0)
    assert replay.template is None and replay.child_pending is None


def test_child_span_ids_are_fresh_and_unique_across_replays() -> None:
    capture = _capture(4)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    replays = [_replay(capture, index=i, replay_id=0x9000 + i) for i in range(1, 201)]
    assert encoder.drain(deque(replays), [], 500, deque(), 1.0, 2.0) == 200
    # the first replay's children make their prototypes' byte templates; the rest copy
    assert encoder.stats()["replay_templated"] == 199 * 4
    spans = _decode(encoder.take(), "protobuf")
    assert len(spans) == 200 * 5
    ids = [s.span_id for s in spans]
    assert len(set(ids)) == len(ids)
    by_parent: dict[bytes, list[int]] = {}
    for s in spans:
        if s.name != "cuda_graph.replay":
            attrs = {kv.key: kv.value.int_value for kv in s.attributes}
            by_parent.setdefault(s.parent_span_id, []).append(
                attrs["flashinfer.cuda_graph.replay"])
    assert by_parent == {(0x9000 + i).to_bytes(8, "big"): [i] * 4 for i in range(1, 201)}


def test_level5_children_carry_their_replays_statistics(events: FakeEvents) -> None:  # noqa: F811
    """Each child's statistics for this replay, resolved in C; a child not in yet holds
    the whole replay back; once in, every slot goes back to its ring."""
    rows, metas = _rows()
    ring = _ring()
    capture = _capture(3)
    pend = [[_pending(ring, 0, rows, metas, 2, event=51)], None,
            [_pending(ring, 1, rows, metas, 2, event=52)]]
    events.status[52] = 1
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    replay = _replay(capture, child_pending=pend)
    later: deque[Any] = deque()
    slow: list[Any] = []
    assert encoder.drain(deque([replay]), slow, 1, later, 1.0, 2.0) == 0
    assert list(later) == [replay] and not slow and encoder.take() is None
    assert pend[0][0].slot == 0 and pend[2][0].slot == 1  # nothing handed back yet
    events.status[52] = 0
    assert encoder.drain(later, slow, 1, later, 1.5, 2.0) == 1
    spans = _decode(encoder.take(), "protobuf")
    assert [len(s.events) for s in spans] == [0, 4, 0, 4]
    assert all(e.name == "flashinfer.tensor_stats" for e in spans[1].events)
    attrs = {kv.key: kv.value for kv in spans[1].attributes}
    assert attrs["flashinfer.nonfinite"].bool_value is True
    assert pend[0][0].slot == -1 and pend[2][0].slot == -1
    assert sorted(ring._free) == [0, 1, 2, 3]  # noqa: SLF001
    assert encoder.stats()["stats_resolved"] == 2
    # the next replays come from the byte templates: their own rows, their own flag,
    # exactly what Python makes of the same replay
    clean_rows = rows.clone()
    clean_rows[0] = clean_rows[3]  # q without its NaN/-inf
    for fmt in ("protobuf", "json"):
        enc = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
        for index, data in ((20, rows), (21, clean_rows), (22, rows)):
            ours = [[_pending(ring, None, data, metas, 2, event=70)], None,
                    [_pending(ring, None, data, metas, 2, event=71)]]
            assert enc.drain(deque([_replay(capture, index=index, child_pending=ours)]), [], 1,
                             deque(), 1.0, 2.0) == 1
            got = _decode(enc.take(), fmt)
            ref = [[_pending(ring, None, data, metas, 2, event=72)], None,
                   [_pending(ring, None, data, metas, 2, event=73)]]
            want = _python_path(fmt, _replay(capture, index=index, child_pending=ref))
            assert [_without_span_id(g) for g in got] == [_without_span_id(w) for w in want]
            assert len(ring._free) == 4  # noqa: SLF001 - every slot back, either path
            flags = [{kv.key for kv in c.attributes} >= {"flashinfer.nonfinite"}
                     for c in got[1:]]
            assert flags == ([True, False, True] if data is rows else [False] * 3)
        assert enc.stats()["replay_children"] == 9


def test_what_c_cannot_write_goes_to_python_whole(events: FakeEvents) -> None:  # noqa: F811
    rows, metas = _rows()
    ring = _ring()
    capture = _capture(2)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    # a note to add: Python writes it
    noted = _replay(capture, child_pending=[
        [_pending(ring, 0, rows, metas, 2, event=61, note="too_many_tensors:2")], None])
    # a child that fails to encode: nothing of the replay stays in the batch
    broken = graphs.Capture(6)
    bad = CallRecord.for_call("bad", TRACE, 0x200, PARENT, {"flashinfer.x": object()})
    broken.add(bad)
    broken.template()[0][0].name = 123  # not a str: encode_record refuses it
    first = CallRecord.for_call("before", TRACE, 0x300, PARENT, BASE)
    queue = deque([first, noted, _replay(broken)])
    slow: list[Any] = []
    assert encoder.drain(queue, slow, 3, deque(), 1.0, 2.0) == 1
    assert [r.name for r in slow] == ["cuda_graph.replay", "cuda_graph.replay"]
    assert slow[0].template is not None and slow[1].template is not None
    assert encoder.count == 1  # "before" only: the broken replay was rolled back whole
    assert [s.name for s in _decode(encoder.take(), "protobuf")] == ["before"]
    # Python then expands the noted one into plain records with the note on the child
    children = noted.expand()
    assert [c.name for c in children] == ["call0", "call1"]
    assert len(children[0].pending) == 1 and not children[1].pending


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_templated_children_with_gpu_times_match_python(fmt: str,
                                                        events: FakeEvents) -> None:  # noqa: F811
    """Children written from their templates with the GIL released carry their own GPU
    time, placement and statistics: what Python makes of the same replay."""
    rows, metas = _rows()
    ring = _ring()
    capture = _capture(3)
    tracer, _ = _sdk_tracer()
    enc = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)

    def pend(event: int, k: int) -> list[Any]:
        return [[_pending(ring, None, rows, metas, 2, event=event, gpu_time=True,
                          stamps=(1_000_100 + k, 1_000_600 + 3 * k))], None,
                [_pending(ring, None, rows, metas, 2, event=event + 1)]]

    for index in (30, 31, 32):  # the first makes the templates, the others use them
        got = enc.drain(deque([_replay(capture, index=index, child_pending=pend(80, index))]),
                        [], 1, deque(), 1.0, 2.0)
        assert got == 1
        spans = _decode(enc.take(), fmt)
        want = _python_path(fmt, _replay(capture, index=index, child_pending=pend(90, index)))
        assert [_without_span_id(g) for g in spans] == [_without_span_id(w) for w in want]
        assert len(ring._free) == 4  # noqa: SLF001
    assert enc.stats()["replay_templated"] == 6


def test_a_replays_gpu_time_resolved_in_c_reaches_auto() -> None:
    """The encoder resolves a replay's GPU time in C for its span, and leaves it in the
    record's attributes too (as Python's path does), where ``REPLAY_EVERY=auto`` learns
    how long a replay keeps the GPU busy: read once, and only once it is in."""
    with answering_pool(717_000):
        capture = _capture(2)
        tracer, _ = _sdk_tracer()
        encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
        replay = _replay(capture)
        replay.gpu = 3 << 16 | 4
        capture.timed = replay.attributes  # as emit_replay leaves it
        assert graphs._replay_gpu_s(capture) is None  # noqa: SLF001 - not in yet
        assert encoder.drain(deque([replay]), [], 1, deque(), 1.0, 2.0) == 1
        spans = _decode(encoder.take(), "protobuf")
        own = next(s for s in spans if s.span_id == REPLAY_ID.to_bytes(8, "big"))
        assert {kv.key: kv.value.int_value for kv in own.attributes}[
            "flashinfer.gpu.time_ns"] == 717_000
        assert graphs._replay_gpu_s(capture) == pytest.approx(717e-6)  # noqa: SLF001
        assert capture.timed is None and graphs._replay_gpu_s(capture) is None  # noqa: SLF001
        # A replay Python expanded first (its GPU time was late past the deadline), its
        # own span then written here: its time still reaches ``auto``.
        late = _replay(capture, index=10)
        late.gpu = 3 << 16 | 4
        late.expand()
        capture.timed = late.attributes
        assert encoder.drain(deque([late]), [], 1, deque(), 1.0, 2.0) == 1
        assert graphs._replay_gpu_s(capture) == pytest.approx(717e-6)  # noqa: SLF001


def test_a_malformed_meta_in_a_templated_replay_goes_to_python(events: FakeEvents) -> None:  # noqa: F811
    """A row meta C cannot read, met while the templated children are prepared: nothing
    of the replay stays in the batch, and Python gets it whole."""
    rows, metas = _rows()
    ring = _ring()
    capture = _capture(2)
    tracer, _ = _sdk_tracer()
    enc = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    good = _replay(capture, index=1, child_pending=[
        [_pending(ring, None, rows, metas, 2, event=61)], None])
    assert enc.drain(deque([good]), [], 1, deque(), 1.0, 2.0) == 1
    enc.take()
    bad_metas = [("q", 7, 300), *metas[1:]]  # a scope that is not a str
    first = CallRecord.for_call("before", TRACE, 0x300, PARENT, BASE)
    bad = _replay(capture, index=2, child_pending=[
        [_pending(ring, None, rows, bad_metas, 2, event=62)], None])
    slow: list[Any] = []
    assert enc.drain(deque([first, bad]), slow, 2, deque(), 1.0, 2.0) == 1
    assert [r.name for r in slow] == ["cuda_graph.replay"] and slow[0].template is not None
    assert enc.count == 1
    assert [s.name for s in _decode(enc.take(), "protobuf")] == ["before"]


PROGRAM = textwrap.dedent(
    """
    import gc, json, sys, torch, otel_flashinfer
    from otel_flashinfer import runtime

    class FakeGraph:  # torch.cuda.CUDAGraph on a CPU box (graphs.patch wraps it)
        def capture_begin(self, *a, **k): pass
        def capture_end(self): pass
        def replay(self): pass

    torch.cuda.CUDAGraph = FakeGraph
    otel_flashinfer.instrument(level=3, journal_dir="")
    step = otel_flashinfer.traced(lambda x, eps=1e-6: x, name="rmsnorm")
    other = otel_flashinfer.traced(lambda x: x, name="decode")
    graph = FakeGraph()
    graph.capture_begin()
    step(torch.ones(8, 128)); other(torch.ones(4)); step(torch.ones(2, 2))
    graph.capture_end()
    pipeline = runtime.current().pipeline
    submitted, submit = [], pipeline.submit

    def keep_last(record):
        submitted[:] = [record]
        submit(record)

    pipeline.submit = keep_last
    for _ in range(50):
        graph.replay()
    pipeline.submit = submit
    queued = submitted.pop()  # the last replay's record
    untracked = type(queued).__name__ == "ReplayRecord" and not gc.is_tracked(queued) \
        and not gc.is_tracked(queued.context)
    otel_flashinfer.flush(30)
    # Out of the collector, so only reference counting frees it: nothing else holds it.
    untracked = untracked and sys.getrefcount(queued) == 2
    native = pipeline._native
    print(json.dumps({"untracked": untracked,
                      **{k: e.stats() for k, e in native.encoders.items()}}))
    """
)


def test_the_default_file_gets_every_replay_and_child(tmp_path: Path) -> None:
    """End to end in a process of its own with the default exporter: 50 replays of a
    3-call capture are 50 replay spans and 150 children, written by the encoder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # a queued replay record waits outside the cyclic collector, and is freed after
    assert stats.pop("untracked") is True
    (encoder,) = stats.values()
    assert encoder["replays"] == 50 and encoder["replay_children"] == 150
    spans = _spans_in(tmp_path / "flashinfer_traces.jsonl")
    replays = {s["spanId"]: s for s in spans if s["name"] == "cuda_graph.replay"}
    captured = {s["spanId"]: s for s in spans if "parentSpanId" not in s or
                s["parentSpanId"] not in replays}
    children = [s for s in spans if s.get("parentSpanId") in replays]
    assert len(replays) == 50 and len(children) == 150
    for child in children:
        (link,) = child["links"]
        assert link["spanId"] in captured
        assert captured[link["spanId"]]["name"] == child["name"]
        assert child["traceId"] == replays[child["parentSpanId"]]["traceId"]
    names = sorted(c["name"] for c in children if c["parentSpanId"] == next(iter(replays)))
    assert names == ["decode", "rmsnorm", "rmsnorm"]


def test_templates_follow_the_attributes_every_span_gets() -> None:
    """A forked child's encoder gets its pid on every span (``set_extra``): children
    copied from byte templates made before must carry the new value, not the old."""
    capture = _capture(2)
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    encoder.set_extra({"process.pid": 1})
    assert encoder.drain(deque([_replay(capture, index=1)]), [], 1, deque(), 1.0, 2.0) == 1
    encoder.take()
    encoder.set_extra({"process.pid": 2})
    assert encoder.drain(deque([_replay(capture, index=2)]), [], 1, deque(), 1.0, 2.0) == 1
    for span in _decode(encoder.take(), "protobuf"):
        attrs = {kv.key: kv.value.int_value for kv in span.attributes}
        assert attrs["process.pid"] == 2, span.name


def test_a_replay_given_up_under_backpressure_still_writes_its_children(tmp_path: Path) -> None:
    """The worker gives the oldest waiting records up when too many wait: a replay is
    expanded first, so its children go out (each saying why) instead of the encoder
    refusing a replay whose children were never written."""
    from test_native_export import _file_provider

    from otel_flashinfer.pipeline import Pipeline

    path = tmp_path / "traces.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    assert pipeline.export_path == "native"
    replay = _replay(_capture(3))
    pipeline._finish(replay, abandon="backpressure")  # noqa: SLF001 - as the worker does
    assert pipeline.flush(10)
    spans = _spans_in(path)
    assert sorted(s["name"] for s in spans) == ["call0", "call1", "call2", "cuda_graph.replay"]
    replay_id = format(REPLAY_ID, "016x")
    children = [s for s in spans if s["name"] != "cuda_graph.replay"]
    assert all(s["parentSpanId"] == replay_id for s in children)
    pipeline.shutdown(5)


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_a_child_whose_first_attribute_is_the_replay_index(fmt: str) -> None:
    """A captured call with no attributes of its own: the replay index opens the
    attribute list (no JSON comma before it), in the first child and in templated ones."""
    capture = graphs.Capture(7)
    capture.add(CallRecord.for_call("bare", TRACE, 0x300, PARENT, {}))
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    for index in (1, 2, 3):
        assert encoder.drain(deque([_replay(capture, index=index)]), [], 1, deque(), 1.0,
                             2.0) == 1
        got = _decode(encoder.take(), fmt)
        want = _python_path(fmt, _replay(capture, index=index))
        assert _without_span_id(got[1]) == _without_span_id(want[1])
        assert [kv.key for kv in got[1].attributes] == [
            "flashinfer.cuda_graph.replay", "flashinfer.cuda_graph.time_source"]
    assert encoder.stats()["replay_templated"] == 2


class _Requests:
    """A sender that keeps each request's span count (and takes its time, like a file
    write or a local receiver: busy, not stalled)."""

    fmt = "json"

    def __init__(self, seconds: float = 0.0) -> None:
        self.counts: list[int] = []
        self.seconds = seconds

    def send(self, payload: bytes, count: int) -> bool:
        import time

        time.sleep(self.seconds)
        assert len(_decode(payload, "json")) == count
        self.counts.append(count)
        return True


def test_queued_replays_leave_in_requests_of_about_a_batch() -> None:
    """A replay record carries a span per captured call: a drain of queued replays is
    cut into requests of the batch size (plus at most one replay's children), never one
    request of every span queued (that was 470 MB in one line of the JSONL file)."""
    capture = _capture(7)
    tracer, _ = _sdk_tracer()
    sender = _Requests()
    chosen = export.Plan(True, "test", (sender,), delay_s=60.0, batch=20, outbox_spans=10_000)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    queue = deque(_replay(capture, index=i, replay_id=0x9000 + i) for i in range(1, 101))
    assert sink.drain(queue, [], 100, deque(), 1.0, 2.0)
    assert not queue
    sink.flush(__import__("time").monotonic() + 10)
    assert sum(sender.counts) == 100 * 8
    assert max(sender.counts) <= 20 + 7 and len(sender.counts) >= 800 // 27
    # the encoder stops at the batch and says how many records it took
    encoder = export.make_encoder(tracer, "json", CallRecord, _EMPTY)
    queue = deque(_replay(capture, index=i, replay_id=0x100 + i) for i in range(1, 11))
    assert encoder.drain(queue, [], 10, deque(), 1.0, 2.0, 20) == 3
    assert encoder.taken == 3 and encoder.count == 24 and len(queue) == 7
    sink.shutdown(1)


def test_a_busy_sender_is_waited_for_not_dropped_on() -> None:
    """Records are held back for a live sender, not encoded for the outbox to drop: the
    drain stops without waiting (the worker calls it inside its GPU-query section) and
    the worker waits for room between passes, as ``Pipeline._run`` does."""
    import time

    from otel_flashinfer import health

    capture = _capture(3)
    tracer, _ = _sdk_tracer()
    sender = _Requests(seconds=0.004)  # busy, well under export.STALLED_S
    chosen = export.Plan(True, "test", (sender,), delay_s=0.0, batch=8, outbox_spans=16)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    before = health.counters().get("spans_dropped", 0)
    queue = deque(_replay(capture, index=i, replay_id=0x9000 + i) for i in range(1, 61))
    worst, held = 0.0, 0
    while queue:
        t0 = time.perf_counter()
        done = sink.drain(queue, [], len(queue), deque(), 1.0, 2.0, hold=True)
        worst = max(worst, time.perf_counter() - t0)
        if not done:
            held += 1
            assert sink.wait_for_room(5)
    assert held > 0 and worst < 0.003  # stopped, never waited
    assert sink.flush(time.monotonic() + 10)
    assert health.counters().get("spans_dropped", 0) == before
    assert sum(sender.counts) == 60 * 4
    sink.shutdown(1)


def test_a_stalled_sender_is_not_waited_for() -> None:
    """A send out for longer than STALLED_S is a receiver down: records are no longer
    held back for it (the outbox drops its oldest, counted, and what they hold on the
    GPU is given back as they are encoded)."""
    import threading
    import time

    capture = _capture(3)
    tracer, _ = _sdk_tracer()
    gate = threading.Event()

    class Hung(_Requests):
        def send(self, payload: bytes, count: int) -> bool:
            gate.wait(30)
            return super().send(payload, count)

    chosen = export.Plan(True, "test", (Hung(),), delay_s=0.0, batch=8, outbox_spans=16)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    queue = deque(_replay(capture, index=i, replay_id=0x9000 + i) for i in range(1, 41))
    assert not sink.drain(queue, [], len(queue), deque(), 1.0, 2.0, hold=True)
    time.sleep(export.STALLED_S + 0.1)
    assert sink.has_room() and sink.wait_for_room(0.0)
    assert sink.drain(queue, [], len(queue), deque(), 1.0, 2.0, hold=True) and not queue
    gate.set()
    sink.shutdown(5)


def test_replays_waiting_for_statistics_do_not_make_eager_drains_look_like_replays(
        tmp_path: Path, events: FakeEvents) -> None:  # noqa: F811
    """``auto`` charges a replay span the worker's CPU per span of drains that were
    mostly replays'.  Replay spans used to be counted when the replay was submitted; a
    level-5 replay whose statistics were not in yet then made the drain that handed on
    only costly eager spans count as a replay drain.  They count where written."""
    from test_native_export import _Costly, _file_provider

    from otel_flashinfer.pipeline import Pipeline

    rows, metas = _rows()
    ring = _ring()
    capture = _capture(3)
    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, wait_timeout_s=60.0)
    native = pipeline._native  # noqa: SLF001
    try:
        for round_ in range(4):
            event = 600 + round_
            events.status[event] = 1  # this replay's statistics are still on the GPU
            pipeline.submit(_replay(capture, index=round_ + 1, replay_id=0x900 + round_,
                                    child_pending=[[_pending(ring, None, rows, metas, 2,
                                                             event=event)], None, None]))
            for i in range(5):
                r = CallRecord.for_call("eager", 0x55, 0x200 + 10 * round_ + i, None, BASE)
                r.start_ns, r.end_ns = 1, 2
                r.add_pending(_Costly())
                pipeline.submit(r)
            pipeline.wake()
            end = time.monotonic() + 10
            while native.encoded() < 5 * (round_ + 1) and time.monotonic() < end:
                time.sleep(0.005)
            assert native.encoded() == 5 * (round_ + 1)  # the eager ones; replays wait
        assert pipeline._replay_cost.value == 0.0  # noqa: SLF001 - no replay drain yet
        for round_ in range(4):
            events.status[600 + round_] = 0
        assert pipeline.flush(10)
    finally:
        pipeline.shutdown(5)
    names = sorted(s["name"] for s in _spans_in(tmp_path / "t.jsonl"))
    assert names == sorted(["eager"] * 20 + ["cuda_graph.replay", "call0", "call1",
                                             "call2"] * 4)


_NOT_IN_YET = textwrap.dedent("""
    import ctypes, sys
    from collections import deque
    from opentelemetry.sdk.trace import TracerProvider
    from otel_flashinfer import _otlp, export
    from otel_flashinfer.pipeline import _EMPTY, CallRecord

    # The event pool's API, stood in: every GPU time is still pending.  No statistics
    # API is registered in this process (a level-3 process has none).
    RES = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    REL = ctypes.CFUNCTYPE(None, ctypes.c_int64)

    class Api(ctypes.Structure):
        _fields_ = [("version", ctypes.c_int), ("record", ctypes.c_void_p),
                    ("release", REL), ("is_cuda", ctypes.c_void_p),
                    ("snapshot", ctypes.c_void_p), ("resolve", RES)]

    api = Api(2, None, REL(lambda slot: None), None, None, RES(lambda a, b: -(1 << 40)))
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    _otlp.register_api(new(ctypes.addressof(api), b"otel_flashinfer.hotpath_api", None))
    tracer = TracerProvider().get_tracer("t")
    encoder = export.make_encoder(tracer, "json", CallRecord, _EMPTY)
    record = CallRecord.for_call("run", 5, 6, None, {"flashinfer.api": "run"})
    record.end_ns = 10
    record.gpu = 3 << 16 | 4
    slow, later = [], deque()
    done = encoder.drain(deque([record]), slow, 1, later, 1.0, 2.0)
    print(done, len(slow), len(later))
""")


def test_a_gpu_time_not_in_yet_waits_in_c_without_statistics() -> None:
    """``drain`` could put a record back on ``later`` only once a statistics API had
    been registered: in a level-3 process (GPU times, no statistics) every record whose
    GPU time was not in yet went to Python, and each traced replay was expanded there,
    child by child (347 against 28 us of the worker a 64-call replay, H100)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", _NOT_IN_YET], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "1"]  # none encoded, none to Python, 1 waits
