"""Counts our spans that an application's own exporter failed to send.

On the SDK path (an application's provider whose processors or sampler the native
encoder does not reproduce) our spans go to the application's BatchSpanProcessor or
SimpleSpanProcessor, whose exporter may fail: the SDK logs an exception and ignores a
``FAILURE`` result, so those spans were lost without a count.  ``watch`` shadows the
``export`` method of each such processor's exporter, on that object only, with one
that counts, in ``counters()``, the spans of our scope in a batch that failed
(``spans_dropped``, and ``spans_dropped_exporter`` for this cause) and returns or
raises what the exporter did.  The exporter stays the same object (its type, its
attributes, what the application sets on it); ``unwatch`` takes the shadow away once
no pipeline watches it any more.  Our own exporters count their failures themselves
(``counts_drops``) and are left be.  A processor of another kind keeps its exporter
to itself: its failures stay uncounted (README, "How spans leave").
"""

from __future__ import annotations

import os
import threading
from typing import Any

from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)

from . import health

_MISSING = object()
#: Pipelines plan (``watch``) on their workers and stop (``unwatch``) on the
#: application's threads: the owner counts change under it.
_lock = threading.Lock()


def _new_lock() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's may have been held at the fork


os.register_at_fork(after_in_child=_new_lock)


class _Watch:
    """One exporter's shadowed ``export``: what it replaced, and how many pipelines
    watch it (the last ``unwatch`` takes it away)."""

    def __init__(self, exporter: Any, scope: str) -> None:
        self.exporter = exporter
        self.scope = scope
        self.owners = 0
        self.before = vars(exporter).get("export", _MISSING)  # an instance's own, if any
        original = exporter.export

        def export(spans: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                result = original(spans, *args, **kwargs)
            except Exception:
                self.count(spans, "raised")
                raise
            if result == SpanExportResult.FAILURE:
                self.count(spans, "failed")
            return result

        export.otel_flashinfer_watch = self  # type: ignore[attr-defined]
        self.export = export

    def count(self, spans: Any, how: str) -> None:
        try:
            ours = sum(1 for span in spans
                       if getattr(span.instrumentation_scope, "name", None) == self.scope)
        except Exception:  # noqa: BLE001 - counting must not change what the SDK sees
            return
        if ours:
            health.report("spans_dropped", f"the application's span exporter {how}: "
                          "its batch is lost", n=ours)
            health.count("spans_dropped_exporter", ours)


def _exporter_of(processor: Any) -> Any:
    """The exporter an SDK batch or simple processor sends with, or None (another kind
    of processor; an SDK without it where we look)."""
    if not isinstance(processor, (BatchSpanProcessor, SimpleSpanProcessor)):
        return None
    batch = getattr(processor, "_batch_processor", None)  # SDK 1.34 and later
    if batch is not None and hasattr(batch, "_exporter"):
        return batch._exporter  # noqa: SLF001 - the SDK's, read only
    return vars(processor).get("span_exporter")  # simple processors; earlier batch ones


def watch(processors: Any, scope: str) -> list[_Watch]:
    """Watch the exporters of ``processors`` (a provider's, as planned) for our spans
    (``scope``); returns what ``unwatch`` gives up."""
    with _lock:
        return _watch(processors, scope)


def _watch(processors: Any, scope: str) -> list[_Watch]:
    held = []
    for processor in processors or ():
        exporter = _exporter_of(processor)
        if exporter is None or getattr(exporter, "counts_drops", False) is True \
                or not hasattr(exporter, "__dict__"):
            continue  # none we can see, one of ours (it counts its own), or slots only
        found = getattr(vars(exporter).get("export"), "otel_flashinfer_watch", None)
        if found is None:
            found = _Watch(exporter, scope)
            exporter.export = found.export
        found.owners += 1
        held.append(found)
    return held


def unwatch(held: list[_Watch]) -> None:
    """Give up the watches ``watch`` returned; the last owner of one takes its shadow
    away (or puts back the instance's own ``export`` it had replaced)."""
    with _lock:
        _unwatch(held)


def _unwatch(held: list[_Watch]) -> None:
    for found in held:
        found.owners -= 1
        if found.owners > 0:
            continue
        exporter = found.exporter
        if vars(exporter).get("export") is not found.export:
            continue  # replaced since by someone else: theirs now
        if found.before is _MISSING:
            del exporter.export
        else:
            exporter.export = found.before
    held.clear()
