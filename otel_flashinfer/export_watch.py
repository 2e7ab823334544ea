"""Counts our spans that an application's own exporter failed to send.

On the SDK path (an application's provider whose processors or sampler the native
encoder does not reproduce) our spans go to the application's BatchSpanProcessor or
SimpleSpanProcessor, whose exporter may fail: the SDK logs an exception and ignores a
``FAILURE`` result, so those spans were lost without a count.  ``watch`` puts a thin
proxy in front of each such processor's exporter that counts, in ``counters()``, the
spans of our scope in a batch that failed (``spans_dropped``, and
``spans_dropped_exporter`` for this cause), and hands everything else through
unchanged: the same result, the same exception, every other attribute.  ``unwatch``
puts the original back.  Our own exporters count their failures themselves
(``counts_drops``) and are left be.  A processor of another kind keeps its exporter to
itself: its failures stay uncounted (README, "How spans leave").
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

from . import health


class WatchedExporter:
    """An application's span exporter, with our spans in failed batches counted."""

    counts_drops = True

    def __init__(self, exporter: Any, scope: str) -> None:
        self._watched = exporter
        self._scope = scope

    def export(self, spans: Any) -> Any:
        try:
            result = self._watched.export(spans)
        except Exception:
            self._count(spans, "raised")
            raise
        if result == SpanExportResult.FAILURE:
            self._count(spans, "failed")
        return result

    def _count(self, spans: Any, how: str) -> None:
        try:
            ours = sum(1 for span in spans
                       if getattr(span.instrumentation_scope, "name", None) == self._scope)
        except Exception:  # noqa: BLE001 - counting must not change what the SDK sees
            return
        if ours:
            health.report("spans_dropped", f"the application's span exporter {how}: "
                          "its batch is lost", n=ours)
            health.count("spans_dropped_exporter", ours)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._watched, name)

    def __repr__(self) -> str:
        return f"WatchedExporter({self._watched!r})"


def _slots(processor: Any) -> tuple[Any, str] | None:
    """Where ``processor`` keeps its exporter: (the object, the attribute), or None."""
    batch = getattr(processor, "_batch_processor", None)
    if batch is not None and hasattr(batch, "_exporter"):
        return batch, "_exporter"
    if isinstance(processor, SimpleSpanProcessor) and hasattr(processor, "span_exporter"):
        return processor, "span_exporter"
    return None


def watch(processors: Any, scope: str) -> list[tuple[Any, str, WatchedExporter]]:
    """Proxy the exporters of ``processors`` (a provider's, as planned) that are not
    watched yet; returns what ``unwatch`` puts back."""
    installed = []
    for processor in processors or ():
        found = _slots(processor)
        if found is None:
            continue
        owner, attr = found
        current = getattr(owner, attr)
        if current is None or getattr(current, "counts_drops", False) is True:
            continue  # watched already, or one of ours, which counts its own
        proxy = WatchedExporter(current, scope)
        setattr(owner, attr, proxy)
        installed.append((owner, attr, proxy))
    return installed


def unwatch(installed: list[tuple[Any, str, WatchedExporter]]) -> None:
    """Put the original exporters back where our proxy still stands."""
    for owner, attr, proxy in installed:
        if getattr(owner, attr, None) is proxy:
            setattr(owner, attr, proxy._watched)  # noqa: SLF001 - our own proxy
    installed.clear()
