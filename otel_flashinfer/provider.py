"""Which TracerProvider our spans go through.

The application's own provider always wins, so its samplers, processors and
exporters apply.  Only when none is set do we build one, from the standard
``OTEL_*`` variables read by the SDK and the OTLP exporters themselves; with no
exporter and no endpoint configured, spans go to a local OTLP/JSON-lines file.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from . import forking, health, threads
from .config import ConfigError
from .otlp_json import JsonLinesSpanExporter

_lock = threading.Lock()
_ours: TracerProvider | None = None

_PROTOCOLS = ("grpc", "http/protobuf")


def sdk_disabled(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP protocol for traces: the traces-specific variable, then the general one,
    then ``grpc`` (the Python SDK's default for ``otlp``)."""
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(var, "").strip()
        if value:
            if value not in _PROTOCOLS:
                raise ConfigError(f"{var}={value!r}: must be grpc or http/protobuf (the "
                                  "Python OTLP exporter has no http/json)")
            return value
    return "grpc"


_EXPORTERS = ("otlp", "console", "none", "otlp_file", "otlp_proto_grpc", "otlp_proto_http")
#: Where the SDK finds exporters by their OTEL_TRACES_EXPORTER name (zipkin, vendors').
_EXPORTER_GROUP = "opentelemetry_traces_exporter"


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """``OTEL_TRACES_EXPORTER`` as a list; unset means ``otlp`` when an endpoint is set,
    else our local file (``otlp_file``)."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if raw:
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
        for name in names:
            if name not in _EXPORTERS and not _entry_point(_EXPORTER_GROUP, name):
                raise ConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: unknown exporter {name!r} "
                                  f"(known: {', '.join(sorted(_EXPORTERS))}, or one a "
                                  "package registers)")
        return [n for n in names if n != "none"]
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ["otlp"]
    return ["otlp_file"]


_COMPRESSIONS = {"http": ("gzip", "deflate", "none"), "grpc": ("gzip",)}


def _read(environ: Mapping[str, str], pair: tuple[str, str], http: bool
          ) -> tuple[str, str] | None:
    """(variable, value) of the pair (traces-specific, generic) that the exporter will
    read: the traces one wherever it is set, else the generic one; None if neither.
    The gRPC exporter reads an empty value as a value (and fails), the HTTP one as
    unset."""
    for var in pair:
        raw = environ.get(var)
        if raw is not None and (raw.strip() or not http):
            return var, raw
    return None


def check_otlp_env(environ: Mapping[str, str], http: bool) -> None:
    """``ConfigError`` naming the ``OTEL_EXPORTER_OTLP_*`` variable the SDK's exporter
    would refuse with a message that names none, or would take and then fail every
    export with (an HTTP endpoint without a scheme, a timeout of 0 or inf).  Only the
    value the exporter reads is checked (a traces-specific one hides the generic)."""
    kind = "http" if http else "grpc"
    found = _read(environ, ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
                  http)
    if found is not None:
        var, raw = found
        try:
            ok = 0 < float(raw) < math.inf
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{var}={raw!r}: must be a number of seconds > 0 (unset: 10)")
    found = _read(environ, ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                            "OTEL_EXPORTER_OTLP_COMPRESSION"), http)
    if found is not None:
        var, raw = found
        if raw.strip().lower() not in _COMPRESSIONS[kind]:
            raise ConfigError(f"{var}={raw!r}: OTLP/{'HTTP' if http else 'gRPC'} takes "
                              f"{', '.join(_COMPRESSIONS[kind])} (unset: none)")
    if http:
        for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            raw = environ.get(var, "").strip()
            if raw and not raw.lower().startswith(("http://", "https://")):
                raise ConfigError(f"{var}={raw!r}: an OTLP/HTTP endpoint needs http:// or "
                                  "https://")


_BSP_VARS = ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_SCHEDULE_DELAY",
             "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_EXPORT_TIMEOUT")


def check_bsp_env(environ: Mapping[str, str]) -> None:
    """``ConfigError`` naming an ``OTEL_BSP_*`` value our provider's BatchSpanProcessor
    would refuse (0, a batch over the queue) or that the SDK replaces by its default
    with only a log line (not a whole number)."""
    values = {}
    for var in _BSP_VARS:
        raw = environ.get(var)
        if raw is None or not raw.strip():
            continue
        try:
            values[var] = int(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: must be a whole number > 0") from None
        # The export timeout is not used by the SDK, and 0 means no limit.
        least = 0 if var == "OTEL_BSP_EXPORT_TIMEOUT" else 1
        if values[var] < least:
            raise ConfigError(f"{var}={raw!r}: must be a whole number >= {least}")
    # The SDK's defaults (export.DEFAULT_BATCH, DEFAULT_OUTBOX_SPANS: that module
    # reaches this one, so not imported from there).
    batch = values.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
    queue = values.get("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    if batch > queue:
        raise ConfigError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch} is more than "
                          f"OTEL_BSP_MAX_QUEUE_SIZE={queue}")


_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
             "parentbased_always_off", "parentbased_traceidratio")


def check_sampler_env(environ: Mapping[str, str]) -> None:
    """``ConfigError`` for an ``OTEL_TRACES_SAMPLER`` the SDK would replace by
    always-on, or a ratio it would replace by 1.0, with only a log line: tracing
    every call where the user asked for a share is not a silent fallback to keep."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip()
    # Only the SDK's own: its TracerProvider() does not load samplers packages register.
    if name and name.lower() not in _SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r}: unknown sampler (the SDK's: "
                          f"{', '.join(_SAMPLERS)})")
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if raw and name.lower() in ("traceidratio", "parentbased_traceidratio"):
        try:
            ok = 0.0 <= float(raw) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: {name} takes a ratio "
                              "from 0 to 1")


def _entry_point(group: str, name: str) -> Any:
    """The entry point ``name`` of ``group`` a package registers, or None."""
    from importlib.metadata import entry_points

    try:
        found = entry_points(group=group, name=name)
    except Exception:  # noqa: BLE001 - broken metadata: as if not registered
        return None
    return next(iter(found), None)


def _checked_name(name: str, env: Mapping[str, str]) -> str:
    """An ``OTEL_TRACES_EXPORTER`` name with ``otlp`` resolved by its protocol; an OTLP
    exporter's settings checked (``ConfigError`` naming what is wrong)."""
    if name == "otlp":
        name = "otlp_proto_http" if otlp_protocol(env) == "http/protobuf" else "otlp_proto_grpc"
    if name in ("otlp_proto_grpc", "otlp_proto_http"):
        check_otlp_env(env, http=name == "otlp_proto_http")
    return name


def check_env(environ: Mapping[str, str] | None = None) -> None:
    """``ConfigError`` for an ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*`` value
    that building our provider would refuse: checked when tracing turns on, without
    building it yet (the application may still set its own)."""
    env = os.environ if environ is None else environ
    for name in exporter_names(env):
        _checked_name(name, env)
    check_bsp_env(env)
    check_sampler_env(env)


class CountedExporter(SpanExporter):
    """Our provider's OTLP exporter, counting the spans of every batch it fails to
    send (``spans_dropped``): on the SDK path the BatchSpanProcessor ignores what an
    export returns and only logs what it raises.  The native path sends through
    ``inner``'s transport and counts its own failures (``export.sender_for``)."""

    #: It counts the spans it fails to send itself: ``export_watch`` leaves it be.
    counts_drops = True

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        #: Spans of the batch being sent now: lost if the process ends meanwhile
        #: (``left_behind``).
        self.sending = 0
        #: Set by ``write_off``: what fails after it was counted there already.
        self.written_off = False
        self._lock = threading.Lock()
        forking.redo_in_child(self, "_after_fork")

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's sender may have held it
        self.sending = 0

    def export(self, spans: Any) -> SpanExportResult:
        with self._lock:
            self.sending = len(spans)
        failed, error = True, None
        try:
            result = self.inner.export(spans)
            failed = result is not SpanExportResult.SUCCESS
            return result
        except Exception as exc:  # counted; the processor logs it too
            error = exc
            raise
        finally:
            # One look under the lock: either the exit's ``write_off`` took this batch
            # (it counts it) or this counts it, never both, never neither.
            with self._lock:
                self.sending = 0
                ours = not self.written_off
            if failed and ours:
                inner = type(self.inner)
                health.report("spans_dropped", f"{inner.__module__}.{inner.__qualname__} "
                              "did not send a batch (after its retries)", error,
                              n=len(spans))

    def write_off(self) -> int:
        """The exit gave up on us: the spans being sent now, counted by the caller;
        from now on nothing this exporter fails is counted again."""
        with self._lock:
            self.written_off = True
            return self.sending

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        # The SDK's processors pass a timeout to exporters that take one (by signature).
        if "timeout_millis" in inspect.signature(self.inner.shutdown).parameters:
            self.inner.shutdown(timeout_millis=timeout_millis)
        else:
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def make_exporter(name: str, environ: Mapping[str, str], traces_file: str) -> SpanExporter:
    """One span exporter by its ``OTEL_TRACES_EXPORTER`` name; OTLP exporters read
    their endpoint, headers, timeout and TLS settings from the environment."""
    name = _checked_name(name, environ)
    if name == "otlp_proto_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return CountedExporter(OTLPSpanExporter())
    if name == "otlp_proto_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return CountedExporter(OTLPSpanExporter())
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp_file":
        return JsonLinesSpanExporter(traces_file)
    # A package's own (the SDK makes them the same way: the class, no arguments).
    found = _entry_point(_EXPORTER_GROUP, name)
    if found is None:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}")
    try:
        return CountedExporter(found.load()())
    except Exception as exc:  # noqa: BLE001 - the package's own failure, named
        raise ConfigError(f"OTEL_TRACES_EXPORTER: exporter {name!r} ({found.value}) could "
                          f"not be made: {type(exc).__name__}: {exc}") from None


def process_resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME plus which process and rank we are."""
    attributes: dict[str, Any] = {}
    try:
        from .resource import process_resource_attributes

        attributes.update(process_resource_attributes(os.environ))
    except ImportError:
        attributes["process.pid"] = os.getpid()
    return Resource.create(attributes)


def build_provider(traces_file: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """A provider configured from the environment (sampler, span limits and BSP settings
    are read by the SDK itself)."""
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    # We shut it down ourselves at exit, after flushing what is still in flight.
    provider = TracerProvider(resource=process_resource(), shutdown_on_exit=False)
    for name in names:
        exporter = make_exporter(name, env, traces_file)
        try:
            # its worker thread (and the one a forked child starts) masked as ours are
            processor = threads.made_blocked(functools.partial(BatchSpanProcessor, exporter))
        except ValueError as exc:  # the SDK's message names no variable
            bsp = {k: v for k, v in env.items() if k.startswith("OTEL_BSP_")}
            raise ConfigError(f"OTEL_BSP_* settings {bsp}: {exc}") from None
        provider.add_span_processor(processor)
    return provider


def resolve_provider(traces_file: str) -> Any:
    """The application's provider if it set one, else ours (built once, set globally)."""
    global _ours
    current = trace_api.get_tracer_provider()
    # The start-up hand-off (handoff.py): the SDK provider behind it, so that the span
    # pipeline keeps its fast path and its preset ids.
    target = getattr(current, "otel_flashinfer_target", None)
    if target is not None:
        return target
    if not isinstance(current, trace_api.ProxyTracerProvider):
        return current
    with _lock:
        if _ours is not None:
            return _ours
        if sdk_disabled():
            return current
        provider = build_provider(traces_file)
        trace_api.set_tracer_provider(provider)
        # Another thread may have won the race to set the global provider.
        current = trace_api.get_tracer_provider()
        if current is provider:
            _ours = provider
        else:
            provider.shutdown()
        return current


def left_behind(provider: Any) -> int:
    """Spans our provider still holds: queued in its BatchSpanProcessors or in a batch
    an exporter is sending.  Read when the exit's time for its shutdown ran out; its
    exporters then count nothing more (``CountedExporter.write_off``)."""
    left = 0
    active = getattr(provider, "_active_span_processor", None)
    for processor in getattr(active, "_span_processors", ()):
        inner = getattr(processor, "_batch_processor", None)
        if inner is None:
            continue
        # The queue first: a batch taken from it between the two looks is counted in
        # both (high by a batch, never low); one taken after is in the queue's count,
        # and its failure is not counted again (``write_off``).
        left += len(getattr(inner, "_queue", ()))
        exporter = getattr(inner, "_exporter", None)
        if isinstance(exporter, CountedExporter):
            left += exporter.write_off()
    return left


def our_provider() -> TracerProvider | None:
    """The provider we created, if any (flushed and shut down at exit)."""
    return _ours
