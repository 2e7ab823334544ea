"""The provider put in place at interpreter start, and how an application takes over.

Env-only activation (``_autostart``) must have a tracer provider in place before
the application's code runs, or the engine's own spans (``engine.step``, made
through ``trace.get_tracer(...)``) go nowhere and our spans lose their parent.
OpenTelemetry lets the global provider be set once, so setting ours outright
would make an application's later ``trace.set_tracer_provider(its own)`` a
silent no-op.  Instead the global provider is a ``HandoffTracerProvider`` in
front of ours, and setting a provider is routed through ``take_over``:

- Until the application sets one, every span (the engine's, ours) goes to our
  provider (built from the standard ``OTEL_*`` variables, as ``instrument()``
  would).
- When it does, ``take_over`` first flushes the FlashInfer spans recorded so far
  into our provider, then makes the application's provider the global one
  (``trace.get_tracer_provider()`` returns it), points the tracers handed out
  earlier at it, and re-resolves our span pipeline: spans started from then on,
  the engine's and ours, go to the application's provider, with its resource,
  sampler and processors.  Spans started before keep going where they started.
- A second ``set_tracer_provider`` is refused with OpenTelemetry's own warning,
  as without us.  Our provider is flushed and shut down at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace as trace_api

from . import health, threads

_lock = threading.RLock()
_installed: HandoffTracerProvider | None = None
_original_set: Any = None
EXIT_BUDGET_S = 5.0
TAKE_OVER_FLUSH_S = 2.0


class _HandoffTracer(trace_api.Tracer):
    """A tracer of whichever provider the hand-off points at when a span starts."""

    def __init__(self, owner: HandoffTracerProvider, args: tuple, kwargs: dict) -> None:
        self._owner = owner
        self._args = args
        self._kwargs = kwargs
        self._cached: tuple[Any, Any] = (None, None)

    def _tracer(self) -> Any:
        target = self._owner.otel_flashinfer_target
        provider, tracer = self._cached
        if provider is not target:
            tracer = target.get_tracer(*self._args, **self._kwargs)
            self._cached = (target, tracer)
        return tracer

    def start_span(self, *args: Any, **kwargs: Any) -> trace_api.Span:
        return self._tracer().start_span(*args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace_api.Span]:
        with self._tracer().start_as_current_span(*args, **kwargs) as span:
            yield span

    def __getattr__(self, name: str) -> Any:  # sampler, resource, ... of the real tracer
        return getattr(self._tracer(), name)


class HandoffTracerProvider(trace_api.TracerProvider):
    """The global provider set at start-up: ours until the application sets its own."""

    def __init__(self, ours: Any) -> None:
        self.otel_flashinfer_ours = ours
        #: The provider spans go to now (provider.resolve_provider looks behind us).
        self.otel_flashinfer_target = ours
        self.otel_flashinfer_app: Any = None

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace_api.Tracer:
        return _HandoffTracer(self, args, kwargs)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        ok = True
        for provider in {id(p): p for p in (self.otel_flashinfer_ours,
                                            self.otel_flashinfer_target)}.values():
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                ok = bool(flush(timeout_millis)) and ok
        return ok

    def __getattr__(self, name: str) -> Any:  # add_span_processor, resource, shutdown, ...
        return getattr(self.otel_flashinfer_target, name)

    def take_over(self, provider: Any) -> bool:
        """Hand the global role to the application's ``provider`` (once); whether the
        call was handled here (False: OpenTelemetry's own rules apply)."""
        if provider is self or isinstance(provider, HandoffTracerProvider):
            return True
        with _lock:
            if self.otel_flashinfer_app is not None or trace_api.get_tracer_provider() is not self:
                return False
            from . import runtime

            current = runtime.current()
            if current is not None:
                current.flush(TAKE_OVER_FLUSH_S)  # what was recorded so far goes to ours
            self.otel_flashinfer_app = provider
            self.otel_flashinfer_target = provider
            if hasattr(trace_api, "_TRACER_PROVIDER"):
                trace_api._TRACER_PROVIDER = provider  # noqa: SLF001 - get_tracer_provider() is theirs
            runtime.provider_changed()
        return True


def installed() -> HandoffTracerProvider | None:
    return _installed


def _route_set(tracer_provider: Any, log: bool = True) -> None:
    """Replaces ``opentelemetry.trace._set_tracer_provider`` (which the public
    ``set_tracer_provider`` calls): the application's provider takes over."""
    handoff = _installed
    if handoff is not None:
        try:
            if handoff.take_over(tracer_provider):
                return
        except Exception as exc:  # noqa: BLE001 - never break the application's setup
            health.report("provider_errors", "handing the tracer provider over failed", exc)
    _original_set(tracer_provider, log)


def install(traces_file: str) -> HandoffTracerProvider | None:
    """Build our provider and set it, behind a hand-off, as the global one; None when
    a provider is already set (or OTel is disabled), and nothing changes."""
    global _installed, _original_set
    from .provider import build_provider, sdk_disabled

    with _lock:
        if _installed is not None:
            return _installed
        if sdk_disabled() or not isinstance(trace_api.get_tracer_provider(),
                                            trace_api.ProxyTracerProvider):
            return None
        original = getattr(trace_api, "_set_tracer_provider", None)
        if original is None:
            return None
        handoff = HandoffTracerProvider(build_provider(traces_file))
        original(handoff, False)
        if trace_api.get_tracer_provider() is not handoff:
            handoff.otel_flashinfer_ours.shutdown()
            return None
        _original_set = original
        trace_api._set_tracer_provider = _route_set  # noqa: SLF001
        _installed = handoff
        atexit.register(_at_exit, handoff)
        return handoff


def _at_exit(handoff: HandoffTracerProvider) -> None:
    """Flush and shut our provider down within a budget (the app shuts its own)."""
    ours = handoff.otel_flashinfer_ours
    closer = threading.Thread(target=ours.shutdown, name="otel_flashinfer-handoff-exit",
                              daemon=True)
    deadline = time.monotonic() + EXIT_BUDGET_S
    try:
        threads.start(closer)
        closer.join(max(0.1, deadline - time.monotonic()))
    except RuntimeError:
        pass
