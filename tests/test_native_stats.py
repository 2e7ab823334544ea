"""Level-5 statistics resolved by the span encoder in C (csrc/otlp_encoder.c,
``resolve_stats``) rather than by the Python worker.

The encoder polls a ring slot's CUDA event through the statistics extension's API
(csrc/stats_api.h) and encodes the rows from the slot.  Here that API is a ctypes
stand-in whose answers the tests choose, over a real ``SlotRing`` in host memory with
rows the CPU reference (``torch_ops``) computed: the C path must produce exactly the
span the Python path (``StatsPending.apply_raw`` then ``add``) produces, hand the slot
back, wait for rows not in yet, and leave everything it does not handle to Python.
The device tests run the same path over the real extension.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from test_native_export import BASE, _file_provider, _same_attrs, _sdk_tracer, _spans_in

from otel_flashinfer import cuda_errors, export, health
from otel_flashinfer.otlp_json import json_to_request
from otel_flashinfer.pipeline import _EMPTY, CallRecord, Pipeline
from otel_flashinfer.stats.decode import SCOPE_FULL, SCOPE_PAGES, RowMeta, decode_buffer
from otel_flashinfer.stats.graph_rows import GraphStatsPending
from otel_flashinfer.stats.pending import StatsPending
from otel_flashinfer.stats.ring import SlotRing
from otel_flashinfer.stats.torch_ops import tensor_row

_otlp = pytest.importorskip("otel_flashinfer._otlp", reason="native encoder not built")

_QUERY = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
_NAME = b"otel_flashinfer.stats_api"


class _Api(ctypes.Structure):
    _fields_ = [("version", ctypes.c_int), ("event_query", _QUERY)]


class FakeEvents:
    """The statistics extension's event query, answering what the test says per event
    (0 done, 1 pending, else a CUDA error code) and counting the queries."""

    def __init__(self) -> None:
        self.status: dict[int, Any] = {}
        self.queries = 0
        self._cb = _QUERY(self._query)
        self._api = _Api(1, self._cb)
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.capsule = new(ctypes.addressof(self._api), _NAME, None)

    def _query(self, event: int) -> int:
        self.queries += 1
        answer = self.status.get(event, 0)
        if isinstance(answer, list):  # a sequence of answers, the last one repeating
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return answer


@pytest.fixture
def events():
    fake = FakeEvents()
    _otlp.register_stats(fake.capsule, StatsPending, GraphStatsPending)
    try:
        yield fake
    finally:
        _otlp.register_stats(None)
        from otel_flashinfer.stats import kernel
        from otel_flashinfer.stats.graph_rows import lend_encoder

        module = kernel.get() if kernel._done.is_set() else None  # noqa: SLF001
        if module is not None:  # a device session: the real API again
            lend_encoder(module)


def _rows() -> tuple[torch.Tensor, list[Any]]:
    x = torch.randn(300, dtype=torch.float64)
    x[3], x[9] = float("nan"), -float("inf")
    rows = torch.stack([tensor_row(x), tensor_row(torch.arange(-5, 60, dtype=torch.int64)),
                        tensor_row(torch.full((4,), 2.5)), tensor_row(torch.ones(7))])
    metas = [RowMeta("q", SCOPE_FULL, 300), ("kv", SCOPE_PAGES, 0), ("out", SCOPE_FULL, 4),
             RowMeta("lse", SCOPE_FULL, 7)]
    return rows, metas


def _ring() -> SlotRing:
    return SlotRing(torch.device("cpu"), slots=4, rows=8, pin_memory=False)


def _pending(ring: SlotRing, slot: int | None, rows: torch.Tensor, metas: list[Any], nin: int,
             event: int, gpu_time: bool = False, stamps: tuple[int, int] = (0, 0),
             note: str = "") -> StatsPending:
    """A call's inputs (``nin`` rows) and outputs in ``slot`` (None: the next free one),
    as the hooks leave them."""
    taken = ring.acquire()
    assert taken is not None and taken == (taken if slot is None else slot)
    slot = taken
    ring.host[slot].zero_()
    ring.host[slot, : len(rows)] = rows
    if gpu_time:
        ring.host[slot, 0, 7], ring.host[slot, nin, 7] = stamps
    ring._native[slot] = event  # noqa: SLF001 - the slot's CUDA event, as native_event sets
    ring._kind[slot] = "native"  # noqa: SLF001
    out = metas[nin:] or None
    return StatsPending(ring, slot, metas[:nin], 1_000, note, out, 2_000 if out else 0,
                        gpu_time=gpu_time)


def _record(span_id: int, pending: Any) -> CallRecord:
    r = CallRecord.for_call("BatchDecodeWithPagedKVCacheWrapper.run", 0xABC, span_id, None,
                            BASE)
    r.start_ns, r.end_ns, r.instance = 900, 3_000, 77
    r.add_pending(pending)
    return r


def _span(payload: bytes, fmt: str) -> Any:
    request = (ExportTraceServiceRequest.FromString(payload) if fmt == "protobuf"
               else json_to_request(payload.decode()))
    (span,) = request.resource_spans[0].scope_spans[0].spans
    return span


def _python_path(fmt: str, record: CallRecord) -> bytes:
    """What the worker's Python path makes of the same record (the reference)."""
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    (pending,) = record.pending
    pending._status = 0  # noqa: SLF001 - its event completed (ready() without a device)
    record.own()
    pending.apply_raw(record)
    record.pending = _EMPTY
    encoder.add(record)
    return encoder.take()


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
@pytest.mark.parametrize("nin,gpu_time", [(2, False), (2, True), (4, False), (0, False)])
def test_resolved_in_c_is_the_span_python_makes(events: FakeEvents, fmt: str, nin: int,
                                                gpu_time: bool) -> None:
    rows, metas = _rows()
    ring = _ring()
    ours = _pending(ring, 0, rows, metas, nin, event=11, gpu_time=gpu_time,
                    stamps=(5_000, 5_750))
    ref = _pending(ring, 1, rows, metas, nin, event=12, gpu_time=gpu_time,
                   stamps=(5_000, 5_750))
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    record = _record(5, ours)
    queue, slow, later = deque([record]), [], deque()
    assert encoder.drain(queue, slow, 10, later, 1.0, 2.0) == 1
    assert not slow and not later and not queue
    got = _span(encoder.take(), fmt)
    want = _span(_python_path(fmt, _record(5, ref)), fmt)
    assert got == want  # names, ids, times, typed attributes, every event, in order
    assert len(got.events) == len(metas)
    attrs = {kv.key: kv.value for kv in got.attributes}
    assert attrs["flashinfer.nonfinite"].bool_value is True  # the NaN in q
    if gpu_time:
        assert attrs["flashinfer.gpu.time_ns"].int_value == 750
    stats = [{kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in e.attributes}
             for e in got.events]
    expected = decode_buffer(rows.numpy().tobytes(), metas)
    assert all(_same_attrs(g, e) for g, e in zip(stats, expected, strict=True))
    assert [e.time_unix_nano for e in got.events] == [1_000] * nin + [2_000] * (4 - nin)
    # the slot is handed back once the span is encoded; the record lets go of it all
    assert ours.slot == -1 and record.pending is _EMPTY
    assert 0 in ring._free  # noqa: SLF001
    assert encoder.stats()["stats_resolved"] == 1
    assert events.queries == 1


def test_rows_not_in_yet_wait_on_later_until_their_deadline(events: FakeEvents) -> None:
    rows, metas = _rows()
    ring = _ring()
    pending = _pending(ring, 0, rows, metas, 2, event=21)
    events.status[21] = 1
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    record = _record(6, pending)
    queue, slow, later = deque([record]), [], deque()
    assert encoder.drain(queue, slow, 10, later, 1.0, 5.0) == 0
    assert list(later) == [record] and not slow and record.deadline == 5.0
    assert pending.slot == 0 and 0 not in ring._free  # noqa: SLF001 - still the GPU's
    # next pass over the waiting records themselves: still not in, still before its time
    assert encoder.drain(later, slow, len(later), later, 4.0, 9.0) == 0
    assert list(later) == [record] and record.deadline == 5.0  # the first deadline holds
    # past it: to Python, which gives the statistics up as timed out
    assert encoder.drain(later, slow, len(later), later, 5.0, 9.0) == 0
    assert slow == [record] and not later and pending.slot == 0
    # and in once the event completes
    events.status[21] = 0
    slow.clear()
    assert encoder.drain(deque([record]), slow, 1, later, 5.5, 9.0) == 1
    assert pending.slot == -1 and not slow
    assert encoder.take() is not None


def test_what_c_does_not_handle_goes_to_python(events: FakeEvents) -> None:
    """A CUDA error, a note to add, a missing stamp, a torch event, a second pending:
    each goes to ``slow`` with its slot still held, for the Python path."""
    rows, metas = _rows()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    cases = []
    ring = _ring()
    error = _pending(ring, 0, rows, metas, 2, event=31)
    events.status[31] = 700  # cudaErrorIllegalAddress
    cases.append(_record(1, error))
    cases.append(_record(2, _pending(ring, 1, rows, metas, 2, event=32,
                                     note="too_many_tensors:3")))
    cases.append(_record(3, _pending(ring, 2, rows, metas, 2, event=33, gpu_time=True,
                                     stamps=(0, 0))))
    torch_event = _pending(ring, 3, rows, metas, 2, event=34)
    ring._kind[3] = "torch"  # noqa: SLF001
    cases.append(_record(4, torch_event))
    ring2 = _ring()
    two = _record(5, _pending(ring2, 0, rows, metas, 2, event=35))
    two.add_pending(_pending(ring2, 1, rows, metas, 2, event=36))
    cases.append(two)
    slow: list[Any] = []
    assert encoder.drain(deque(cases), slow, 10, deque(), 1.0, 2.0) == 0
    assert slow == cases
    assert encoder.take() is None and encoder.stats()["stats_resolved"] == 0
    assert all(p.slot >= 0 for r in cases for p in r.pending)
    assert error._status == 700  # noqa: SLF001 - what ready() would have stored
    # the Python path then names the error on the span (the process's first: sticky)
    cases[0].own()
    cuda_errors.reset()  # what an earlier test's error left behind
    try:
        error.apply_raw(cases[0])
    finally:
        cuda_errors.reset()
    assert cases[0].attributes["flashinfer.cuda_error"].startswith("cudaError")
    assert cases[0].attributes["flashinfer.stats.dropped"] == "cuda_error"
    assert error.slot == -1


def test_without_the_api_python_resolves_as_before(events: FakeEvents) -> None:
    _otlp.register_stats(None)
    rows, metas = _rows()
    ring = _ring()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    record = _record(7, _pending(ring, 0, rows, metas, 2, event=41))
    slow: list[Any] = []
    assert encoder.drain(deque([record]), slow, 10, deque(), 1.0, 2.0) == 0
    assert slow == [record] and events.queries == 0


def test_the_pipeline_resolves_statistics_in_c_into_the_file(events: FakeEvents,
                                                             tmp_path: Path) -> None:
    """End to end through the worker: rows that come in after a few polls are encoded
    into the default file with their events, none through Python's resolver."""
    path = tmp_path / "traces.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    rows, metas = _rows()
    ring = SlotRing(torch.device("cpu"), slots=8, rows=8, pin_memory=False)
    before = health.counters()
    records = []
    for i in range(6):
        events.status[100 + i] = [1, 1, 0]  # in on the third poll
        records.append(_record(10 + i, _pending(ring, i, rows, metas, 2, event=100 + i)))
    for r in records:
        pipeline.submit(r)
    assert pipeline.flush(10)
    spans = _spans_in(path)
    assert sorted(int(s["spanId"], 16) for s in spans) == list(range(10, 16))
    for span in spans:
        assert [e["name"] for e in span["events"]] == ["flashinfer.tensor_stats"] * 4
    assert len(ring._free) == 8  # noqa: SLF001 - every slot back
    (encoder,) = pipeline._native.encoders.values()  # noqa: SLF001
    assert encoder.stats()["stats_resolved"] == 6
    after = health.counters()
    assert after.get("stats_dropped", 0) == before.get("stats_dropped", 0)
    assert events.queries >= 18
    pipeline.shutdown(5)


# ---- GPU times (the event pool's API, csrc/hotpath_api.h) waiting in C too ------------

_RESOLVE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
_RELEASE = ctypes.CFUNCTYPE(None, ctypes.c_int64)
_NOT_READY = -(1 << 40)


class _PoolApi(ctypes.Structure):
    _fields_ = [("version", ctypes.c_int), ("record", ctypes.c_void_p),
                ("release", _RELEASE), ("is_cuda", ctypes.c_void_p),
                ("snapshot", ctypes.c_void_p), ("resolve", _RESOLVE)]


@contextlib.contextmanager
def stand_in_pool(resolve: Callable[[int, int], int],
                  release: Callable[[int], None] = lambda slot: None) -> Iterator[None]:
    """The event pool's C API stood in for the encoder while the block runs:
    ``resolve(start, end)`` answers an event pair's time (``_NOT_READY``: not in yet),
    ``release(slot)`` takes each event back.  The real pool again after, on a device."""
    api = _PoolApi(2, None, _RELEASE(release), None, None, _RESOLVE(resolve))
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    _otlp.register_api(new(ctypes.addressof(api), b"otel_flashinfer.hotpath_api", None))
    try:
        yield
    finally:
        _otlp.register_api(None)
        from otel_flashinfer import gpu_timing

        ext = gpu_timing._ext  # noqa: SLF001 - a device session: the real pool again
        if ext is not None and hasattr(ext, "hotpath_api"):
            _otlp.register_api(ext.hotpath_api)


def answering_pool(ns: int) -> contextlib.AbstractContextManager[None]:
    """``stand_in_pool`` where every event pair resolves to ``ns``."""
    return stand_in_pool(lambda start, end: ns)


def test_a_gpu_time_not_in_yet_waits_in_c_then_goes_out() -> None:
    """A graph replay's span carries its packed event pair (``CallRecord.gpu``): while
    the end event is pending the encoder puts it back on ``later``, as for statistics,
    and encodes it once the time is in, handing both events back."""
    answers = [_NOT_READY, 750]
    released: list[int] = []
    with stand_in_pool(lambda start, end: answers.pop(0) if len(answers) > 1 else answers[0],
                       released.append):
        tracer, _ = _sdk_tracer()
        encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
        record = CallRecord("cuda_graph.replay", 0xABC, 9, None, 100, 200,
                            {"flashinfer.cuda_graph.id": 1})
        record.gpu = 3 << 16 | 4
        slow: list[Any] = []
        later: deque[Any] = deque()
        assert encoder.drain(deque([record]), slow, 1, later, 1.0, 2.0) == 0
        assert list(later) == [record] and not slow and record.deadline == 2.0
        assert encoder.drain(later, slow, 1, later, 1.5, 3.0) == 1
        assert not later and not slow and record.gpu is None and released == [3, 4]
        span = _span(encoder.take(), "protobuf")
        attrs = {kv.key: kv.value for kv in span.attributes}
        assert attrs["flashinfer.gpu.time_ns"].int_value == 750
        assert encoder.stats()["gpu_resolved"] == 1
