"""The fast way out: records encoded natively (``csrc/otlp_encoder.c``) and handed to
the SDK exporters' own transports as bytes.

The SDK path rebuilds each record as a ``ReadableSpan`` and encodes it through
protobuf's Python objects, on threads that hold the GIL the engine needs: hundreds of
microseconds per span, several times a FlashInfer call.  Here the pipeline's worker
encodes a record in about a microsecond, and one sender thread ships whole requests:

- OTLP/HTTP through the exporter's own client (headers, compression, timeout,
  certificates, retry with backoff), over the SDK's urllib3 transport while the
  exporter's requests session would add nothing to a request (``http_direct``);
- OTLP/gRPC through the exporter's own channel and retry loop, with the request
  already serialized;
- our OTLP/JSON-lines file, one ``write`` per batch.

A sender that fell behind sends what queued up since at once (``_take``): JSON lines
in one ``writev`` (each line still one batch), and partial protobuf requests (cut by the
delay) concatenated into one of at most a batch (``resource_spans`` is a repeated
field; a user's OTEL_BSP_MAX_EXPORT_BATCH_SIZE still bounds every request).  Each send
costs the sender a GIL hand-over, and under a busy engine thread each take waits out
CPython's 5 ms switch interval: fewer sends leave the engine more of the GIL.  What one
send takes is capped at half the outbox, so that encoded spans in memory stay under
one and a half outboxes while the worker refills it.

Only setups whose result we reproduce exactly take it (``plan``): the SDK's
TracerProvider with Batch/Simple processors over those exporters, and a sampler
whose decision the caller's thread already made (``ALWAYS_ON``, and ``ParentBased``
over ``ALWAYS_ON``, ``ALWAYS_OFF`` or ``TraceIdRatioBased`` with its default parent
samplers: the SDK's default is ``ParentBased(ALWAYS_ON)``).
Anything else keeps the SDK path, so custom processors and samplers always apply.

Bounded: encoded requests wait in a deque capped in spans; past it the oldest request
is dropped, and every span lost on the way out (dropped, or refused by the receiver
after the exporter's retries) is counted in ``counters()["spans_dropped"]``.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import forking, health, http_direct, http_environment, otlp_response, threads
from .graph_sampling import CostEstimate

#: Spans per request (OTEL_BSP_MAX_EXPORT_BATCH_SIZE's default).
DEFAULT_BATCH = 512
#: Spans per request where nothing chose the batch size (the processors keep the SDK's
#: 512 and OTEL_BSP_MAX_EXPORT_BATCH_SIZE is unset).  An OTLP request costs the sender
#: about 170 to 250 us of CPU whatever it carries (gRPC and HTTP alike, on the CPU box):
#: 0.35 to 0.5 us a span at 512, about 0.2 at 1,024.  The SDK's 512 bounds the Python
#: objects it encodes at once; ours are bytes, bounded by ``REQUEST_BYTES`` too.  More
#: would hold more encoded spans in memory (open, queued and in flight): 2,048 took a
#: receiver outage's peak from 6.4 to 10 MB at level 3 (tests/test_outage.py), 1,024 to 7.4.
NATIVE_BATCH = 1024
#: Bytes one request may reach before it is cut, whatever the batch size (one record's
#: spans may pass it: a replay's children go in whole): under gRPC's default 4 MiB limit
#: on the receiving side, where statistics events make a span kilobytes.
REQUEST_BYTES = 2 * 1024 * 1024
#: Seconds a batch waits for more spans (OTEL_BSP_SCHEDULE_DELAY's default).
DEFAULT_DELAY_S = 5.0
#: Encoded spans waiting to be sent (a BatchSpanProcessor's max_queue_size sets it;
#: OTEL_BSP_MAX_QUEUE_SIZE's default).  Where nothing chose it, at least
#: ``OUTBOX_BATCHES`` batches.
DEFAULT_OUTBOX_SPANS = 2048
OUTBOX_BATCHES = 2
#: A send running longer than this is a receiver down or retrying, not a busy one: the
#: worker stops holding records back for it and the outbox drops its oldest (counted).
STALLED_S = 0.5
#: The most one coalesced request may carry: under gRPC's default 4 MiB message limit
#: on the receiving side (a request already over it is still sent alone).
COALESCE_BYTES = 4_000_000
#: The file takes more at once (one ``writev``).
COALESCE_FILE_BYTES = 16 * 1024 * 1024
#: Buffers one ``writev`` takes (Linux's IOV_MAX).
COALESCE_PARTS = 1024


@dataclass(frozen=True)
class Plan:
    """Which path a provider's spans take, and why (``Pipeline.export_reason``)."""

    fast: bool
    reason: str
    senders: tuple[Any, ...] = ()
    delay_s: float = 0.0
    batch: int = DEFAULT_BATCH
    outbox_spans: int = DEFAULT_OUTBOX_SPANS
    #: Requests the outbox keeps past ``outbox_spans`` (where the batch size is ours):
    #: a replay's children take a batch past its size, and two batches of 1,024 would
    #: otherwise not fit 2,048.
    outbox_requests: int = 1
    #: The provider's processors tuple this plan was made from (``setup_changed``).
    processors: Any = None


def _native_module() -> Any:
    try:
        from . import _otlp
    except ImportError:
        return None
    return _otlp


def sampler_is_ours(sampler: Any) -> bool:
    """Whether the caller's thread already made this sampler's decision exactly:
    ``runtime.sample_root`` decides roots, and a child follows its parent's sampled
    flag, which is what ``ParentBased`` with its default parent samplers does.  (A
    plain ratio or always-off sampler would also judge children; those setups keep
    the SDK path, which asks the sampler again.)"""
    from opentelemetry.sdk.trace import sampling

    if sampler is sampling.ALWAYS_ON:
        return True
    # The SDK's own subclasses (``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` makes a
    # ParentBasedTraceIdRatio) add nothing but their root: their fields say the rest.
    if type(sampler) in _PARENT_BASED:
        root = sampler._root  # noqa: SLF001
        return (
            (root is sampling.ALWAYS_ON or root is sampling.ALWAYS_OFF
             or type(root) is sampling.TraceIdRatioBased)
            and sampler._remote_parent_sampled is sampling.ALWAYS_ON  # noqa: SLF001
            and sampler._remote_parent_not_sampled is sampling.ALWAYS_OFF  # noqa: SLF001
            and sampler._local_parent_sampled is sampling.ALWAYS_ON  # noqa: SLF001
            and sampler._local_parent_not_sampled is sampling.ALWAYS_OFF  # noqa: SLF001
        )
    return False


def _parent_based() -> tuple[type, ...]:
    try:
        from opentelemetry.sdk.trace import sampling
    except ImportError:  # pragma: no cover
        return ()
    names = ("ParentBased", "ParentBasedTraceIdRatio", "_ParentBasedAlwaysOn",
             "_ParentBasedAlwaysOff")
    return tuple(getattr(sampling, n) for n in names if hasattr(sampling, n))


_PARENT_BASED = _parent_based()


def _unwrapped(exporter: Any) -> Any:
    """The exporter inside our provider's ``CountedExporter``, else ``exporter``."""
    from .provider import CountedExporter

    return exporter.inner if type(exporter) is CountedExporter else exporter


def sender_for(exporter: Any) -> Any:
    """A raw-bytes sender over this exporter's transport, or None (SDK path)."""
    from .otlp_json import JsonLinesSpanExporter

    exporter = _unwrapped(exporter)  # our provider's: the transport inside
    if type(exporter) is JsonLinesSpanExporter:
        return FileSender(exporter)
    module = type(exporter).__module__
    name = type(exporter).__name__
    if name != "OTLPSpanExporter":
        return None
    if module == "opentelemetry.exporter.otlp.proto.http.trace_exporter":
        client = getattr(exporter, "_client", None)
        if client is not None and callable(getattr(client, "export", None)):
            return HttpSender(exporter)
    if module == "opentelemetry.exporter.otlp.proto.grpc.trace_exporter":
        if all(hasattr(exporter, a) for a in ("_export", "_channel", "_stub", "_client",
                                              "_initialize_channel_and_stub")):
            return GrpcSender(exporter)
    return None


def plan(provider: Any, tracer: Any, enabled: bool = True) -> Plan:
    """The path for spans of ``tracer`` (from ``provider``): fast when the native
    encoder is built and every part of the setup is one we reproduce exactly
    (``enabled``: ``Settings.native_export``, OTEL_FLASHINFER_NATIVE_EXPORT)."""
    if not enabled:
        return Plan(False, "disabled")
    if _native_module() is None:
        return Plan(False, "no_extension")
    try:
        from opentelemetry.sdk.trace import Tracer, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:  # pragma: no cover
        return Plan(False, "no_sdk")
    if type(provider) is not TracerProvider or type(tracer) is not Tracer:
        return Plan(False, "foreign_provider")
    if not tracer._is_enabled():  # noqa: SLF001
        return Plan(False, "disabled_provider")
    if not sampler_is_ours(tracer.sampler):
        return Plan(False, "sampler")
    processors = getattr(tracer.span_processor, "_span_processors", None)
    if not processors:
        return Plan(False, "no_processors")
    senders = []
    # The processors' own settings (OTEL_BSP_*), the strictest where there are several;
    # the SDK's defaults only where no processor says.
    delay_s: float | None = None
    # Each processor's batch and queue sizes where chosen (passed, or from OTEL_BSP_*):
    # the SDK's defaults are ours to choose (``NATIVE_BATCH``).
    batches: list[int] = []
    chosen_batches: list[int] = []
    outboxes: list[int] = []
    for processor in processors:
        if type(processor) is SimpleSpanProcessor:
            exporter = processor.span_exporter
            delay_s = 0.0
        elif type(processor) is BatchSpanProcessor:
            inner = getattr(processor, "_batch_processor", None)
            exporter = getattr(inner, "_exporter", None)
            delay = getattr(inner, "_schedule_delay", None)
            if delay is not None:
                delay_s = float(delay) if delay_s is None else min(delay_s, float(delay))
            size = getattr(inner, "_max_export_batch_size", None)
            queue = getattr(inner, "_max_queue_size", None)
            chose_queue = bool(queue) and _chosen(int(queue), DEFAULT_OUTBOX_SPANS,
                                                  "OTEL_BSP_MAX_QUEUE_SIZE")
            if chose_queue:
                outboxes.append(int(queue))
            if size and _chosen(int(size), DEFAULT_BATCH, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"):
                batches.append(int(size))
                chosen_batches.append(int(size))
            elif chose_queue:  # ours, within a chosen queue (not under the SDK's batch)
                batches.append(min(NATIVE_BATCH, max(DEFAULT_BATCH,
                                                     int(queue) // OUTBOX_BATCHES)))
        else:
            return Plan(False, f"processor:{type(processor).__name__}")
        sender = sender_for(exporter) if exporter is not None else None
        if sender is None:
            return Plan(False, f"exporter:{type(_unwrapped(exporter)).__name__}")
        senders.append(sender)
    # The strictest where there are several.
    batch = min(batches) if batches else NATIVE_BATCH
    outbox = min(outboxes) if outboxes else max(DEFAULT_OUTBOX_SPANS, OUTBOX_BATCHES * batch)
    # Where the batch size or the queue size is ours (nobody's choice), the outbox keeps
    # two batches: a replay's overshoot must not make it drop the older one.  (A chosen
    # queue is passed by at most one replay's worth.)
    ours = not chosen_batches or batch < min(chosen_batches) or not outboxes
    return Plan(True, "fast", tuple(senders), DEFAULT_DELAY_S if delay_s is None else delay_s,
                batch, outbox, OUTBOX_BATCHES if ours else 1, processors)


def _chosen(value: int, default: int, var: str) -> bool:
    """Whether a processor's ``value`` was chosen (passed, or from ``var``) rather than
    the SDK's default: a processor keeps no trace of which, so the default's value with
    the variable unset reads as not chosen."""
    return value != default or bool(os.environ.get(var, "").strip())


# ---- senders: bytes -> the exporter's transport ------------------------------------------


class FileSender:
    """Our OTLP/JSON-lines file (``otlp_json.JsonLinesSpanExporter``)."""

    fmt = "json"
    max_coalesce = COALESCE_FILE_BYTES
    #: Lines stay separate requests: coalescing them does not grow a batch.
    joins_requests = False

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter

    def send(self, payload: bytes, count: int) -> bool:
        return self.exporter.write_line(payload)

    def send_parts(self, parts: list[bytes], count: int) -> bool:
        """Several lines in one system call."""
        return self.exporter.write_lines(parts)


class HttpSender:
    """OTLP/HTTP through the exporter's own client: its endpoint, headers, compression,
    timeout and retry with backoff, over its requests session, or over the SDK's
    urllib3 transport while that session would send the same request (``http_direct``:
    about half the sender's CPU a request)."""

    fmt = "protobuf"

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter
        limit = getattr(exporter, "_max_request_size", 0) or 0
        self.max_coalesce = min(COALESCE_BYTES, limit) if limit > 0 else COALESCE_BYTES
        #: The session's environment, read once in a while (``http_environment``): held
        #: from the first send, so that a sender made by a plan that is not used holds
        #: nothing; given back by ``close``.
        self._env: http_environment.CachedEnvironment | None = None
        self._held = False
        #: A copy of the exporter's client over the SDK's urllib3 transport while the
        #: session adds nothing to a request (``http_direct``), else None; asked again
        #: at ``_direct_at``.  ``transport`` says which one sends, ``direct_reason`` why.
        self._direct: Any = None
        self._direct_settings: http_direct.Direct | None = None
        self._direct_at = 0.0
        self.transport = "requests"
        self.direct_reason = "not_asked"
        self._closed = False

    def close(self) -> None:
        self._closed = True  # a sender still running (a join that timed out) goes on
        http_environment.release(self._env)  # through the session, and makes no pool
        self._env = None
        self._drop_direct()

    def after_fork(self) -> None:
        """In a forked child: a pool of its own, made at the next send (the parent's
        connections are the parent's; closing them here could end them there)."""
        self._drop_direct(close=False)
        self._direct_at = 0.0

    def _drop_direct(self, close: bool = True) -> None:
        direct, self._direct, self._direct_settings = self._direct, None, None
        self.transport = "requests"
        if direct is not None and close:
            try:
                direct._transport.close()  # noqa: SLF001
            except Exception:  # noqa: BLE001, S110 - its pool is only memory now
                pass

    def _client(self, exporter: Any) -> Any:
        """The client to send with: the direct copy while it applies."""
        now = time.monotonic()
        if now >= self._direct_at and not self._closed:
            self._direct_at = now + http_direct.REFRESH_S
            self._choose(exporter)
        direct = self._direct  # once: ``close`` on another thread may clear it
        return direct if direct is not None else exporter._client  # noqa: SLF001

    def _cookie_came(self) -> None:
        """A response set a cookie (now in the session's jar): ask again at once."""
        self._direct_at = 0.0

    def _choose(self, exporter: Any) -> None:
        client = exporter._client  # noqa: SLF001
        try:
            session = http_direct.requests_session(exporter)
            if session is None:
                settings, reason = None, "transport"
            else:
                settings, reason = http_direct.direct_settings(
                    session, client._endpoint, client._headers)  # noqa: SLF001
            if settings is not None and settings == self._direct_settings:
                return
            self._drop_direct()
            if settings is not None and not self._closed:
                direct = http_direct.direct_client(client, settings, session,
                                                   self._cookie_came)
                if direct is None:
                    reason = "no_urllib3_transport"
                else:
                    self._direct, self._direct_settings = direct, settings
                    self.transport = "urllib3"
                    if self._closed:  # closed meanwhile: no pool left behind
                        self._drop_direct()
            self.direct_reason = reason
        except Exception as exc:  # noqa: BLE001 - the session's own path still sends
            self._drop_direct()
            self.direct_reason = "error"
            health.report("export_errors", "could not check the OTLP/HTTP session for "
                          "urllib3's transport", exc)

    def send(self, payload: bytes, count: int) -> bool:
        exporter = self.exporter
        if getattr(exporter, "_shutdown", False):
            return False
        if not self._held:
            self._held = True
            try:
                self._env = http_environment.hold(exporter)
            except Exception as exc:  # noqa: BLE001 - requests then reads it each time
                health.report("export_errors", "could not keep the HTTP session's "
                              "environment settings", exc)
        limit = getattr(exporter, "_max_request_size", 0) or 0
        if limit > 0 and len(payload) > limit:
            health.report("export_too_large", f"an OTLP request of {len(payload)} bytes is "
                          f"over the exporter's max_request_size ({limit})")
            return False
        client = self._client(exporter)
        metrics = getattr(exporter, "_metrics", None)
        if metrics is None:
            return bool(client.export(payload).success)
        with metrics.export_operation(count) as result:
            outcome = client.export(payload)
            if not outcome.success:
                result.error = outcome.error
                return False
        return True


class _Encoded:
    """Serialized request bytes standing in for the spans the gRPC mixin expects."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload, self.count = payload, count


_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _RawTraceStub:
    """TraceServiceStub whose Export sends bytes already serialized (no protobuf
    objects): grpc passes a request through when the method has no serializer."""

    def __init__(self, channel: Any) -> None:
        # Each response read for spans the receiver took the request for but rejected.
        self.Export = channel.unary_unary(  # noqa: N815 - the stub's method name
            _GRPC_METHOD, request_serializer=None,
            response_deserializer=otlp_response.deserialize)


class GrpcSender:
    """OTLP/gRPC through a twin of the exporter: its endpoint, credentials, headers,
    timeout, compression and retry loop (``OTLPExporterMixin._export``), fed serialized
    bytes.

    The twin is a shallow copy with a channel of its own (the exporter's own code makes
    it from the same settings): the SDK closes and re-creates a channel after
    UNAVAILABLE, and a shared one would break the application's exporter, or ours."""

    fmt = "protobuf"
    max_coalesce = COALESCE_BYTES

    def __init__(self, exporter: Any) -> None:
        self.exporter = exporter
        twin = copy.copy(exporter)
        twin._stub = _RawTraceStub  # noqa: SLF001
        twin._translate_data = _payload_of  # noqa: SLF001
        twin._count_data = _count_of  # noqa: SLF001
        twin._initialize_channel_and_stub()  # noqa: SLF001 - our own channel
        self.twin = twin

    def close(self) -> None:
        channel = getattr(self.twin, "_channel", None)
        if channel is not None:
            channel.close()

    def send(self, payload: bytes, count: int) -> bool:
        if getattr(self.exporter, "_shutdown", False):
            return False
        from opentelemetry.sdk.trace.export import SpanExportResult

        return self.twin._export(_Encoded(payload, count)) == SpanExportResult.SUCCESS  # noqa: SLF001


def _payload_of(data: _Encoded) -> bytes:
    return data.payload


def _count_of(data: _Encoded) -> int:
    return data.count


# ---- the native export path ------------------------------------------------------------


def _encoder_parts(tracer: Any) -> tuple[bytes, bytes, str, str, bytes, bytes]:
    """Resource and scope as the SDK's encoder writes them: protobuf bodies, and the
    OTLP/JSON fragments of the same messages."""
    import json

    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common._internal import (
        _encode_instrumentation_scope,
        _encode_resource,
    )

    resource = _encode_resource(tracer.resource)
    scope = _encode_instrumentation_scope(tracer._instrumentation_scope)  # noqa: SLF001

    def to_json(message: Any) -> bytes:
        data = json_format.MessageToDict(message, use_integers_for_enums=True)
        return json.dumps(data, separators=(",", ":")).encode()

    return (resource.SerializeToString(), scope.SerializeToString(),
            tracer.resource.schema_url or "",
            getattr(tracer._instrumentation_scope, "schema_url", None) or "",  # noqa: SLF001
            to_json(resource), to_json(scope))


def _state_header(state: Any) -> str:
    """A span's trace state as the SDK's encoder writes it."""
    return ",".join(f"{key}={value}" for key, value in state.items())


def make_encoder(tracer: Any, fmt: str, record_type: Any, empty: Any) -> Any:
    """A native encoder for ``tracer``'s resource, scope and span limits, reading
    records of ``record_type`` (``pipeline.CallRecord``, whose shared empty tuple is
    ``empty``: the pipeline hands both over, so this module never imports it)."""
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE

    from . import _otlp
    from .stats.decode import RawStats

    res_pb, scope_pb, res_schema, scope_schema, res_js, scope_js = _encoder_parts(tracer)
    limits = tracer._span_limits  # noqa: SLF001

    def limit(value: Any) -> int:
        return -1 if value is None else int(value)

    return _otlp.Encoder(
        fmt, record_type, empty, DEFAULT_TRACE_STATE, _state_header,
        res_pb if fmt == "protobuf" else res_js, scope_pb if fmt == "protobuf" else scope_js,
        res_schema, scope_schema, limit(limits.max_span_attributes),
        limit(limits.max_events), limit(limits.max_links), RawStats)


class NativeExport:
    """Encodes records on the pipeline's worker and sends whole requests from a thread
    of its own, so a slow or dead receiver never holds the worker (or a caller)."""

    def __init__(self, tracer: Any, chosen: Plan, record_type: Any, empty: Any) -> None:
        self.plan = chosen
        #: The provider's processors the plan was made from (read before planning, so
        #: one added meanwhile is planned at the next drain): the SDK replaces the tuple
        #: when one is added, and a changed setup must be planned again (``setup_changed``).
        self._processors = chosen.processors
        self._span_processor = tracer.span_processor
        formats = sorted({s.fmt for s in chosen.senders})
        self.encoders = {fmt: make_encoder(tracer, fmt, record_type, empty) for fmt in formats}
        self.senders = {fmt: [s for s in chosen.senders if s.fmt == fmt] for fmt in formats}
        self.batch = max(1, chosen.batch)
        #: Bytes at which each format's open batch is cut: ``REQUEST_BYTES``, or half the
        #: least its senders take at once (an HTTP exporter's ``max_request_size``), since
        #: the record that crosses it still goes in.
        self.batch_bytes = {fmt: min([REQUEST_BYTES] + [
            max(1, s.max_coalesce // 2) for s in senders if getattr(s, "max_coalesce", 0)])
            for fmt, senders in self.senders.items()}
        self.delay_s = chosen.delay_s
        # Each format's requests wait in the one outbox: its bounds are per format.
        self.outbox_spans = max(self.batch, chosen.outbox_spans) * len(formats)
        self.outbox_requests = max(1, chosen.outbox_requests) * len(formats)
        #: What one send of each format may take at once (``_take``).
        self._coalesce = {fmt: self._coalesce_limits(senders)
                          for fmt, senders in self.senders.items()}
        #: The encoders are not thread-safe (a describe callback can hand the GIL over
        #: in the middle of a span): the worker's drain/add and a flush's take share it.
        self._enc_lock = threading.RLock()
        self._opened = 0.0  # monotonic time the open batch got its first span
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        self._queued = 0
        self._stopping = False
        #: The sender thread's CPU per span sent (``CostEstimate``: its first send,
        #: opening the file or the connection, left out) for ``REPLAY_EVERY=auto``.
        self._cost = CostEstimate()
        #: Everything the sender thread has run so far, its waits' waking included
        #: (written by it alone): the worker prices replay spans with its growth.
        self.cpu_s = 0.0
        #: Requests sent, their wall time in all and the longest (benchmarks print them:
        #: a send longer than the outbox's worth of spans is what makes it drop).
        self.sends = 0
        self.send_wall_s = 0.0
        self.send_wall_max_s = 0.0
        self._make_conditions()
        self._start_sender()
        forking.redo_in_child(self, "after_fork")

    def _coalesce_limits(self, senders: list[Any]) -> tuple[int, int, int]:
        """(bytes, spans, requests) one send of these senders may take at once."""
        nbytes = min(getattr(s, "max_coalesce", 0) for s in senders)
        joins = any(getattr(s, "joins_requests", True) for s in senders)
        spans = self.batch if joins else max(self.batch, self.outbox_spans // 2)
        return nbytes, spans, COALESCE_PARTS

    def _make_conditions(self) -> None:
        """The outbox's lock and conditions: made once (and again in a forked child), so
        that a restarted sender shares them with a worker already waiting on them."""
        self._cond = threading.Condition()
        #: Signalled when the sender takes a request off the outbox (``wait_for_room``).
        self._taken = threading.Condition(self._cond._lock)  # noqa: SLF001 - one lock

    def _start_sender(self) -> None:
        """A sender thread for the current outbox (its conditions outlive it)."""
        self._busy = False
        self._in_flight = 0
        #: Shut down with a send still running: what it carried is already counted.
        self._abandoned = False
        self._send_started = 0.0
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="otel_flashinfer-export",
                                        daemon=True)
        threads.start(self._thread)

    def after_fork(self) -> None:
        """In a forked child (idempotent: the pipeline's own hook calls it first, before
        anything takes the lock, which the fork may have copied while held)."""
        if self._pid == os.getpid():
            return
        self._enc_lock = threading.RLock()
        for encoder in self.encoders.values():
            encoder.reset()
        self._outbox = deque()  # the parent's requests are the parent's to send
        self._queued = 0
        self._make_conditions()  # the fork may have copied them held
        for senders in self.senders.values():
            for sender in senders:
                if hasattr(sender, "after_fork"):
                    sender.after_fork()
        if self._stopping:
            self._pid = os.getpid()
            return
        self._start_sender()

    def setup_changed(self) -> bool:
        """Whether the provider's processors changed since the plan (one was added)."""
        return getattr(self._span_processor, "_span_processors", None) is not self._processors

    def set_extra(self, attributes: dict[str, Any]) -> None:
        with self._enc_lock:
            for encoder in self.encoders.values():
                encoder.set_extra(attributes or None)

    # ---- worker thread ------------------------------------------------------------------

    def drain(self, queue: deque[Any], slow: list[Any], limit: int,
              later: deque[Any] | None = None, now: float = 0.0, deadline: float = 0.0,
              hold: bool = False) -> bool:
        """Encode up to ``limit`` ready records of ``queue``; statistics still on the GPU
        go back on ``later`` until their deadline (one encoder only), the rest to
        ``slow``.  A batch is cut whenever it is full: a replay record carries a span per
        captured call, so a drain of queued replays would otherwise make one request of
        millions of spans.  With ``hold``, stops (False) when the outbox has no room for
        another batch and its sender is busy, not stalled: the records left wait in the
        pipeline's queue rather than be encoded only for the outbox to drop them.  Never
        waits (the worker calls it inside its GPU-query section)."""
        encoders = list(self.encoders.values())
        if len(encoders) == 1:
            encoder = encoders[0]
            fmt = next(iter(self.encoders))
            while limit > 0:
                if self._full(fmt, encoder):
                    self._cut(force=False)
                if hold and queue and not self.has_room():
                    return False
                with self._enc_lock:
                    encoder.drain(queue, slow, limit, later, now, deadline, self.batch,
                                  self.batch_bytes[fmt])
                    taken = encoder.taken
                limit -= taken
                if not taken or not self._full(fmt, encoder):
                    return True  # the queue or the limit ran out
        else:  # several formats: each record once through each encoder
            records = [queue.popleft() for _ in range(min(limit, len(queue)))]
            for record in records:
                if record.pending or record.gpu is not None or \
                        getattr(record, "template", None) is not None:
                    slow.append(record)  # a replay's children are expanded there too
                    continue
                try:
                    self.add(record)
                except Exception:  # noqa: BLE001 - the Python path reports it, as above
                    slow.append(record)
        return True

    def has_room(self) -> bool:
        """Room in the outbox for another batch and its overshoot (a replay's children
        past the batch size), or a sender stalled or gone (then nothing is held back)."""
        with self._cond:
            return self._fits(2 * self.batch) or self._stalled()

    def wait_for_room(self, timeout_s: float) -> bool:
        """Wait until ``has_room``, up to ``timeout_s``.  On the worker between passes,
        outside its GPU-query section; never on a caller's thread."""
        with self._cond:
            return self._wait_locked(2 * self.batch, time.monotonic() + timeout_s)

    def _fits(self, spans: int) -> bool:
        return not self._queued or self._queued + spans <= self.outbox_spans

    def _stalled(self) -> bool:
        return not self._thread.is_alive() or (
            self._busy and time.monotonic() >= self._send_started + STALLED_S)

    def _wait_locked(self, spans: int, end: float) -> bool:
        """Under the outbox's lock: wait until ``spans`` more fit, the sender stalls or
        is gone, or ``end`` passes (False only for the last)."""
        while not self._fits(spans) and not self._stalled():
            now = time.monotonic()
            if now >= end:
                return False
            stalled_at = self._send_started + STALLED_S if self._busy else end
            self._taken.wait(min(end, stalled_at) - now)
        return True

    def end_drain(self) -> None:
        """After the worker's pass: ship full batches, and older ones past the delay."""
        self._cut(force=False)

    def add(self, record: Any) -> None:
        """Encode one record whose pending work is done (raises what failed)."""
        describe = record.describe
        if describe is not None and getattr(type(describe), "attributes", None) is None:
            record.own()
            try:
                describe(record)  # a description the encoder cannot call, in Python
            except Exception as exc:  # noqa: BLE001 - the span goes out without it
                health.report("describe_errors", "could not describe arguments", exc)
            record.describe = None
        full = False
        with self._enc_lock:
            for fmt, encoder in self.encoders.items():
                encoder.add(record)
                full = full or self._full(fmt, encoder)
        if full:  # the time-based cut waits for the end of the drain
            self._cut(force=False)

    def _cut(self, force: bool, until: float = 0.0) -> None:
        """Move full (or, past the delay, any) open batches to the outbox.  A partial
        batch stays open while the outbox is full.  Requests are queued outside the
        encoder lock: a flush waiting for room (until ``until``) must not hold up the
        worker, which drains inside its GPU-query section."""
        now = time.monotonic()
        cut: list[tuple[str, bytes, int]] = []
        with self._enc_lock:
            for fmt, encoder in self.encoders.items():
                count = encoder.count
                if not count:
                    continue
                if not self._opened:
                    self._opened = now
                if force or self._full(fmt, encoder) or (now - self._opened >= self.delay_s
                                                    and self.has_room()):
                    payload = encoder.take()
                    if payload is not None:
                        cut.append((fmt, payload, count))
            if all(not e.count for e in self.encoders.values()):
                self._opened = 0.0
        for fmt, payload, count in cut:
            self._enqueue(fmt, payload, count, until)

    def _full(self, fmt: str, encoder: Any) -> bool:
        """Whether ``encoder``'s open batch (of ``fmt``) is due to go: a batch of
        spans, or ``batch_bytes`` of them."""
        return encoder.count >= self.batch or encoder.size >= self.batch_bytes[fmt]

    def due_in(self) -> float | None:
        """Seconds until the open batch is due to the sender (``delay_s`` after its
        first span; 0.0 when overdue), or None when no batch is open: the worker's
        idle sleep ends then, since only a drain hands a batch on."""
        opened = self._opened
        return None if not opened else max(0.0, opened + self.delay_s - time.monotonic())

    def _enqueue(self, fmt: str, payload: bytes, count: int, until: float = 0.0) -> None:
        """Queue a request; past the outbox's cap the oldest go, counted.  With
        ``until`` (a flush), first wait for room up to then."""
        with self._cond:
            if until:
                self._wait_locked(count, until)
            self._outbox.append((fmt, payload, count))
            self._queued += count
            dropped = 0
            while self._queued > self.outbox_spans and len(self._outbox) > self.outbox_requests:
                _, _, lost = self._outbox.popleft()
                self._queued -= lost
                dropped += lost
            self._cond.notify_all()  # the sender, not only a flush waiting on the same
        if dropped:
            health.report("spans_dropped", "spans are not leaving fast enough (receiver slow "
                          "or down): dropping the oldest", n=dropped)

    # ---- sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value

        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))  # never trace ourselves
        try:
            while True:
                # A send's CPU counts from before its wait: waking costs CPU too, and
                # ``auto`` charges tracing what it costs on every thread.
                cpu = time.thread_time()
                with self._cond:
                    while not self._outbox and not self._stopping:
                        self._cond.wait()
                    if not self._outbox:
                        return
                    fmt, parts, count = self._take()
                    self._queued -= count
                    self._in_flight = count
                    self._busy = True
                    self._send_started = time.monotonic()
                    self._taken.notify_all()
                wall = time.perf_counter()
                try:
                    self._send(fmt, parts, count)
                finally:
                    parts = None  # not held while the next wait
                    wall = time.perf_counter() - wall
                    self.sends += 1
                    self.send_wall_s += wall
                    self.send_wall_max_s = max(self.send_wall_max_s, wall)
                    spent = time.thread_time() - cpu
                    self.cpu_s += spent
                    if count > 0:  # a write or a request holds the GIL too: auto budgets it
                        self._cost.add(spent / count)
                    with self._cond:
                        self._busy = False
                        self._in_flight = 0
                        self._cond.notify_all()
        finally:
            detach(token)

    @property
    def cost_per_span_s(self) -> float:
        return self._cost.value

    def carry_cost(self, previous: NativeExport) -> None:
        """After a re-plan: this sender's cost per span is ``previous``'s until its own
        sends say (``REPLAY_EVERY=auto`` prices replay spans with it)."""
        self._cost.carry(previous._cost)  # noqa: SLF001 - the same class

    def _take(self) -> tuple[str, list[bytes], int]:
        """Under the outbox's lock: the oldest request, with the later ones of its format
        that fit the format's limits in bytes, spans and requests (other formats keep
        their places)."""
        outbox = self._outbox
        fmt, payload, count = outbox.popleft()
        parts, size = [payload], len(payload)
        max_bytes, max_spans, max_parts = self._coalesce.get(fmt, (0, 0, 0))
        if max_bytes and outbox:
            others: list[tuple[str, bytes, int]] = []
            while outbox:
                item = outbox[0]
                if item[0] != fmt:
                    others.append(outbox.popleft())
                elif (size + len(item[1]) <= max_bytes and count + item[2] <= max_spans
                      and len(parts) < max_parts):
                    outbox.popleft()
                    parts.append(item[1])
                    size += len(item[1])
                    count += item[2]
                else:
                    break
            outbox.extendleft(reversed(others))
        return fmt, parts, count

    def _send(self, fmt: str, parts: list[bytes], count: int) -> None:
        joined = None
        for sender in self.senders[fmt]:
            try:
                send_parts = getattr(sender, "send_parts", None)
                if send_parts is not None:
                    ok = send_parts(parts, count)
                else:
                    if joined is None:
                        joined = parts[0] if len(parts) == 1 else b"".join(parts)
                        if not any(hasattr(s, "send_parts") for s in self.senders[fmt]):
                            parts.clear()  # held once while it is sent, not twice
                    ok = sender.send(joined, count)
            except Exception as exc:  # noqa: BLE001 - a transport must not kill the thread
                health.report("export_errors", f"sending spans through {type(sender).__name__} "
                              "failed", exc)
                ok = False
            if not ok:
                with self._cond:  # a shutdown's count of what is in flight takes it too
                    counted = self._abandoned  # counted when it was given up
                    self._in_flight = 0
                if not counted:
                    health.report("spans_dropped", "a batch of spans was not taken after "
                                  "the exporter's retries (receiver down or refusing)",
                                  n=count)

    # ---- flush / shutdown ---------------------------------------------------------------

    def flush(self, deadline: float) -> bool:
        """Send everything encoded so far; False if ``deadline`` (monotonic) passed."""
        if os.getpid() != self._pid:
            self.after_fork()
        elif not self._thread.is_alive():
            self._stopping = False
            self._start_sender()  # keeps the outbox: what is queued still goes out
        self._cut(force=True, until=deadline)
        with self._cond:
            while self._outbox or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def shutdown(self, timeout_s: float) -> bool:
        ok = self.flush(time.monotonic() + timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout_s))
        if not ok:
            self._count_left()
        for senders in self.senders.values():
            for sender in senders:
                close = getattr(sender, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as exc:  # noqa: BLE001
                        health.report("export_errors", "could not close a sender", exc)
        return ok

    def _count_left(self) -> None:
        """After a shutdown whose flush ran out of time: the spans still in the open
        batches, the outbox and the send in flight will not leave with us (the sender
        is a daemon), so they are counted dropped now.  A send that still gets through
        after this was counted too: the count errs high, never low."""
        with self._enc_lock:
            left = sum(encoder.count for encoder in self.encoders.values())
        with self._cond:
            left += self._queued + (self._in_flight if self._busy else 0)
            self._outbox.clear()
            self._queued = 0
            self._abandoned = True
        if left:
            health.report("spans_dropped", "spans still waiting to be sent when tracing "
                          "shut down (receiver slow or down)", n=left)

    def counts(self) -> tuple[int, int, int, int]:
        """What the encoders did so far, each span once whatever the number of formats:
        (spans encoded, graph replays' spans written whole from their templates,
        attributes and argument descriptions left out of their spans).  One read of
        each encoder's stats per drain."""
        stats = [encoder.stats() for encoder in self.encoders.values()]
        return (max(s["encoded"] for s in stats),
                max(s["replays"] + s["replay_children"] for s in stats),
                max(s["attribute_errors"] for s in stats),
                max(s["describe_errors"] for s in stats))

    def encoded(self) -> int:
        """Spans encoded so far."""
        return self.counts()[0]


def native_export_for(provider: Any, tracer: Any, record_type: Any, empty: Any,
                      on_plan: Callable[[Plan], None] | None = None,
                      enabled: bool = True) -> NativeExport | None:
    """The native path for this provider, or None where the SDK path must serve it."""
    try:
        chosen = plan(provider, tracer, enabled)
    except Exception as exc:  # noqa: BLE001 - a setup we cannot read takes the SDK path
        health.report("export_plan_errors", "could not inspect the tracer provider", exc)
        chosen = Plan(False, "error")
    if on_plan is not None:
        on_plan(chosen)
    if not chosen.fast:
        return None
    try:
        return NativeExport(tracer, chosen, record_type, empty)
    except Exception as exc:  # noqa: BLE001
        health.report("export_plan_errors", "the native span encoder did not start", exc)
        return None
