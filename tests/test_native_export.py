"""The native span encoder (csrc/otlp_encoder.c) and the path it serves (export.py).

Byte-level equivalence: for the same records the native request must be exactly what
the SDK's own encoder makes of the SDK spans our SDK path builds (protobuf), and the
OTLP/JSON line must parse back to that same request.  Then: which provider setups take
the fast path, the argument-block cache, and the pipeline around it end to end into
a real file and through real OTLP exporters.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState
from run_delay import excused, reader

from otel_flashinfer import describe, export, health
from otel_flashinfer.otlp_json import JsonLinesSpanExporter, json_to_request
from otel_flashinfer.pipeline import _EMPTY, CallRecord, DirectSpans, Pipeline
from otel_flashinfer.spans import ArgPlan, Describer

_otlp = pytest.importorskip("otel_flashinfer._otlp", reason="native encoder not built")


def _decode(q, k, v, scale=0.125, layout="NHD", *more):  # noqa: ANN001, ANN002, ANN202
    """A traced function's signature: positional, defaults and varargs."""


def _sdk_tracer(resource: Resource | None = None, limits: SpanLimits | None = None
                ) -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "t"}),
                              span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("otel_flashinfer", "9.9", schema_url="https://s/1"), exporter


Q = torch.zeros(8, 32, 128, dtype=torch.float16)
BASE = {"flashinfer.api": "BatchDecodeWithPagedKVCacheWrapper.run", "flashinfer.level": 3}
DESCRIBER = Describer(ArgPlan(_decode, False))


def _records() -> list[CallRecord]:
    """One of each kind of record the hot path and the workers make."""
    parent = SpanContext(0xABC, 0x123, False, TraceFlags(1))
    remote = SpanContext(0xDEF, 0x456, True, TraceFlags(1),
                         TraceState([("vendor", "x"), ("rojo", "00f067aa0ba902b7")]))
    out = []

    def record(name: str, parent: SpanContext | None, **fields: Any) -> CallRecord:
        r = CallRecord.for_call(name, 0x1234567890ABCDEF1234567890ABCDEF + len(out),
                                0xFEED + len(out), parent, fields.pop("base", BASE))
        r.start_ns, r.end_ns = 1_700_000_000_000_000_000 + len(out), 1_700_000_000_000_050_000
        for key, value in fields.items():
            setattr(r, key, value)
        out.append(r)
        return r

    record("level1", parent, base={"flashinfer.api": "rmsnorm", "flashinfer.level": 1})
    record("root", None, instance=140_000_000)
    record("level3", parent, instance=140_000_000, describe=DESCRIBER,
           data=[describe.snapshot(Q), describe.snapshot(Q[:, :2]),
                 describe.snapshot([Q, 3, "x", None])],
           kw={"scale": 0.5, "window": -1, "flag": True, "big": 2**70, "items": {"a": 1}},
           result=describe.snapshot((Q, Q.float())))
    record("remote-parent", remote, plan_link=SpanContext(0x5, 0x6, False, TraceFlags(1)),
           links=[Link(SpanContext(0x7, 0x8, True, TraceFlags(1)), {"why": "plan", "n": 2})])
    record("error", parent, describe=DESCRIBER, data=[describe.snapshot(Q)], result=object(),
           error=("ValueError", 'bad "page"\ntable ü', "Traceback (most recent call last)"))
    record("stats", parent, events=[
        ("flashinfer.tensor_stats", {"flashinfer.tensor": "q", "numel": 4096, "min": -1.5,
                                     "max": float("inf"), "mean": 0.25, "nan_count": 3,
                                     "inf_count": 1, "scope": "full"}, 1_700_000_000_000_060_000),
        ("flashinfer.tensor_stats", {"flashinfer.tensor": "", "numel": 0}, 7)])
    owned = record("owned", parent, instance=99)
    owned.own()
    owned.attributes["flashinfer.cuda_error"] = "cudaErrorIllegalAddress"
    owned.attributes["flashinfer.gpu.time_unavailable"] = "cuda_error"
    owned.attributes["flashinfer.shape"] = (8, 0, -3)
    owned.attributes["flashinfer.empty"] = ()
    owned.attributes["flashinfer.ratio"] = [0.5, 1e-300, -0.0]
    out[4].result = DESCRIBER.plan and None  # an error leaves no result
    return out


def _sdk_request(tracer: Any, exporter: InMemorySpanExporter, records: list[CallRecord],
                 extra: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    """What the SDK path (DirectSpans, as the pipeline runs it) exports."""
    exporter.clear()
    direct = DirectSpans.for_tracer(tracer)
    assert direct is not None
    for r in records:
        r.own()
        if r.describe is not None:
            r.describe(r)
        if extra:
            r.attributes.update(extra)
        direct.export(r)
    return encode_spans(exporter.get_finished_spans())


def _native(tracer: Any, fmt: str, records: list[CallRecord],
            extra: dict[str, Any] | None = None) -> bytes:
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    if extra:
        encoder.set_extra(extra)
    for r in records:
        encoder.add(r)
    assert encoder.count == len(records)
    payload = encoder.take()
    assert encoder.take() is None and encoder.count == 0
    return payload


@pytest.mark.parametrize("extra", [None, {"process.pid": 4242}])
def test_protobuf_is_byte_identical_to_the_sdk_encoder(extra: dict[str, Any] | None) -> None:
    tracer, exporter = _sdk_tracer()
    payload = _native(tracer, "protobuf", _records(), extra)
    sdk = _sdk_request(tracer, exporter, _records(), extra)
    assert payload == sdk.SerializeToString()
    spans = sdk.resource_spans[0].scope_spans[0].spans
    assert [s.name for s in spans][:3] == ["level1", "root", "level3"]  # the test covers them


def test_json_strings_escape_exactly_what_json_needs() -> None:
    """Quotes, backslashes and control characters are escaped, plain runs (and UTF-8)
    copied as they are: the strings read back equal, whatever mix they hold."""
    tracer, _ = _sdk_tracer()
    values = ["plain", "", 'a"b\\c', "\n\t\r\b\f\x01\x1f end", "\"\\", "naïve ✓ 日本",
              "x" * 300 + "\x00" + "y"]
    r = CallRecord.for_call('name "quoted"\n', 1, 2, None,
                            {f"k{i}": v for i, v in enumerate(values)} | {'key"\\': "v"})
    r.start_ns, r.end_ns = 10, 20
    encoder = export.make_encoder(tracer, "json", CallRecord, _EMPTY)
    encoder.add(r)
    span = json.loads(encoder.take())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    attrs = {a["key"]: a["value"]["stringValue"] for a in span["attributes"]
             if "stringValue" in a["value"]}
    assert span["name"] == 'name "quoted"\n'
    assert [attrs[f"k{i}"] for i in range(len(values))] == values
    assert attrs['key"\\'] == "v"


def test_json_line_parses_to_the_sdk_request() -> None:
    tracer, exporter = _sdk_tracer()
    line = _native(tracer, "json", _records())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    data = json.loads(line)
    span = data["resourceSpans"][0]["scopeSpans"][0]["spans"][2]
    assert span["traceId"] == f"{0x1234567890ABCDEF1234567890ABCDEF + 2:032x}"  # hex ids
    assert span["parentSpanId"] == f"{0x123:016x}"
    sdk = _sdk_request(tracer, exporter, _records())
    assert json_to_request(line.decode()) == sdk


def test_attribute_limits_match_the_sdk_span_limits() -> None:
    tracer, _exporter = _sdk_tracer(limits=SpanLimits(max_span_attributes=4, max_events=1,
                                                     max_links=1))
    records = _records()
    payload = _native(tracer, "protobuf", records)
    request = ExportTraceServiceRequest.FromString(payload)
    spans = {s.name: s for s in request.resource_spans[0].scope_spans[0].spans}
    assert len(spans["level3"].attributes) == 4
    assert spans["level3"].dropped_attributes_count > 0
    assert len(spans["stats"].events) == 1 and spans["stats"].dropped_events_count == 1
    assert len(spans["remote-parent"].links) == 1
    assert spans["remote-parent"].dropped_links_count == 1


def test_argument_block_is_reused_only_while_snapshots_are_the_same() -> None:
    """The cache keys on the snapshots' exact types: 1, 1.0 and True are equal in
    Python but are different attributes."""
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    seen = []
    for value in (1, 1, 1.0, True, 2, 1):
        r = CallRecord.for_call("f", 1, 2, None, BASE)
        r.describe, r.data, r.kw = DESCRIBER, [describe.snapshot(Q)], {"scale": value}
        encoder.add(r)
        span = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
        attrs = {a.key: a.value for a in span.scope_spans[0].spans[0].attributes}
        value = attrs["flashinfer.arg.scale"]
        kind = value.WhichOneof("value")
        seen.append((kind, getattr(value, kind)))
    assert seen == [("int_value", 1), ("int_value", 1), ("double_value", 1.0),
                    ("bool_value", True), ("int_value", 2), ("int_value", 1)]
    assert [type(v) for _, v in seen] == [int, int, float, bool, int, int]


def test_values_the_encoder_cannot_carry_are_skipped_and_counted() -> None:
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    r = CallRecord.for_call("f", 1, 2, None, {"ok": 1, "bad": object(), "huge": 2**80})
    encoder.add(r)
    span = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
    assert [a.key for a in span.scope_spans[0].spans[0].attributes] == ["ok"]
    assert encoder.stats()["attribute_errors"] == 2


def test_a_broken_record_is_refused_whole() -> None:
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    good = CallRecord.for_call("good", 1, 2, None, BASE)
    bad = CallRecord.for_call("bad", "not an id", 2, None, BASE)
    encoder.add(good)
    with pytest.raises(TypeError):
        encoder.add(bad)
    spans = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
    assert [s.name for s in spans.scope_spans[0].spans] == ["good"]


# ---- which setups take the fast path --------------------------------------------------


class _Custom(SpanExporter):
    def export(self, spans):  # noqa: ANN001, ANN201
        return None


def _plan(processors: list[Any], sampler: Any = None) -> export.Plan:
    provider = TracerProvider(sampler=sampler)
    for p in processors:
        provider.add_span_processor(p)
    return export.plan(provider, provider.get_tracer("otel_flashinfer"))


@pytest.fixture
def no_bsp_env(monkeypatch) -> Any:
    """The plan tests read OTEL_BSP_*: none from the shell running them (conftest's
    ``_no_shell_bsp_settings`` removed them), and they set their own."""
    return monkeypatch


def test_fast_path_serves_the_setups_it_reproduces(tmp_path: Path, no_bsp_env: Any) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    file = JsonLinesSpanExporter(str(tmp_path / "t.jsonl"))
    chosen = _plan([BatchSpanProcessor(file)])
    assert chosen.fast and [s.fmt for s in chosen.senders] == ["json"]
    # The SDK's defaults (512 spans, a queue of 2,048) are ours to choose: bigger batches.
    assert (chosen.delay_s, chosen.batch, chosen.outbox_spans) == (5.0, 1024, 2048)
    chosen = _plan([SimpleSpanProcessor(HttpExporter(endpoint="http://127.0.0.1:9/v1/traces")),
                    BatchSpanProcessor(GrpcExporter(endpoint="127.0.0.1:9", insecure=True),
                                       max_export_batch_size=64)])
    assert chosen.fast and [type(s).__name__ for s in chosen.senders] == [
        "HttpSender", "GrpcSender"]
    assert chosen.delay_s == 0.0 and chosen.batch == 64
    for sampler in (sampling.ALWAYS_ON, sampling.ParentBased(sampling.ALWAYS_OFF),
                    sampling.ParentBased(sampling.TraceIdRatioBased(0.25))):
        assert _plan([SimpleSpanProcessor(file)], sampler).fast
    # The SDK's own subclasses, as OTEL_TRACES_SAMPLER makes them.
    for sampler in (sampling.ParentBasedTraceIdRatio(0.01),
                    sampling._ParentBasedAlwaysOn(None),  # noqa: SLF001
                    sampling._ParentBasedAlwaysOff(None)):  # noqa: SLF001
        assert _plan([SimpleSpanProcessor(file)], sampler).fast, sampler
    # The processor's settings above the SDK's defaults are kept, not capped by them.
    chosen = _plan([BatchSpanProcessor(file, max_queue_size=8192, max_export_batch_size=2000,
                                       schedule_delay_millis=30_000)])
    assert chosen.fast and (chosen.delay_s, chosen.batch, chosen.outbox_spans) == \
        (30.0, 2000, 8192)
    chosen = _plan([BatchSpanProcessor(file, schedule_delay_millis=30_000),
                    BatchSpanProcessor(file, schedule_delay_millis=700,
                                       max_export_batch_size=100)])
    assert (chosen.delay_s, chosen.batch) == (0.7, 100)  # the strictest of the two


def test_batch_and_queue_sizes_someone_chose_are_kept(tmp_path: Path, no_bsp_env: Any) -> None:
    """A batch or queue size passed to the processor or set in OTEL_BSP_* is kept, even
    where it equals the SDK's default; the SDK's default alone is ours to choose.  Where
    nobody chose the queue, it keeps two requests whatever their spans."""
    monkeypatch = no_bsp_env
    file = JsonLinesSpanExporter(str(tmp_path / "t.jsonl"))
    chosen = _plan([BatchSpanProcessor(file, max_export_batch_size=512)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (1024, 2048, 2)
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")
    chosen = _plan([BatchSpanProcessor(file)])
    assert (chosen.batch, chosen.outbox_spans) == (512, 2048)
    monkeypatch.delenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1536")
    chosen = _plan([BatchSpanProcessor(file)])
    assert (chosen.batch, chosen.outbox_spans) == (768, 1536)  # half the queue
    monkeypatch.delenv("OTEL_BSP_MAX_QUEUE_SIZE")
    chosen = _plan([BatchSpanProcessor(file, max_queue_size=1000)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (512, 1000, 2)
    # The SDK's default queue, chosen: our batch fills it with two, which stay.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2048")
    chosen = _plan([BatchSpanProcessor(file)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (1024, 2048, 2)
    monkeypatch.delenv("OTEL_BSP_MAX_QUEUE_SIZE")
    # A queue chosen on one processor bounds the batch it left to us, beside another's
    # chosen batch.
    chosen = _plan([BatchSpanProcessor(file, max_queue_size=1000),
                    BatchSpanProcessor(file, max_export_batch_size=800, max_queue_size=4000)])
    assert (chosen.batch, chosen.outbox_spans) == (512, 1000)
    # A batch chosen next to a queue is the user's, whatever the queue.
    chosen = _plan([BatchSpanProcessor(file, max_export_batch_size=2000, max_queue_size=2100)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (2000, 2100, 1)
    chosen = _plan([BatchSpanProcessor(file, max_export_batch_size=2000)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (2000, 4000, 2)
    chosen = _plan([BatchSpanProcessor(file, max_export_batch_size=600, max_queue_size=1000)])
    assert (chosen.batch, chosen.outbox_spans, chosen.outbox_requests) == (600, 1000, 1)
    chosen = _plan([BatchSpanProcessor(file, max_queue_size=65536)])
    assert (chosen.batch, chosen.outbox_spans) == (1024, 65536)
    # One processor's choice, the other's default: the choice.
    chosen = _plan([BatchSpanProcessor(file, max_export_batch_size=3000, max_queue_size=9000),
                    BatchSpanProcessor(file)])
    assert (chosen.batch, chosen.outbox_spans) == (3000, 9000)


def test_requests_are_cut_under_an_http_exporters_max_request_size(no_bsp_env: Any) -> None:
    """An OTLP/HTTP exporter refuses a request over its ``max_request_size``: batches
    are cut at half of it (the record that crosses the bound still goes in), so bigger
    batches never make every request too large to send."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    http = HttpExporter(endpoint="http://127.0.0.1:9/v1/traces", max_request_size=1_000_000)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(http))
    tracer = provider.get_tracer("otel_flashinfer")
    chosen = export.plan(provider, tracer)
    assert chosen.fast
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    try:
        assert sink.batch_bytes == {"protobuf": 500_000}
    finally:
        sink.shutdown(1)
    plain = HttpExporter(endpoint="http://127.0.0.1:9/v1/traces")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(plain))
    tracer = provider.get_tracer("otel_flashinfer")
    sink = export.NativeExport(tracer, export.plan(provider, tracer), CallRecord, _EMPTY)
    try:
        assert sink.batch_bytes == {"protobuf": min(export.REQUEST_BYTES,
                                                    export.COALESCE_BYTES // 2)}
    finally:
        sink.shutdown(1)


def test_the_outbox_keeps_two_requests_past_its_spans_where_nobody_chose_it() -> None:
    """A replay's children take a batch past its size: with two batches' worth of room,
    two such requests must still both wait rather than the older be dropped (where the
    user chose the queue size, its spans bound it as before)."""
    tracer, _ = _sdk_tracer()
    for requests, kept in ((2, [13, 13]), (1, [13])):
        sender = _GatedProtobuf()
        chosen = export.Plan(True, "test", (sender,), delay_s=60.0, batch=10, outbox_spans=20,
                             outbox_requests=requests)
        sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
        sink._coalesce["protobuf"] = (1, 1000, 1024)  # noqa: SLF001 - the sender joins none
        before = health.counters().get("spans_dropped", 0)
        sink._enqueue("protobuf", b"", 13)  # noqa: SLF001 - in the sender's hands
        _until(lambda s=sink: s._busy)  # noqa: SLF001
        sink._enqueue("protobuf", b"", 13)  # noqa: SLF001
        sink._enqueue("protobuf", b"", 13)  # noqa: SLF001
        with sink._cond:  # noqa: SLF001
            assert [c for _, _, c in sink._outbox] == kept  # noqa: SLF001
        assert health.counters().get("spans_dropped", 0) - before == 26 - sum(kept)
        sink._enqueue("protobuf", b"", 13)  # noqa: SLF001 - a third: the oldest goes
        with sink._cond:  # noqa: SLF001
            assert [c for _, _, c in sink._outbox] == kept  # noqa: SLF001
        assert health.counters().get("spans_dropped", 0) - before == 39 - sum(kept)
        sender.open.set()
        sink.shutdown(5)


def test_the_outbox_bounds_are_per_format(tmp_path: Path) -> None:
    """With the file and OTLP both, each format's requests wait in the one outbox: two
    of each stay (a JSON request in flight, then one more cut of both formats dropped
    the older OTLP batch when the bounds were shared)."""
    tracer, _ = _sdk_tracer()
    filer = _GatedFile(JsonLinesSpanExporter(str(tmp_path / "t.jsonl")))
    proto = _GatedProtobuf()
    chosen = export.Plan(True, "test", (filer, proto), delay_s=60.0, batch=10,
                         outbox_spans=20, outbox_requests=2)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    assert (sink.outbox_spans, sink.outbox_requests) == (40, 4)
    before = health.counters().get("spans_dropped", 0)
    sink._enqueue("json", b"", 13)  # noqa: SLF001 - in the sender's hands
    _until(lambda: sink._busy)  # noqa: SLF001
    for fmt in ("protobuf", "json", "protobuf"):
        sink._enqueue(fmt, b"", 13)  # noqa: SLF001
    with sink._cond:  # noqa: SLF001
        assert [(f, c) for f, _, c in sink._outbox] == [  # noqa: SLF001
            ("protobuf", 13), ("json", 13), ("protobuf", 13)]
    assert health.counters().get("spans_dropped", 0) == before
    filer.open.set()
    proto.open.set()
    sink.shutdown(5)


def test_a_batch_is_cut_at_its_bytes_whatever_its_spans() -> None:
    """Spans of kilobytes (statistics events) cut a request at ``batch_bytes`` before
    the batch's count, through ``add`` and through the encoder's drain alike: every
    request stays under gRPC's 4 MiB message limit."""
    from collections import deque

    tracer, _ = _sdk_tracer()
    sender = _GatedProtobuf()  # held shut: the requests cut wait in the outbox, unjoined
    chosen = export.Plan(True, "test", (sender,), delay_s=60.0, batch=1000, outbox_spans=10_000)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    sink._coalesce["protobuf"] = (1, 1000, 1024)  # noqa: SLF001 - the sender joins none
    one = None
    big = {**BASE, "flashinfer.note": "x" * 2000}
    for i in range(1, 41):  # through add
        r = CallRecord.for_call(f"f{i}", i, i, None, big)
        r.start_ns, r.end_ns = i, i + 1
        sink.add(r)
        if one is None:
            one = sink.encoders["protobuf"].size
            sink.batch_bytes["protobuf"] = 10 * one + one // 2  # ten and a half spans
    queue = deque()
    for i in range(41, 81):  # through the encoder's drain
        r = CallRecord.for_call(f"f{i}", i, i, None, big)
        r.start_ns, r.end_ns = i, i + 1
        queue.append(r)
    slow: list[Any] = []
    assert sink.drain(queue, slow, 100)
    assert not slow and not queue
    _until(lambda: sink._busy)  # noqa: SLF001
    with sink._cond:  # noqa: SLF001
        cut = [(len(p), c) for _, p, c in sink._outbox]  # noqa: SLF001
    # 11 more in the sender's hands, 3 open (the delay has not passed).
    assert [c for _, c in cut] == [11] * 6 and sink.encoders["protobuf"].count == 3, cut
    assert all(size <= 12 * one for size, _ in cut)
    sender.open.set()
    assert sink.flush(time.monotonic() + 10)
    sink.shutdown(1)
    assert sum(c for _, c in sender.requests) == 80
    names = [s.name for p, _ in sender.requests
             for rs in ExportTraceServiceRequest.FromString(p).resource_spans
             for ss in rs.scope_spans for s in ss.spans]
    assert names == [f"f{i}" for i in range(1, 81)]


def test_other_setups_keep_the_sdk_path(tmp_path: Path, monkeypatch) -> None:
    file = JsonLinesSpanExporter(str(tmp_path / "t.jsonl"))
    assert _plan([SimpleSpanProcessor(InMemorySpanExporter())]).reason == \
        "exporter:InMemorySpanExporter"
    assert _plan([SimpleSpanProcessor(_Custom())]).reason == "exporter:_Custom"
    assert _plan([]).reason == "no_processors"

    class Mine(SimpleSpanProcessor):
        pass

    assert _plan([Mine(file)]).reason == "processor:Mine"
    assert _plan([SimpleSpanProcessor(file), SimpleSpanProcessor(_Custom())]).reason == \
        "exporter:_Custom"
    for sampler in (sampling.TraceIdRatioBased(0.5), sampling.ALWAYS_OFF,
                    sampling.ParentBased(sampling.ALWAYS_ON,
                                         remote_parent_sampled=sampling.ALWAYS_OFF)):
        assert _plan([SimpleSpanProcessor(file)], sampler).reason == "sampler"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(file))
    assert export.plan(provider, provider.get_tracer("x"), enabled=False).reason == "disabled"
    from otel_flashinfer.config import ConfigError, load_settings

    assert load_settings(environ={"OTEL_FLASHINFER_NATIVE_EXPORT": "0"}).native_export is False
    with pytest.raises(ConfigError, match="OTEL_FLASHINFER_NATIVE_EXPORT"):
        load_settings(environ={"OTEL_FLASHINFER_NATIVE_EXPORT": "fast"})
    from opentelemetry.trace import NoOpTracerProvider

    noop = NoOpTracerProvider()
    assert export.plan(noop, noop.get_tracer("x")).reason == "foreign_provider"


# ---- the pipeline on the fast path ----------------------------------------------------


def _file_provider(path: Path) -> tuple[TracerProvider, Any]:
    provider = TracerProvider(resource=Resource.create({"service.name": "native-test"}))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(str(path))))
    return provider, provider.get_tracer("otel_flashinfer", "1.0")


def _spans_in(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                out.extend(ss["spans"])
    return out


def test_pipeline_exports_through_the_native_encoder_into_the_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    before = health.counters()
    assert pipeline.export_path == "native"
    records = _records()
    for r in records:
        pipeline.submit(r)
    assert pipeline.flush(10)
    spans = _spans_in(path)
    assert [s["name"] for s in spans] == [r.name for r in records]
    after = health.counters()
    assert after.get("spans_native", 0) - before.get("spans_native", 0) == len(records)
    assert after.get("spans_sdk", 0) == before.get("spans_sdk", 0)
    level3 = spans[2]
    attrs = {a["key"]: a["value"] for a in level3["attributes"]}
    assert attrs["flashinfer.arg.q.shape"] == {"arrayValue": {"values": [
        {"intValue": "8"}, {"intValue": "32"}, {"intValue": "128"}]}}
    assert attrs["flashinfer.arg.layout"] == {"stringValue": "NHD"}  # a default
    # what one more span costs in the background counts the file writer's CPU too
    # (REPLAY_EVERY=auto budgets with it): the writes after the first (which opened
    # the file) took some, known from the fourth (the lowest of the three after it)
    for _ in range(3):
        for r in _records():
            pipeline.submit(r)
        assert pipeline.flush(10)
    assert pipeline._native.cost_per_span_s > 0  # noqa: SLF001
    assert pipeline.cost_per_span_s == pytest.approx(
        pipeline.worker_cost_per_span_s + pipeline._native.cost_per_span_s)  # noqa: SLF001
    pipeline.shutdown(5)


def test_an_idle_worker_still_hands_on_a_partial_batch_when_it_falls_due(
        tmp_path: Path) -> None:
    """The worker sleeps without a tick when nothing is queued; the encoder's open
    batch (fewer spans than a batch) is handed to the sender only by a drain once it
    is ``delay_s`` old, so the idle worker wakes for it: a quiet server's last spans
    leave without a flush or another call (a review found them held for good)."""
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "native-test"}))
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(str(path)),
                                                   schedule_delay_millis=200))
    tracer = provider.get_tracer("otel_flashinfer", "1.0")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    assert pipeline.export_path == "native"
    records = _records()
    for r in records:
        pipeline.submit(r)
    deadline = time.monotonic() + 5
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [s["name"] for s in _spans_in(path)] == [r.name for r in records]
    pipeline.shutdown(5)


def _drains_of(pipeline: Pipeline) -> list[int]:
    """Spans encoded by each drain of ``pipeline``'s worker from now on (the worker
    looks ``_drain`` up on each pass)."""
    drains: list[int] = []
    drain = pipeline._drain  # noqa: SLF001

    def counted(*args: Any) -> None:
        before = pipeline._native.counts()[0]  # noqa: SLF001
        drain(*args)
        encoded = pipeline._native.counts()[0] - before  # noqa: SLF001
        if encoded:
            drains.append(encoded)

    pipeline._drain = counted  # noqa: SLF001
    return drains


def _wait_for(predicate: Any, timeout_s: float) -> float:
    """Seconds until ``predicate()`` held (asserts it did within ``timeout_s``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.005)
    return time.monotonic() - start


def _replays(n: int) -> list[Any]:
    """``n`` graph replay records of a 3-call capture (4 spans each)."""
    from test_replay_template import _capture, _replay

    capture = _capture(3)
    return [_replay(capture, index=i + 1, replay_id=0x7000 + i) for i in range(n)]


def test_a_replay_that_wakes_the_worker_gathers_the_next_ones_into_one_drain(
        tmp_path: Path) -> None:
    """Whole cost: a drain has a fixed cost (the wake-up, the pass, a batch to the
    sender) that one traced graph replay every few tens of ms (``REPLAY_EVERY=auto``)
    paid alone.  The replay record that wakes the idle worker waits ``coalesce_s`` for
    others, which go in the same drain."""
    provider, tracer = _file_provider(tmp_path / "traces.jsonl")  # delay 5 s
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, coalesce_s=0.6)
    assert pipeline.export_path == "native"
    time.sleep(0.05)  # the worker is asleep, nothing queued
    drains = _drains_of(pipeline)
    first, *rest = _replays(4)
    pipeline.submit(first)  # wakes it
    time.sleep(0.1)
    for r in rest:
        pipeline.submit(r)
    waited = _wait_for(lambda: drains, 5)
    assert drains == [4 * 4]
    assert waited >= 0.3
    pipeline.shutdown(5)


def test_replays_waiting_for_late_gpu_times_gather_too(tmp_path: Path) -> None:
    """Back to back the host runs hundreds of replays ahead of the GPU: a sparsely
    traced replay's GPU time comes in 300 ms and more after it.  While records waited,
    the worker ticked every ``interval_s`` and drained each traced replay on its own
    (74 passes where 16 did with the times in at once, its CPU per traced replay 85 ->
    280 us on the CPU box); replays' records that wait gather as a new one does."""
    from test_native_stats import stand_in_pool

    first_look: dict[int, float] = {}

    def late(start: int, end: int) -> int:  # in 300 ms after the encoder first asked
        t = first_look.setdefault(start, time.monotonic())
        return 5_000 if time.monotonic() - t >= 0.3 else -(1 << 40)

    with stand_in_pool(late):
        provider, tracer = _file_provider(tmp_path / "traces.jsonl")
        pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, coalesce_s=0.25)
        assert pipeline.export_path == "native"
        time.sleep(0.05)
        drains: list[int] = []
        drain = pipeline._drain  # noqa: SLF001

        def counted(*args: Any) -> None:
            drains.append(1)
            drain(*args)

        pipeline._drain = counted  # noqa: SLF001
        records = _replays(12)
        try:
            for k, r in enumerate(records):  # a traced replay every 50 ms, for 0.6 s
                r.gpu = (k + 1) << 16 | 2
                pipeline.submit(r)
                time.sleep(0.05)
            _wait_for(lambda: pipeline.pending_count() == 0, 10)
        finally:
            pipeline.shutdown(5)
    # Ticking: a pass every 10 ms for 0.9 s (about 90); gathering: one in 0.25 s.
    print(f"\n{len(drains)} drains")
    assert len(drains) <= 15, len(drains)
    assert len(first_look) == 12


def test_only_replays_without_ring_slots_gather_while_they_wait(tmp_path: Path) -> None:
    """Waiting replays gather only where nothing else waits or is queued: an eager
    call's record anywhere in the queue (the C hot path appends it without waking a
    gathering worker) is drained at the next tick, and replays holding statistics ring
    slots are looked at every tick (the ring's low-water wake fires once: gathering,
    17 to 20 of 120 replays found a 16-slot ring full, against 2 or 3; found by
    review)."""
    from collections import deque
    from types import SimpleNamespace

    replays, eager = _replays(3), _records()[0]

    def gathers(waiting: list[Any], queued: list[Any]) -> bool:
        state = SimpleNamespace(_waiting=deque(waiting), _queue=deque(queued),
                                _let_go_queue=deque())
        return Pipeline._replays_wait(state)  # type: ignore[arg-type]

    assert gathers(replays[:1], replays[1:])
    assert not gathers(replays[:1], [replays[1], eager, replays[2]])  # in the middle
    assert not gathers([], replays)  # nothing waits: the tick as before
    held = _replays(1)[0]
    held.group = [object()]  # a statistics group's pending: ring slots
    assert not gathers([replays[0], held, replays[1]], [])

    first_look: dict[int, float] = {}

    def late(start: int, end: int) -> int:
        t = first_look.setdefault(start, time.monotonic())
        return 5_000 if time.monotonic() - t >= 1.0 else -(1 << 40)

    from test_native_stats import stand_in_pool

    with stand_in_pool(late):
        provider, tracer = _file_provider(tmp_path / "traces.jsonl")
        pipeline = Pipeline(tracer, provider=provider, interval_s=0.02, coalesce_s=5.0)
        try:
            drains = _drains_of(pipeline)
            waiting = _replays(1)[0]
            waiting.gpu = 1 << 16 | 2
            pipeline.submit(waiting)
            _wait_for(lambda: first_look, 10)  # it waits for its time now
            time.sleep(0.1)  # the worker gathers (5 s)
            pipeline._queue.append(eager)  # noqa: SLF001 - as the C hot path appends
            assert _wait_for(lambda: drains, 10) < 0.5  # the next tick, not 5 s
        finally:
            pipeline.shutdown(5)


def test_an_eager_record_the_c_hot_path_appends_ends_a_gathering(tmp_path: Path) -> None:
    """The C hot path appends an eager call's record to a queue that is not empty
    without waking the worker: behind a replay's record that woke it, the record
    waited the whole gathering interval.  The gathering looks again each tick."""
    provider, tracer = _file_provider(tmp_path / "traces.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.02, coalesce_s=5.0)
    try:
        time.sleep(0.05)  # the worker is asleep, nothing queued
        drains = _drains_of(pipeline)
        pipeline.submit(_replays(1)[0])  # wakes it: it gathers (5 s)
        time.sleep(0.1)
        pipeline._queue.append(_records()[0])  # noqa: SLF001 - as the C hot path appends
        assert _wait_for(lambda: drains, 10) < 0.5  # the next tick, not 5 s
    finally:
        pipeline.shutdown(5)


def test_eager_calls_records_are_not_gathered(tmp_path: Path) -> None:
    """An eager call's record wakes the worker for a drain after ``interval_s`` as
    before, and one that comes while a replay's record gathers ends the gathering:
    bigger drains of level-10 records held the GIL long enough to stall callers."""
    provider, tracer = _file_provider(tmp_path / "traces.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, coalesce_s=30.0)
    time.sleep(0.05)
    drains = _drains_of(pipeline)
    eager = _records()
    pipeline.submit(eager[0])
    assert _wait_for(lambda: drains, 10) < 5
    assert drains == [1]
    time.sleep(0.05)
    pipeline.submit(_replays(1)[0])  # gathers (30 s)
    time.sleep(0.1)
    pipeline.submit(eager[1])
    assert _wait_for(lambda: sum(drains) == 1 + 4 + 1, 10) < 5
    pipeline.shutdown(5)


@pytest.mark.parametrize("end", ["wake", "flush", "batch", "short_delay"])
def test_the_gathering_wait_ends_at_once_when_something_needs_the_drain(
        tmp_path: Path, end: str) -> None:
    """A statistics ring running low (``wake``), a flush, a full batch and a provider
    that asked for a shorter delay than the gathering wait do not wait it out."""
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "native-test"}))
    delay_ms = 100 if end == "short_delay" else 5000
    provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(str(path)),
                                                   schedule_delay_millis=delay_ms))
    tracer = provider.get_tracer("otel_flashinfer", "1.0")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, coalesce_s=30.0)
    time.sleep(0.05)
    drains = _drains_of(pipeline)
    records = _replays(pipeline._batch // 4 if end == "batch" else 3)  # noqa: SLF001
    for r in records:
        pipeline.submit(r)
    if end == "wake":
        pipeline.wake()
    elif end == "flush":
        assert pipeline.flush(10)
    assert _wait_for(lambda: sum(drains) == 4 * len(records), 10) < 5
    pipeline.shutdown(5)


def test_records_waiting_for_gpu_work_take_the_python_side(tmp_path: Path) -> None:
    """A record with pending work is resolved in Python, then natively encoded."""
    path = tmp_path / "traces.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)

    class Later:
        def __init__(self) -> None:
            self.calls = 0

        def ready(self) -> bool:
            self.calls += 1
            return self.calls > 2

        def apply(self, record: CallRecord) -> None:
            record.attributes["flashinfer.gpu.time_ns"] = 1234

        def abandon(self, record: CallRecord, reason: str) -> None:
            raise AssertionError(reason)

    r = CallRecord.for_call("waits", 5, 6, None, BASE)
    r.start_ns, r.end_ns = 1, 2
    r.add_pending(Later())
    pipeline.submit(r)
    assert pipeline.flush(10)
    (span,) = _spans_in(path)
    attrs = {a["key"]: a["value"] for a in span["attributes"]}
    assert attrs["flashinfer.gpu.time_ns"] == {"intValue": "1234"}
    pipeline.shutdown(5)


class _Gate:
    """A sender that holds every batch until released (a receiver that hangs)."""

    fmt = "json"

    def __init__(self) -> None:
        self.open = threading.Event()
        self.got = 0

    def send(self, payload: bytes, count: int) -> bool:
        self.open.wait(30)
        self.got += count
        return True


def test_outbox_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    """A receiver that does not answer: callers never wait, the encoded backlog stays
    under its cap, and every span that falls out is counted."""
    _provider, tracer = _file_provider(tmp_path / "unused.jsonl")
    gate = _Gate()
    chosen = export.Plan(True, "test", (gate,), delay_s=0.0, batch=10, outbox_spans=50)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    before = health.counters().get("spans_dropped", 0)
    worst, clock = 0.0, reader()
    for i in range(300):
        r = CallRecord.for_call("f", i + 1, i + 1, None, BASE)
        m0, t0 = clock(), time.perf_counter()
        sink.add(r)
        worst = max(worst, time.perf_counter() - t0 - excused(m0, clock()))
        assert sink._queued <= 50  # noqa: SLF001
    assert worst < 0.005
    assert not sink.flush(time.monotonic() + 0.2)  # still held: not flushed, and says so
    gate.open.set()
    assert sink.flush(time.monotonic() + 10)
    dropped = health.counters().get("spans_dropped", 0) - before
    assert gate.got + dropped == 300 and dropped >= 240
    sink.shutdown(1)


def test_a_shutdown_that_runs_out_of_time_counts_what_it_leaves(tmp_path: Path) -> None:
    """A receiver that hangs through the shutdown: the batch in flight, the outbox and
    the open batch will not leave with us, so each of their spans is counted dropped
    once (a failure of the send after that is not counted again)."""
    _provider, tracer = _file_provider(tmp_path / "unused.jsonl")

    class Refused(_Gate):
        def send(self, payload: bytes, count: int) -> bool:
            self.open.wait(30)
            return False  # held, then refused

    gate = Refused()
    chosen = export.Plan(True, "test", (gate,), delay_s=60.0, batch=10, outbox_spans=1000)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    before = health.counters().get("spans_dropped", 0)
    _add(sink, 1, 10)  # a full batch: sent, and held in flight
    _until(lambda: sink._busy)  # noqa: SLF001
    _add(sink, 11, 40)  # four more batches queued behind it
    _add(sink, 51, 5)  # and an open batch of five
    assert not sink.shutdown(0.3)
    assert health.counters().get("spans_dropped", 0) - before == 55
    gate.open.set()  # the held send ends (and fails): already counted
    time.sleep(0.2)
    assert health.counters().get("spans_dropped", 0) - before == 55


class _GatedFile(export.FileSender):
    """Our file sender, held shut until released, recording each call's parts."""

    def __init__(self, exporter: Any) -> None:
        super().__init__(exporter)
        self.open = threading.Event()
        self.calls: list[tuple[int, int]] = []

    def send_parts(self, parts: list[bytes], count: int) -> bool:
        self.open.wait(30)
        self.calls.append((len(parts), count))
        return super().send_parts(parts, count)


class _GatedProtobuf:
    """A protobuf sender held shut until released, keeping each request whole."""

    fmt = "protobuf"
    max_coalesce = export.COALESCE_BYTES

    def __init__(self) -> None:
        self.open = threading.Event()
        self.requests: list[tuple[bytes, int]] = []

    def send(self, payload: bytes, count: int) -> bool:
        self.open.wait(30)
        self.requests.append((payload, count))
        return True


def _add(sink: Any, first: int, n: int, cut: bool = False) -> None:
    """Records ``first`` .. ``first + n - 1``; with ``cut``, sent as a partial batch (as
    the delay cuts one)."""
    for i in range(first, first + n):
        r = CallRecord.for_call(f"f{i}", i, i, None, BASE)
        r.start_ns, r.end_ns = i, i + 1
        sink.add(r)
    if cut:
        sink.end_drain()


def _until(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert condition()


def test_a_sender_behind_writes_what_queued_up_in_one_writev(tmp_path: Path) -> None:
    """Batches queued behind a held write go out in one system call, as whole lines
    (each still one batch), in order, every span once; at most half the outbox at once."""
    path = tmp_path / "t.jsonl"
    _provider, tracer = _file_provider(tmp_path / "unused.jsonl")
    sender = _GatedFile(JsonLinesSpanExporter(str(path)))
    chosen = export.Plan(True, "test", (sender,), delay_s=0.0, batch=10, outbox_spans=100)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    _add(sink, 1, 10)
    _until(lambda: sink._busy)  # noqa: SLF001
    _add(sink, 11, 70)
    sender.open.set()
    assert sink.flush(time.monotonic() + 10)
    sink.shutdown(1)
    assert sender.calls == [(1, 10), (5, 50), (2, 20)]
    assert len(path.read_text().splitlines()) == 8
    assert [s["name"] for s in _spans_in(path)] == [f"f{i}" for i in range(1, 81)]


def test_more_lines_than_one_writev_takes_are_all_written(tmp_path: Path) -> None:
    """Linux's writev takes at most 1,024 buffers: more lines go out in several."""
    path = tmp_path / "t.jsonl"
    exporter = JsonLinesSpanExporter(str(path))
    lines = [b'{"n":%d}\n' % i for i in range(2500)]
    assert exporter.write_lines(lines)
    exporter.shutdown()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == \
        list(range(2500))


def test_partial_protobuf_requests_queued_up_become_one_request_of_a_batch() -> None:
    """Concatenated ExportTraceServiceRequests are one request with all their
    resource_spans: it decodes to every span, in order, and counts them all.  A joined
    request never carries more than the export batch size (a user's bound on request
    size), nor more bytes than its limit."""
    tracer, _ = _sdk_tracer()
    sender = _GatedProtobuf()
    chosen = export.Plan(True, "test", (sender,), delay_s=0.0, batch=30, outbox_spans=1000)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    _add(sink, 1, 10, cut=True)
    _until(lambda: sink._busy)  # noqa: SLF001
    for first in range(11, 71, 10):  # six partial requests of ten spans
        _add(sink, first, 10, cut=True)
    _add(sink, 71, 30)  # a full one: alone
    with sink._cond:  # noqa: SLF001
        one = len(sink._outbox[0][1])  # noqa: SLF001
        max_bytes, spans, parts = sink._coalesce["protobuf"]  # noqa: SLF001
        assert (max_bytes, spans) == (export.COALESCE_BYTES, 30)
        sink._coalesce["protobuf"] = (2 * one, spans, parts)  # noqa: SLF001
    sender.open.set()
    assert sink.flush(time.monotonic() + 10)
    sink.shutdown(1)
    assert [c for _, c in sender.requests] == [10, 20, 20, 20, 30]
    names = []
    for payload, count in sender.requests:
        request = ExportTraceServiceRequest.FromString(payload)
        spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        assert len(spans) == count
        assert all(rs.resource.attributes for rs in request.resource_spans)
        names += [s.name for s in spans]
    assert names == [f"f{i}" for i in range(1, 101)]


def test_coalescing_keeps_other_formats_in_their_places(tmp_path: Path) -> None:
    """Two formats share the outbox: each sender gets its own format's spans, all of
    them, in order."""
    path = tmp_path / "t.jsonl"
    _provider, tracer = _file_provider(tmp_path / "unused.jsonl")
    filer, proto = _GatedFile(JsonLinesSpanExporter(str(path))), _GatedProtobuf()
    filer.open = proto.open  # one gate for both
    chosen = export.Plan(True, "test", (filer, proto), delay_s=0.0, batch=20,
                         outbox_spans=1000)
    sink = export.NativeExport(tracer, chosen, CallRecord, _EMPTY)
    _add(sink, 1, 10, cut=True)
    _until(lambda: sink._busy)  # noqa: SLF001
    for first in range(11, 51, 10):
        _add(sink, first, 10, cut=True)
    proto.open.set()
    assert sink.flush(time.monotonic() + 10)
    sink.shutdown(1)
    assert [s["name"] for s in _spans_in(path)] == [f"f{i}" for i in range(1, 51)]
    names = []
    for payload, _count in proto.requests:
        request = ExportTraceServiceRequest.FromString(payload)
        names += [s.name for rs in request.resource_spans for ss in rs.scope_spans
                  for s in ss.spans]
    assert names == [f"f{i}" for i in range(1, 51)]
    assert len(filer.calls) + len(proto.requests) < 10  # coalesced, not one per batch


def _stats_rows() -> tuple[bytes, list[Any]]:
    """Rows as the statistics kernel writes them (torch_ops is the CPU reference)."""
    from otel_flashinfer.stats.decode import SCOPE_FULL, SCOPE_PAGES, SCOPE_SAMPLED, RowMeta
    from otel_flashinfer.stats.torch_ops import tensor_row

    x = torch.randn(300, dtype=torch.float64)
    x[3], x[7], x[9] = float("nan"), float("inf"), -float("inf")
    rows = torch.stack([
        tensor_row(x), tensor_row(torch.full((4,), float("nan"))), tensor_row(torch.empty(0)),
        tensor_row(torch.arange(-5, 60, dtype=torch.int64)), tensor_row(x, step=7),
        tensor_row(torch.tensor([-0.0, 1e300, -1e-300], dtype=torch.float64)),
    ])
    metas = [RowMeta("a", SCOPE_FULL, 300), RowMeta("nan", SCOPE_FULL, 4),
             ("e", SCOPE_FULL, 0), ("ints", SCOPE_FULL, 65), ("s", SCOPE_SAMPLED, 300),
             ("kv", SCOPE_PAGES, 0)]
    return rows.numpy().tobytes(), metas


def _event_dicts(span: Any) -> list[dict[str, Any]]:
    out = []
    for event in span.events:
        attrs = {}
        for kv in event.attributes:
            kind = kv.value.WhichOneof("value")
            attrs[kv.key] = getattr(kv.value, kind)
        out.append(attrs)
    return out


def _same_attrs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import math

    return a.keys() == b.keys() and all(
        (isinstance(v, float) and math.isnan(v) and math.isnan(b[k])) or v == b[k]
        for k, v in a.items())


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
def test_raw_statistics_rows_become_the_same_events(fmt: str) -> None:
    """The encoder decodes level-5 rows itself (RawStats); its events must say exactly
    what ``decode_buffer`` says, and a NaN/Inf anywhere sets flashinfer.nonfinite."""
    from otel_flashinfer.stats.decode import RawStats, decode_buffer

    rows, metas = _stats_rows()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
    r = CallRecord.for_call("stats", 1, 2, None, BASE)
    r.start_ns, r.end_ns = 10, 20
    r.events = [RawStats((rows, metas[:2], 0, 15)), ("other", {"k": 1}, 16),
                RawStats((rows, metas[2:], 2 * 64, 17))]
    encoder.add(r)
    payload = encoder.take()
    request = (ExportTraceServiceRequest.FromString(payload) if fmt == "protobuf"
               else json_to_request(payload.decode()))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    expected = decode_buffer(rows, metas)
    got = _event_dicts(span)
    assert [e.name for e in span.events] == ["flashinfer.tensor_stats"] * 2 + ["other"] + [
        "flashinfer.tensor_stats"] * 4
    assert [e.time_unix_nano for e in span.events] == [15, 15, 16, 17, 17, 17, 17]
    assert got[2] == {"k": 1}
    stats = got[:2] + got[3:]
    assert all(_same_attrs(g, e) for g, e in zip(stats, expected, strict=True)), (stats, expected)
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["flashinfer.nonfinite"].bool_value is True

    clean = CallRecord.for_call("clean", 1, 3, None, BASE)
    clean.events = [RawStats((rows, metas[3:4], 3 * 64, 1))]
    encoder.add(clean)
    payload = encoder.take()
    request = (ExportTraceServiceRequest.FromString(payload) if fmt == "protobuf"
               else json_to_request(payload.decode()))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert "flashinfer.nonfinite" not in {kv.key for kv in span.attributes}
    assert _same_attrs(_event_dicts(span)[0], expected[3])


def test_malformed_raw_statistics_refuse_the_record() -> None:
    from otel_flashinfer.stats.decode import RawStats

    rows, metas = _stats_rows()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    r = CallRecord.for_call("short", 1, 2, None, BASE)
    r.events = [RawStats((rows[:64], metas, 0, 1))]  # six metas, one row
    with pytest.raises(ValueError, match="shorter than their metas"):
        encoder.add(r)
    assert encoder.take() is None


# ---- what a review found: each fixed, each kept fixed --------------------------------


def test_grpc_twin_has_a_channel_of_its_own() -> None:
    """The SDK closes and re-creates a channel after UNAVAILABLE: shared with the
    application's exporter, that would break whichever did not reconnect."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    app_exporter = OTLPSpanExporter(endpoint="127.0.0.1:9", insecure=True, timeout=1)
    channel = app_exporter._channel  # noqa: SLF001
    sender = export.sender_for(app_exporter)
    assert type(sender).__name__ == "GrpcSender"
    assert sender.twin._channel is not channel  # noqa: SLF001
    assert app_exporter._channel is channel  # noqa: SLF001 - the application's, untouched
    sender.close()
    app_exporter.shutdown()


def test_a_failing_describer_costs_the_arguments_not_the_span() -> None:
    class Broken(Describer):
        __slots__ = ()

        def attributes(self, data, kw, result):  # noqa: ANN001, ANN201
            raise RuntimeError("describer failed")

    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    r = CallRecord.for_call("f", 1, 2, None, BASE)
    r.describe, r.data = Broken(DESCRIBER.plan), [describe.snapshot(Q)]
    encoder.add(r)
    span = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
    keys = [a.key for a in span.scope_spans[0].spans[0].attributes]
    assert keys == ["flashinfer.api", "flashinfer.level"]
    assert encoder.stats()["describe_errors"] == 1


def test_the_encoder_refuses_to_be_reentered_mid_span() -> None:
    """A describer (Python) that calls back into its own encoder must not corrupt the
    span being written."""
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    seen = []

    class Reentrant(Describer):
        __slots__ = ()

        def attributes(self, data, kw, result):  # noqa: ANN001, ANN201
            try:
                encoder.take()
            except RuntimeError as exc:
                seen.append(str(exc))
            return {"flashinfer.arg.x": 1}

    first = CallRecord.for_call("first", 1, 2, None, BASE)
    encoder.add(first)
    r = CallRecord.for_call("second", 1, 3, None, BASE)
    r.describe, r.data = Reentrant(DESCRIBER.plan), []
    encoder.add(r)
    assert seen == ["Encoder re-entered while encoding a span"]
    spans = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
    assert [s.name for s in spans.scope_spans[0].spans] == ["first", "second"]
    with pytest.raises(RuntimeError, match="not initialised"):
        _otlp.Encoder.__new__(_otlp.Encoder).drain(__import__("collections").deque([1]), [], 5)


def test_negative_zero_is_not_served_from_the_cache_of_zero() -> None:
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    signs = []
    for value in (0.0, -0.0):
        r = CallRecord.for_call("f", 1, 2, None, BASE)
        r.describe, r.data, r.kw = DESCRIBER, [describe.snapshot(Q)], {"scale": value}
        encoder.add(r)
        span = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
        attrs = {a.key: a.value for a in span.scope_spans[0].spans[0].attributes}
        signs.append(str(attrs["flashinfer.arg.scale"].double_value))
    assert signs == ["0.0", "-0.0"]


def test_a_processor_added_later_is_planned_again(tmp_path: Path) -> None:
    """A processor the application adds after our first span must see our spans too:
    the setup is planned again (here it cannot be native any more)."""
    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    assert pipeline.export_path == "native"
    late = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(late))
    r = CallRecord.for_call("after-add", 7, 8, None, BASE)
    r.start_ns, r.end_ns = 1, 2
    pipeline.submit(r)
    assert pipeline.flush(10)
    assert [s.name for s in late.get_finished_spans()] == ["after-add"]
    assert pipeline.export_path in ("direct", "sdk")
    pipeline.shutdown(5)


def test_a_processor_added_while_planning_is_planned_again(tmp_path: Path,
                                                           monkeypatch) -> None:
    """A processor another thread adds while the way out is being planned: the plan
    remembers the processors it was made from, so the next drain plans again (it
    used to read them after planning, taking the new one as planned for)."""
    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    late = InMemorySpanExporter()
    sender_for = export.sender_for

    def adding(exporter):  # noqa: ANN001, ANN202 - the application's thread, meanwhile
        if not late_added:
            late_added.append(True)
            provider.add_span_processor(SimpleSpanProcessor(late))
        return sender_for(exporter)

    late_added: list[bool] = []
    monkeypatch.setattr(export, "sender_for", adding)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    try:
        assert late_added and pipeline.export_path == "native"  # planned without it
        r = CallRecord.for_call("after-add", 7, 8, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        pipeline.submit(r)
        assert pipeline.flush(10)
        assert [s.name for s in late.get_finished_spans()] == ["after-add"]
    finally:
        pipeline.shutdown(5)


def test_a_forked_child_does_not_hang_on_a_lock_held_at_fork(tmp_path: Path) -> None:
    import os

    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    native = pipeline._native  # noqa: SLF001
    native._enc_lock.acquire()  # noqa: SLF001 - the worker, mid-drain, at fork time
    try:
        pid = os.fork()
        if pid == 0:  # the child: its fork hooks ran; it must be able to encode
            try:
                native.set_extra({"process.pid": os.getpid()})
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(3)
    finally:
        native._enc_lock.release()  # noqa: SLF001
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung in its fork hooks")
    pipeline.shutdown(5)


def test_a_capture_never_waits_on_a_busy_sender(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The worker drains inside a GPU-query section, and a graph capture starting on
    another thread waits for that section to end.  A slow receiver must not stretch it:
    records are held back without waiting, the worker waits for room outside the
    section, and a pass leaves it after its time budget."""
    import threading

    from otel_flashinfer import capture_guard, otlp_json

    write_lines = otlp_json.JsonLinesSpanExporter.write_lines

    def slow(self, lines: list[bytes]) -> bool:  # noqa: ANN001 - busy, not stalled
        time.sleep(0.2)
        return write_lines(self, lines)

    monkeypatch.setattr(otlp_json.JsonLinesSpanExporter, "write_lines", slow)
    path = tmp_path / "traces.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    stop = threading.Event()

    def calls() -> None:
        i = 0
        while not stop.is_set():
            r = CallRecord.for_call("f", i + 1, i + 1, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            pipeline.submit(r)
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=calls)
    thread.start()
    waits = []
    try:
        for _ in range(8):
            time.sleep(0.15)
            t0 = time.perf_counter()
            capture_guard.begin_capture()
            waits.append(time.perf_counter() - t0)
            capture_guard.end_capture()
    finally:
        stop.set()
        thread.join()
        pipeline.shutdown(1)
    assert max(waits) < 0.25, waits


def test_a_capture_never_waits_on_the_sdk_paths_exporter() -> None:
    """The SDK path (a processor over an exporter the native path does not serve): a
    SimpleSpanProcessor exports on the worker as the span is handed on.  That happens
    after the worker's GPU-query section, so a capture starting meanwhile does not wait
    for a receiver that hangs (it waited up to capture_guard's 5 s)."""
    from otel_flashinfer import capture_guard

    started, release = threading.Event(), threading.Event()

    class Hung(InMemorySpanExporter):
        def export(self, spans: Any) -> Any:
            started.set()
            release.wait(10)
            return super().export(spans)

    exporter = Hung()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=0.01)
    try:
        r = CallRecord.for_call("f", 0x77, 1, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        pipeline.submit(r)
        assert started.wait(10)
        assert pipeline.export_path != "native"
        t0 = time.perf_counter()
        capture_guard.begin_capture()
        waited = time.perf_counter() - t0
        capture_guard.end_capture()
        release.set()
        assert pipeline.flush(10)
        assert [s.name for s in exporter.get_finished_spans()] == ["f"]
    finally:
        release.set()
        pipeline.shutdown(1)
    assert waited < 0.5, waited


def test_spans_held_for_after_the_section_go_out_if_the_drain_fails(monkeypatch) -> None:  # noqa: ANN001
    """The SDK path's spans wait for the end of the GPU-query section: a drain that
    fails after they were counted as handed on still hands them on."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=60.0)
    pipeline._stopping = True  # noqa: SLF001 - no worker: this thread drains
    pipeline._wake.set()  # noqa: SLF001
    pipeline._thread.join(5)  # noqa: SLF001

    def fails() -> float:
        raise RuntimeError("a drain's bookkeeping failed")

    monkeypatch.setattr(pipeline, "_sender_since_last", fails)
    r = CallRecord.for_call("f", 0x77, 1, None, BASE)
    r.start_ns, r.end_ns = 1, 2
    pipeline._queue.append(r)  # noqa: SLF001
    with pytest.raises(RuntimeError, match="bookkeeping"):
        pipeline._drain()  # noqa: SLF001
    assert [s.name for s in exporter.get_finished_spans()] == ["f"]


def test_a_dropped_replay_counts_its_children(monkeypatch) -> None:  # noqa: ANN001
    """The queue's bound drops whole records: a replay record is its span and one per
    captured call, and every one of them is counted."""
    from test_replay_template import _capture, _replay

    pipeline = Pipeline(None, max_queue=4, interval_s=60.0)
    pipeline._stopping = True  # noqa: SLF001 - no worker: the queue only fills
    pipeline._wake.set()  # noqa: SLF001
    pipeline._thread.join(5)  # noqa: SLF001
    capture = _capture(3)
    before = health.counters().get("spans_dropped", 0)
    for i in range(1, 11):
        pipeline.submit(_replay(capture, index=i, replay_id=0x500 + i))
    assert health.counters().get("spans_dropped", 0) - before == 6 * (1 + 3)


def test_replays_wait_for_a_busy_sender_rather_than_be_dropped(tmp_path: Path,
                                                               monkeypatch) -> None:  # noqa: ANN001
    """Replay records carry a span per captured call: more spans than the outbox holds,
    and more records than a batch, still wait in the record queue for a busy sender,
    and all of them arrive."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor as Batch
    from test_replay_template import _capture, _replay

    from otel_flashinfer import otlp_json

    gate = threading.Event()
    write_lines = otlp_json.JsonLinesSpanExporter.write_lines

    def held(self, lines: list[bytes]) -> bool:  # noqa: ANN001
        gate.wait(30)
        return write_lines(self, lines)

    monkeypatch.setattr(otlp_json.JsonLinesSpanExporter, "write_lines", held)
    path = tmp_path / "t.jsonl"
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(Batch(JsonLinesSpanExporter(str(path)), max_queue_size=64,
                                      max_export_batch_size=16, schedule_delay_millis=10))
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=0.01)
    capture = _capture(30)
    try:
        for i in range(1, 41):  # 40 records (a batch is 16) of 31 spans: outbox 64
            pipeline.submit(_replay(capture, index=i, replay_id=0x900 + i))
            time.sleep(0.002)
        time.sleep(0.1)  # the worker's passes meet a busy sender (not yet stalled: 0.5 s)
        gate.set()
        assert pipeline.flush(20)
    finally:
        gate.set()
        pipeline.shutdown(5)
    # Every span arrived, so none of this pipeline's was dropped.  (The process-wide
    # drop counter is not compared: an earlier test's pipeline, still stopping in the
    # background on a loaded box, can count its own drops meanwhile.)
    assert len(_spans_in(path)) == 40 * 31


def _drops_reported(monkeypatch, text: str) -> list[int]:  # noqa: ANN001
    """The spans the pipeline reports dropped with ``text`` in the message, as it
    reports them (from now on, this test's only: the process-wide counter may also
    count an earlier test's pipeline still stopping in the background)."""
    from otel_flashinfer import pipeline as pipeline_mod

    counted: list[int] = []
    report = pipeline_mod.health.report

    def noted(kind: str, message: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if kind == "spans_dropped" and text in message:
            counted.append(kwargs.get("n", 1))
        report(kind, message, *args, **kwargs)

    monkeypatch.setattr(pipeline_mod.health, "report", noted)
    return counted


def _wait_idle(pipeline: Pipeline) -> None:
    """Until the worker has handed on everything submitted (not merely taken it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with pipeline._idle:  # noqa: SLF001
            if not pipeline.pending_count() and not pipeline._busy:  # noqa: SLF001
                return
        time.sleep(0.01)
    raise AssertionError("the worker did not go idle")


@pytest.mark.parametrize("added_later", [False, True])
def test_the_sdk_path_counts_what_a_full_batch_queue_drops(added_later: bool,
                                                           monkeypatch) -> None:  # noqa: ANN001
    """A provider with a sampler of the application's own takes the SDK's path; its
    BatchSpanProcessor drops the oldest span when its queue is full and only logs it.
    Every sampled span is either exported or counted (a span handed on just as the
    processor's thread takes a batch from a full queue may be counted and not dropped:
    the count errs high, never low); spans the sampler drops never reach the queue and
    are not counted.  A batch processor added after the first spans is counted too."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor as Batch

    gate, exported = threading.Event(), InMemorySpanExporter()

    class Held(InMemorySpanExporter):
        def export(self, spans):  # noqa: ANN001, ANN202
            gate.wait(30)  # a receiver that does not answer yet
            return exported.export(spans)

    class ByName(sampling.Sampler):  # the application's: only the SDK can ask it
        def should_sample(self, context, trace_id, name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            return sampling.SamplingResult(sampling.Decision.DROP if name.startswith("skip")
                                           else sampling.Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "by name"

    provider = TracerProvider(resource=Resource.create({"service.name": "t"}),
                              sampler=ByName())
    # The processor's thread wakes when the queue is full, takes all 8 and blocks in the
    # export: the queue then fills again and stays full (8 + 8 received, 24 dropped).
    batch = Batch(Held(), max_queue_size=8, max_export_batch_size=8,
                  schedule_delay_millis=60_000)
    early = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(early) if added_later else batch)
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=0.01)

    def submit(name: str, n: int, first_id: int) -> None:
        for i in range(n):
            r = CallRecord.for_call(f"{name}{i}", 0x77, first_id + i, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            pipeline.submit(r)
        _wait_idle(pipeline)

    # What the SDK's full queue dropped, as counted (an earlier test's pipeline still
    # stopping in the background may count drops of its own in the same counter).
    counted = _drops_reported(monkeypatch, "SDK's span queue is full")
    try:
        if added_later:
            submit("early", 3, 0x50)  # planned with the simple processor only
            provider.add_span_processor(batch)
        queue = batch._batch_processor._queue  # noqa: SLF001
        submit("call", 8, 0x100)
        deadline = time.monotonic() + 10
        while queue and time.monotonic() < deadline:  # taken: its thread is in the export
            time.sleep(0.01)
        submit("more", 32, 0x200)
        assert len(queue) == 8  # full
        submit("skip", 100, 0x400)  # the sampler drops them: nothing reaches the queue
        assert pipeline.export_path == "sdk"
    finally:
        gate.set()
        provider.force_flush(10_000)
        pipeline.shutdown(5)
    dropped = sum(counted)
    received = len(exported.get_finished_spans())
    assert dropped > 0
    assert 40 <= received + dropped <= 41, (received, dropped)


@pytest.mark.parametrize("processor", ["batch", "simple"])
@pytest.mark.parametrize("failure", ["result", "raise"])
def test_our_spans_an_applications_exporter_fails_to_send_are_counted(
        processor: str, failure: str, monkeypatch) -> None:  # noqa: ANN001
    """On the SDK path our spans go to the application's processor, whose exporter may
    fail: the SDK logs an exception and ignores a FAILURE result, so they were lost
    uncounted.  Each of our spans in a failed batch is counted once (the application's
    own spans are not ours to count), what the SDK sees is unchanged, and stopping
    puts the application's exporter back."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor as Batch
    from opentelemetry.sdk.trace.export import SpanExportResult

    seen: list[tuple[int, Any]] = []

    class Failing:  # the application's own exporter, its receiver down
        def export(self, spans):  # noqa: ANN001, ANN202
            seen.append((len(spans), None))
            if failure == "raise":
                raise ConnectionError("receiver down")
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True

        endpoint = "http://collector:4318"  # the application's own settings stay readable

    exporter = Failing()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    proc = (Batch(exporter, schedule_delay_millis=10) if processor == "batch"
            else SimpleSpanProcessor(exporter))
    provider.add_span_processor(proc)
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=0.01)
    counted = _drops_reported(monkeypatch, "span exporter")
    before = health.counters().get("spans_dropped_exporter", 0)
    try:
        assert pipeline.export_path == "direct"
        for i in range(6):
            r = CallRecord.for_call(f"call{i}", 0x77, 0x100 + i, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            pipeline.submit(r)
        _wait_idle(pipeline)
        with provider.get_tracer("app").start_as_current_span("the application's"):
            pass
        provider.force_flush(10_000)
        assert sum(n for n, _ in seen) == 7  # every span reached the exporter
        assert sum(counted) == 6  # ours, each once
        assert health.counters()["spans_dropped_exporter"] - before == 6
        owner = proc._batch_processor if processor == "batch" else proc  # noqa: SLF001
        attr = "_exporter" if processor == "batch" else "span_exporter"
        assert getattr(owner, attr) is exporter  # the same object, its type, its settings
        assert "export" in vars(exporter)  # watched: its export shadowed on it alone
    finally:
        pipeline.shutdown(5)
    assert "export" not in vars(exporter) and getattr(owner, attr) is exporter
    provider.shutdown()


def test_an_exporter_two_pipelines_watch_stays_watched_until_the_last_stops(
        monkeypatch) -> None:  # noqa: ANN001
    """A restart (``instrument`` again at another level) plans the new pipeline while the
    old one still flushes: the new one found the exporter watched and held nothing, and
    the old one's stop took the watch away from under it (found by review)."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Failing:
        def export(self, spans):  # noqa: ANN001, ANN202
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return True

    exporter = Failing()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("otel_flashinfer", "1.0")
    old = Pipeline(tracer, provider=provider, interval_s=0.01)
    new = Pipeline(tracer, provider=provider, interval_s=0.01)
    counted = _drops_reported(monkeypatch, "span exporter")
    try:
        old.shutdown(5)
        assert "export" in vars(exporter)  # the new pipeline still watches it
        r = CallRecord.for_call("call", 0x77, 0x100, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        new.submit(r)
        _wait_idle(new)
        assert sum(counted) == 1
    finally:
        new.shutdown(5)
    assert "export" not in vars(exporter)


@pytest.mark.parametrize("sampler", [None, "app"])
def test_spans_handed_to_a_shut_batch_processor_are_counted(sampler: str | None,
                                                            monkeypatch) -> None:  # noqa: ANN001
    """An application that shuts its BatchSpanProcessor down before tracing stops: the
    SDK ignores every span still handed to it and only logs it.  Counted on the direct
    path (the SDK's own sampler) and on the SDK's path (a sampler of the application's)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor as Batch

    class Everything(sampling.Sampler):  # the application's: only the SDK can ask it
        def should_sample(self, context, trace_id, name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "everything"

    exported = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}),
                              **({"sampler": Everything()} if sampler else {}))
    batch = Batch(exported, schedule_delay_millis=10)
    provider.add_span_processor(batch)
    pipeline = Pipeline(provider.get_tracer("otel_flashinfer", "1.0"), provider=provider,
                        interval_s=0.01)
    counted = _drops_reported(monkeypatch, "shut its span processors")

    def submit(n: int, first_id: int) -> None:
        for i in range(n):
            r = CallRecord.for_call(f"call{i}", 0x77, first_id + i, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            pipeline.submit(r)
        _wait_idle(pipeline)

    try:
        submit(3, 0x100)
        provider.force_flush(10_000)
        assert len(exported.get_finished_spans()) == 3 and counted == []
        batch.shutdown()
        submit(5, 0x200)
        assert pipeline.export_path == ("sdk" if sampler else "direct")
        # A second processor, shut too: each span is lost once, not once per processor.
        second = Batch(InMemorySpanExporter(), schedule_delay_millis=10)
        provider.add_span_processor(second)
        second.shutdown()
        submit(4, 0x300)
        assert sum(counted) == 5 + 4
        # One that still takes them: nothing is lost.
        live = InMemorySpanExporter()
        simple = SimpleSpanProcessor(live)
        provider.add_span_processor(simple)
        submit(2, 0x400)
        assert sum(counted) == 5 + 4
        # The provider shut down, its simple processor with it: lost again, counted.
        provider.shutdown()
        submit(3, 0x500)
    finally:
        pipeline.shutdown(5)
    assert len(exported.get_finished_spans()) == 3
    assert sum(counted) == 5 + 4 + 3
    assert len(live.get_finished_spans()) == 2


class _Costly:
    """An eager call's statistics, resolved in Python at 2 ms of the worker's CPU;
    ``started`` is set when the worker begins on one."""

    def __init__(self, started: threading.Event | None = None) -> None:
        self.started = started

    def ready(self) -> bool:
        if self.started is not None:
            self.started.set()
        end = time.thread_time() + 2e-3
        while time.thread_time() < end:
            pass
        return True

    def apply(self, record: CallRecord) -> None:
        record.attributes["resolved"] = True

    def abandon(self, record: CallRecord, reason: str) -> None:
        pass


def test_replays_are_charged_what_replay_spans_cost_not_eager_ones(tmp_path: Path) -> None:
    """REPLAY_EVERY=auto charges each traced replay the worker's CPU per replay span.
    Eager calls' spans (here with a costly pending result) and the drains around a
    capture cost far more each; charged to replays they made auto trace none on the
    device."""
    from test_replay_template import _capture, _replay

    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    try:
        for round_ in range(4):  # separate drains: the first (one-time work) is left out
            for i in range(5):
                r = CallRecord.for_call("eager", 0x55, 0x200 + 10 * round_ + i, None, BASE)
                r.start_ns, r.end_ns = 1, 2
                r.add_pending(_Costly())
                pipeline.submit(r)
            assert pipeline.flush(10)
        eager = pipeline.worker_cost_per_span_s
        assert eager > 1e-3  # the 2 ms resolution is in it
        assert pipeline._native.cost_per_span_s > 0  # noqa: SLF001 - the sender's known
        assert pipeline.replay_cost_per_span_s == 0.0  # but no replay drain yet
        capture = _capture(30)
        for i in range(1, 9):
            pipeline.submit(_replay(capture, index=i, replay_id=0x900 + i))
            assert pipeline.flush(10)
        replay = pipeline.replay_cost_per_span_s
        assert 0 < replay < eager / 20, (replay, eager)
    finally:
        pipeline.shutdown(5)


def test_a_replay_span_has_no_price_until_the_sender_has_one(tmp_path: Path) -> None:
    """Spans handed on before a price is known are charged once, at the first price:
    a price from the worker alone would leave the sender's share of them unpaid.  A new
    sender (a re-plan) keeps the last one's price until it knows its own."""
    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    try:
        native = pipeline._native  # noqa: SLF001
        assert native is not None
        # The replays' estimate holds the sender's CPU already: its own is not added.
        price = 3e-6
        pipeline._replay_cost.value = 3e-6  # noqa: SLF001 - the worker's known
        native._cost.value = 0.0  # noqa: SLF001 - the sender's not yet
        assert pipeline.replay_cost_per_span_s == 0.0
        native._cost.value = 1e-6  # noqa: SLF001
        assert pipeline.replay_cost_per_span_s == pytest.approx(price)
        pipeline._use_tracer(pipeline.tracer)  # noqa: SLF001 - a re-plan: a new sender
        assert pipeline._native is not native  # noqa: SLF001
        assert pipeline.replay_cost_per_span_s == pytest.approx(price)
    finally:
        pipeline.shutdown(5)


def test_a_replay_spans_price_holds_the_senders_cpu(tmp_path: Path, monkeypatch) -> None:
    """``auto`` pays for the sender as it measures itself: what the sender thread ran
    between two drains (its waking included) is priced into the replay spans the later
    one hands on, once.  Priced by what the worker and the sender measured of their own
    work, ``auto`` charged itself 73% of what tracing added (H200)."""
    from test_replay_template import _capture, _replay

    real_send = export.FileSender.send_parts
    burn_s = [0.0]

    def costly_send(self, parts, count):  # noqa: ANN001, ANN202 - 4 ms a write, if burning
        end = time.thread_time() + burn_s[0]
        while time.thread_time() < end:
            pass
        return real_send(self, parts, count)

    monkeypatch.setattr(export.FileSender, "send_parts", costly_send)
    prices = []
    capture = _capture(30)
    for burn in (0.0, 0.004):
        burn_s[0] = burn
        provider, tracer = _file_provider(tmp_path / f"{burn}.jsonl")
        pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
        try:
            for round_ in range(10):
                pipeline.submit(_replay(capture, index=round_ + 1, replay_id=0x900 + round_))
                assert pipeline.flush(10)  # the drain, then the send the next drain prices
            prices.append(pipeline._replay_cost.value)  # noqa: SLF001
        finally:
            pipeline.shutdown(5)
    alone, burning = prices
    # 4 ms over a replay's 31 spans is 129 us a span; the worker's own is a few us.
    assert 0 < alone < 50e-6, prices
    assert alone + 80e-6 < burning < alone + 1.5 * 0.004 / 31, prices


def test_a_replay_handed_over_mid_drain_is_not_charged_the_drains_eager_spans(
        tmp_path: Path) -> None:
    """The worker matches replay spans to the drain that hands them on: one submitted
    while a costly drain of eager spans runs belongs to the next drain, so the eager
    spans' cost is not taken as what a replay span costs."""
    from test_replay_template import _capture, _replay

    started = threading.Event()
    provider, tracer = _file_provider(tmp_path / "t.jsonl")
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01)
    capture, k = _capture(30), 0
    try:
        for round_ in range(8):
            for _ in range(10):
                k += 1
                r = CallRecord.for_call("eager", 0x55, 0x1000 + k, None, BASE)
                r.start_ns, r.end_ns = 1, 2
                r.add_pending(_Costly(started))
                pipeline.submit(r)
            started.clear()
            pipeline.wake()
            assert started.wait(10)  # the worker is resolving the eager spans (10 x 2 ms)
            pipeline.submit(_replay(capture, index=round_ + 1, replay_id=0x900 + round_))
            assert pipeline.flush(10)
        eager = pipeline.worker_cost_per_span_s
        replay = pipeline._replay_cost.value  # noqa: SLF001
        assert eager > 3e-4
        assert 0 < replay < eager / 20, (replay, eager)
    finally:
        pipeline.shutdown(5)


def test_a_hand_off_is_not_undone_by_the_workers_re_plan(monkeypatch) -> None:
    """The worker plans again when a provider's processors change; a hand-off to another
    provider plans on the caller's thread.  A drain between the hand-off's plan and its
    new tracer used to plan the old provider again, for good."""
    from otel_flashinfer import pipeline as pipeline_mod

    class Own(sampling.Sampler):  # the SDK's path, where the worker compares processors
        def should_sample(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "own"

    def provider_with(exporter: InMemorySpanExporter) -> TracerProvider:
        provider = TracerProvider(sampler=Own())
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider

    old_spans, new_spans = InMemorySpanExporter(), InMemorySpanExporter()
    old, new = provider_with(old_spans), provider_with(new_spans)
    pipeline = Pipeline(old.get_tracer("otel_flashinfer"), provider=old, interval_s=0.005)
    preset = pipeline_mod.preset_tracer_ids

    def slow_preset(tracer):  # noqa: ANN001, ANN202 - the worker drains meanwhile
        time.sleep(0.1)
        return preset(tracer)

    monkeypatch.setattr(pipeline_mod, "preset_tracer_ids", slow_preset)
    try:
        pipeline.provider = new
        pipeline._use_tracer(new.get_tracer("otel_flashinfer"))  # noqa: SLF001
        time.sleep(0.05)  # drains after the hand-off
        for i in range(5):
            r = CallRecord.for_call(f"after{i}", 0x99, 0x300 + i, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            pipeline.submit(r)
        assert pipeline.flush(10)
    finally:
        pipeline.shutdown(5)
    assert [s.name for s in new_spans.get_finished_spans()] == [f"after{i}" for i in range(5)]
    assert not old_spans.get_finished_spans()


def test_a_hand_off_mid_drain_loses_no_span(tmp_path: Path, monkeypatch) -> None:
    """A hand-off to another provider shuts the old encoder down.  It used to plan while
    the worker was in the middle of a drain, which went on encoding into the old
    encoder after its last flush: those spans were neither sent nor counted.  Now the
    hand-off waits for the drain; every span arrives at the old file or the new."""
    from otel_flashinfer import pipeline as pipeline_mod

    # Between the drain's two chunks, time for the old encoder's flush and stop.
    monkeypatch.setattr(pipeline_mod, "_YIELD_S", 0.2)
    monkeypatch.setattr(pipeline_mod, "_PASS_BUDGET_S", 5.0)
    started = threading.Event()
    pipeline: Pipeline | None = None

    class Slow(Describer):
        __slots__ = ()

        def attributes(self, data, kw, result):  # noqa: ANN001, ANN201
            started.set()
            old = old_native
            if int(data[0]) == 0:  # the hand-off comes while this drain goes on
                end = time.monotonic() + 0.5
                while pipeline._native is old and time.monotonic() < end:  # noqa: SLF001
                    time.sleep(0.001)
            return {"flashinfer.arg.i": int(data[0])}

    def file_provider(path: Path) -> tuple[TracerProvider, Any]:
        provider = TracerProvider(resource=Resource.create({"service.name": "native-test"}))
        provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(str(path)),
                                                       max_export_batch_size=20))
        return provider, provider.get_tracer("otel_flashinfer", "1.0")

    old_provider, old_tracer = file_provider(tmp_path / "old.jsonl")
    new_provider, new_tracer = file_provider(tmp_path / "new.jsonl")
    before = health.counters().get("spans_dropped", 0)
    pipeline = Pipeline(old_tracer, provider=old_provider, interval_s=0.01)
    old_native = pipeline._native  # noqa: SLF001
    assert old_native is not None and old_native.batch == 20
    describer = Slow(DESCRIBER.plan)
    try:
        for i in range(40):  # two chunks of the worker's drain
            r = CallRecord.for_call(f"call{i}", 0x77, 0x500 + i, None, BASE)
            r.start_ns, r.end_ns = 1, 2
            r.describe, r.data = describer, [i]
            pipeline.submit(r)
        pipeline.wake()
        assert started.wait(10)  # the worker is in its drain, encoding into the old
        pipeline.provider = new_provider
        pipeline._use_tracer(new_tracer)  # noqa: SLF001 - as runtime.provider_changed
        assert pipeline.flush(10)
    finally:
        pipeline.shutdown(5)
    names = [s["name"] for s in _spans_in(tmp_path / "old.jsonl")]
    if (tmp_path / "new.jsonl").exists():
        names += [s["name"] for s in _spans_in(tmp_path / "new.jsonl")]
    assert health.counters().get("spans_dropped", 0) == before
    assert sorted(names) == sorted(f"call{i}" for i in range(40))


_MUTATING_KEYS = textwrap.dedent("""
    import sys
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import SpanContext, TraceFlags
    from otel_flashinfer import export
    from otel_flashinfer.pipeline import _EMPTY, CallRecord

    tracer = TracerProvider(resource=Resource.create({})).get_tracer("x", "1")
    holder = {}

    class ClearsInner:
        def __str__(self):
            holder["inner"].clear()
            return "k"

    class ClearsOuter:
        def __str__(self):
            holder["outer"].clear()
            return "k"

    for fmt in ("protobuf", "json"):
        inner = {ClearsInner(): ["v" * 50, "w" * 50]}
        outer = [{ClearsOuter(): 1}, "y" * 40, "z" * 40]
        holder.update(inner=inner, outer=outer)
        r = CallRecord.for_call("n", 0x1234, 0x5678,
                                SpanContext(0xABC, 0x123, False, TraceFlags(1)),
                                {"a": inner, "b": outer})
        del inner, outer
        r.start_ns, r.end_ns = 1, 2
        encoder = export.make_encoder(tracer, fmt, CallRecord, _EMPTY)
        encoder.add(r)
        assert encoder.take() is not None
    print("survived")
""")


def test_attribute_values_that_change_while_written_do_not_crash_the_encoder() -> None:
    """A nested dict's key is turned into a str by Python (its ``__str__``), which may
    change or free the containers being written.  The encoder holds what it writes:
    it used to read freed memory (a crash under ``PYTHONMALLOC=debug``)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONMALLOC": "debug",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _MUTATING_KEYS], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "survived" in out.stdout, out.stderr[-2000:]


def test_an_encoder_is_not_reset_or_set_up_again_from_its_own_callback() -> None:
    """``reset()`` or ``__init__()`` from a describer, in the middle of a span, would
    leave the span's offsets pointing past an emptied batch (a corrupted heap)."""
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    seen = []

    class Resets(Describer):
        __slots__ = ()

        def attributes(self, data, kw, result):  # noqa: ANN001, ANN201
            for again in (encoder.reset, lambda: encoder.__init__("json", CallRecord)):
                try:
                    again()
                except RuntimeError as exc:
                    seen.append(str(exc))
            return {"flashinfer.arg.x": 1}

    for i in range(3):
        r = CallRecord.for_call(f"s{i}", 1, 2 + i, None, BASE)
        r.describe, r.data = Resets(DESCRIBER.plan), []
        encoder.add(r)
    assert seen == ["Encoder re-entered while encoding a span"] * 6
    spans = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
    got = spans.scope_spans[0].spans
    assert [s.name for s in got] == ["s0", "s1", "s2"]
    assert all({a.key for a in s.attributes} >= {"flashinfer.arg.x"} for s in got)
    encoder.reset()  # outside a span: allowed
    assert encoder.take() is None


def test_a_replay_whose_context_is_not_a_span_context_goes_to_python() -> None:
    from collections import deque

    from test_replay_template import _capture

    from otel_flashinfer.pipeline import ReplayRecord

    protos, _ = _capture(2).template()
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    for context in [(), (1,), (1, 2, 3, 4)]:
        r = ReplayRecord(0xAB, 5, None, 1, 2, {}, context, 3, protos, None)
        slow: list[Any] = []
        assert encoder.drain(deque([r]), slow, 1, deque(), 1.0, 2.0) == 0
        assert slow == [r]


def test_base_blocks_of_wrappers_made_and_dropped_are_not_kept_forever() -> None:
    """``traced(fn)`` called per request makes a new base dict each time; the encoder's
    cache of encoded base blocks is bounded, so it does not hold every dict ever seen."""
    tracer, _ = _sdk_tracer()
    encoder = export.make_encoder(tracer, "protobuf", CallRecord, _EMPTY)

    def span_of(base: dict) -> dict:
        encoder.add(CallRecord.for_call("f", 1, 2, None, base))
        span = ExportTraceServiceRequest.FromString(encoder.take()).resource_spans[0]
        return {a.key: a.value.string_value or a.value.int_value
                for a in span.scope_spans[0].spans[0].attributes}

    first = {"flashinfer.api": "f0", "flashinfer.level": 1}
    unheld = sys.getrefcount(first)
    assert span_of(first) == first
    assert sys.getrefcount(first) == unheld + 1  # cached while it is in use
    for i in range(1, 10_000):
        base = {"flashinfer.api": f"f{i}", "flashinfer.level": 1}
        assert span_of(base) == base
    assert sys.getrefcount(first) == unheld
    assert span_of(first) == first  # encoded again when it comes back


class _Never:
    """A payload or statistics that never come (a blob store down, a GPU that hung)."""

    def ready(self) -> bool:
        return False

    def apply(self, record: CallRecord) -> None:
        record.attributes["resolved"] = True

    def abandon(self, record: CallRecord, reason: str) -> None:
        record.attributes["given_up"] = reason


@pytest.mark.parametrize("native", [True, False])
def test_spans_still_waiting_at_shutdown_go_out_saying_so(tmp_path: Path, native: bool) -> None:
    """Calls whose payload or statistics had not come by the exit flush (a blob store
    down: their manifests retried for seconds) used to die with the worker, neither
    exported nor counted.  Shutdown now hands them on, each saying it was given up."""
    path = tmp_path / "t.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, native_export=native)
    for i in range(3):
        r = CallRecord.for_call("waits", 0x66, 0x300 + i, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        r.add_pending(_Never())
        pipeline.submit(r)
    r = CallRecord.for_call("done", 0x66, 0x400, None, BASE)
    r.start_ns, r.end_ns = 1, 2
    pipeline.submit(r)
    assert pipeline.shutdown(0.3)
    provider.force_flush(5_000)
    spans = {s["name"] + str(i): s for i, s in enumerate(_spans_in(path))}
    waited = [s for s in spans.values() if s["name"] == "waits"]
    assert len(waited) == 3 and len(spans) == 4
    for span in waited:
        attrs = {a["key"]: a["value"] for a in span["attributes"]}
        assert attrs["given_up"] == {"stringValue": "shutdown"}
        assert "resolved" not in attrs


class _NeverSlowly(_Never):
    """As ``_Never``, but looking takes a while (the worker holds the record then)."""

    def ready(self) -> bool:
        time.sleep(1e-3)
        return False


@pytest.mark.parametrize("native", [True, False])
def test_a_lone_waiting_span_is_not_lost_while_the_worker_looks_at_it(tmp_path: Path,
                                                                      native: bool) -> None:
    """The worker pops each waiting record to look at it: with one waiting, the list is
    empty just then, and shutdown took that for "nothing waits" (10 of 10 lost)."""
    for trial in range(5):
        path = tmp_path / f"t{trial}.jsonl"
        provider, tracer = _file_provider(path)
        pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, native_export=native)
        r = CallRecord.for_call("waits", 0x66, 0x300, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        r.add_pending(_NeverSlowly())
        pipeline.submit(r)
        pipeline.shutdown(0.3)
        provider.force_flush(5_000)
        spans = _spans_in(path) if path.exists() else []
        assert [s["name"] for s in spans] == ["waits"], trial


@pytest.mark.parametrize("native", [True, False])
def test_a_call_ending_during_shutdown_still_goes_out(tmp_path: Path, native: bool) -> None:
    """A record queued while shutdown hands on what waits (another thread's call ending)
    is drained by the worker's last pass; waiting, it is given up there too, and the
    sender is not stopped before that pass is handed to it."""
    path = tmp_path / "t.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.01, native_export=native)

    def waiting(i: int) -> CallRecord:
        r = CallRecord.for_call("waits", 0x66, 0x300 + i, None, BASE)
        r.start_ns, r.end_ns = 1, 2
        r.add_pending(_Never())
        return r

    pipeline.submit(waiting(0))
    pipeline.submit(waiting(1))
    flushes: list[float] = []

    def hook(timeout_s: float) -> bool:
        flushes.append(timeout_s)
        if len(flushes) == 2:  # during the give-up's flush
            pipeline.submit(waiting(2))
        return True

    pipeline.flush_hooks.append(hook)
    pipeline.shutdown(0.3)
    provider.force_flush(5_000)
    spans = _spans_in(path) if path.exists() else []
    assert sorted(s["spanId"] for s in spans) == [f"{0x300 + i:016x}" for i in range(3)]


class _CountedNever(_Never):
    """As ``_Never``, counting how often the worker looks."""

    def __init__(self) -> None:
        self.looks = 0

    def ready(self) -> bool:
        self.looks += 1
        return False


@pytest.mark.parametrize("native", [True, False])
def test_a_flush_waits_on_waiting_spans_at_the_workers_pace(tmp_path: Path,
                                                            native: bool) -> None:
    """A flush with spans waiting (payloads on a slow store) woke the worker after every
    drain, and every drain looked at every waiting span again: a spin, 4.7 s of CPU in
    a 5 s flush.  Waiting spans are looked at every ``_FLUSH_LOOK_S`` during a flush."""
    path = tmp_path / "t.jsonl"
    provider, tracer = _file_provider(path)
    pipeline = Pipeline(tracer, provider=provider, interval_s=0.05, native_export=native)
    pending = _CountedNever()
    r = CallRecord.for_call("waits", 0x66, 0x300, None, BASE)
    r.start_ns, r.end_ns = 1, 2
    r.add_pending(pending)
    pipeline.submit(r)
    assert not pipeline.flush(0.5)  # it never comes
    # Looks 5, 10, 20, 40 ms apart, then at the worker's 50 ms tick, for 0.5 s: about
    # 15, and the worker's own ticks and the submit's drain add as many; the spin made
    # thousands.
    assert 1 <= pending.looks <= 60, pending.looks
    # A flush still sends what is queued at once, and still waits for what waits.
    done = CallRecord.for_call("done", 0x66, 0x400, None, BASE)
    done.start_ns, done.end_ns = 1, 2
    pipeline.submit(done)
    assert not pipeline.flush(0.2)
    pipeline.shutdown(0.3)
    provider.force_flush(5_000)
    assert sorted(s["name"] for s in _spans_in(path)) == ["done", "waits"]
