"""The background half of every span: caller threads hand over records, one worker
builds SDK spans from them.

A stock SDK span costs tens of microseconds of Python; a decode kernel takes twenty.
So the caller's thread only fills a ``CallRecord`` (ids, timestamps, raw argument
facts) and appends it to a bounded deque; the worker waits until the record's
``Pending`` work (GPU timing, statistics) has resolved, then builds the span through
the application's TracerProvider with the ids and times chosen on the caller's
thread, so its samplers, processors and exporters all apply.

Bounded everywhere: the queue drops its oldest record when full, records that wait
on the GPU too long are finished without their results, and both are counted.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from random import getrandbits
from typing import Any, Protocol

from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from . import capture_guard, export_watch, forking, health, threads
from .graph_sampling import CostEstimate

_ROOT_CONTEXT = trace_api.set_span_in_context(trace_api.INVALID_SPAN)


class Pending(Protocol):
    """Work a span waits for before export (GPU time, statistics)."""

    def ready(self) -> bool:
        """Non-blocking: whether ``apply`` can run now (background thread)."""

    def apply(self, record: CallRecord) -> None:
        """Add this work's attributes and events to ``record`` (background thread)."""

    def abandon(self, record: CallRecord, reason: str) -> None:
        """Give up on the result; must say so on ``record`` (background thread)."""


_EMPTY: tuple[Any, ...] = ()  # shared "no events/links/pending yet", never written
_PID = os.getpid()


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class CallRecord:
    """Everything one span needs, filled on the caller's thread without formatting.

    A traced call allocates this one object and nothing else that outlives the call
    (see ``for_call``): the attribute dict starts as the wrapper's shared constant and
    the event/link/pending lists as a shared empty tuple, and the worker makes its own
    copies (``own``) before writing.  Every container the caller leaves behind waits
    in the queue and counts towards the garbage collector's next pass, whose cost then
    lands on the caller.
    """

    __slots__ = (
        "attributes",
        "capture",
        "data",
        "deadline",
        "describe",
        "end_ns",
        "error",
        "events",
        "gpu",
        "instance",
        "kw",
        "links",
        "name",
        "parent",
        "pending",
        "plan_link",
        "result",
        "shared",
        "slot",
        "span_id",
        "start_ns",
        "states",
        "token",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent: SpanContext | None,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        describe: Callable[[CallRecord], None] | None = None,
    ) -> None:
        self._fill(name, trace_id, span_id, parent, attributes)
        self.shared = False
        self.start_ns, self.end_ns, self.describe = start_ns, end_ns, describe
        self.events: list[tuple[str, dict[str, Any], int]] = []
        self.links: list[Link] = []
        self.pending: list[Pending] = []

    @classmethod
    def for_call(cls, name: str, trace_id: int, span_id: int, parent: SpanContext | None,
                 attributes: dict[str, Any]) -> CallRecord:
        """A traced call's record: ``attributes`` is shared and read-only until ``own``."""
        record = object.__new__(cls)
        record._fill(name, trace_id, span_id, parent, attributes)
        return record

    def _fill(self, name: str, trace_id: int, span_id: int, parent: SpanContext | None,
              attributes: dict[str, Any]) -> None:
        """Every slot, as a traced call starts it (the C hot path's ``new_record`` sets
        the same values)."""
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.attributes = attributes
        self.shared = True
        #: Events, links and pending GPU results: the shared () until ``own``.
        self.events = self.links = self.pending = _EMPTY
        #: (exception type name, message, formatted traceback) or None.
        self.error = None
        self.describe = None
        #: Raw facts ``describe`` turns into attributes in the background: positional
        #: argument snapshots, keyword snapshots, the result's snapshot.
        self.data = self.kw = self.result = None
        #: A GPU-time handle (``gpu_timing``), resolved by the worker; None: none.
        self.gpu = None
        #: The plan span a ``run`` links to; the worker makes the Link (``own``).
        self.plan_link = None
        #: Caller-side state between the wrapper's enter and leave (context token,
        #: journal token, hook states, open capture); cleared when the call ends.
        self.token = self.slot = self.states = self.capture = None
        self.start_ns = self.end_ns = 0
        #: ``id()`` of the wrapper object of a method call (0: none).
        self.instance = 0
        self.deadline = 0.0

    def spans(self) -> int:
        """Spans this record stands for (a replay record: its children too)."""
        return 1

    def own(self) -> dict[str, Any]:
        """Private attribute dict and lists before the worker writes to them."""
        if self.shared:
            attrs = self.attributes = dict(self.attributes)
            if self.instance:
                attrs["flashinfer.instance.id"] = self.instance_id()
            self.shared = False
        if self.events is _EMPTY:
            self.events = []
        if self.links is _EMPTY:
            self.links = []
        if self.plan_link is not None:
            self.links.insert(0, Link(self.plan_link))
            self.plan_link = None
        return self.attributes

    def instance_id(self) -> str | None:
        """``flashinfer.instance.id`` (readable on the caller's thread too)."""
        if self.instance:
            return f"{_PID}:{self.instance}"
        return self.attributes.get("flashinfer.instance.id")

    def add_pending(self, pending: Pending) -> None:
        if self.pending is _EMPTY:
            self.pending = [pending]
        else:
            self.pending.append(pending)

    def add_link(self, link: Link) -> None:
        if self.links is _EMPTY:
            self.links = [link]
        else:
            self.links.append(link)

    @property
    def parent_span_id(self) -> int | None:
        return self.parent.span_id if self.parent is not None else None


#: The span attributes of a call's (or a replay's) GPU time, or of why it has none: the
#: worker writes them into the record (``gpu_timing``, the encoder in C), where
#: ``graphs`` also reads a replay's back.
TIME_ATTR = "flashinfer.gpu.time_ns"
UNAVAILABLE_ATTR = "flashinfer.gpu.time_unavailable"
REPLAY_INDEX_ATTR = "flashinfer.cuda_graph.replay"
#: Where a replay's child's start and end come from: "replay" (the replay's host start
#: and end: no host code runs per replay) or "gpu" (level 5: its statistics launches'
#: clock stamps, placed from the replay's host start by the graph's first launch).
TIME_SOURCE_ATTR = "flashinfer.cuda_graph.time_source"


class ReplayRecord(CallRecord):
    """A traced CUDA graph replay whose children (one span per captured call) are made
    by the worker from the capture's prototypes, not by the replaying thread.

    The replaying thread leaves one object (this), plus at level 5 the statistics
    pendings of its children.  The native encoder writes the children straight from
    the prototypes (csrc/otlp_encoder.c, ``encode_replay``); every other path expands
    them here (``expand``) into the records the replaying thread used to make."""

    __slots__ = ("child_pending", "context", "group", "index", "template")

    def __init__(self, trace_id: int, span_id: int, parent: SpanContext | None,
                 start_ns: int, end_ns: int, attributes: dict[str, Any],
                 context: SpanContext, index: int, template: tuple[CallRecord, ...],
                 child_pending: list[Any] | None, group: list[Any] | None = None) -> None:
        super().__init__("cuda_graph.replay", trace_id, span_id, parent, start_ns, end_ns,
                         attributes)
        #: This replay span's own context: its children's parent.
        self.context = context
        self.index = index
        #: Per captured call, a prototype (``graphs.Capture.template``): its name,
        #: attributes (without the replay index), link to the capture-time span and
        #: capture-time argument snapshots.  Read only, shared by every replay.
        self.template: tuple[CallRecord, ...] | None = template
        #: Per prototype, that child's Pendings for this replay (statistics), or None;
        #: None when no child has any.
        self.child_pending = child_pending
        #: Pendings that serve many children at once (``stats.graph_rows``: one slot
        #: of a graph's statistics per replay), split per child by ``expand``; or None.
        self.group = group

    def spans(self) -> int:
        """Spans this record stands for: its own and, until expanded, one per child."""
        return 1 + len(self.template or ())

    def expand(self) -> list[CallRecord]:
        """The children as plain records (the Python path); this record keeps only its
        own span afterwards."""
        template, pending, groups = self.template, self.child_pending, self.group
        self.template = self.child_pending = self.group = None
        if not template:
            return []
        if groups:
            pending = list(pending) if pending is not None else [None] * len(template)
            last: list[Any] = []  # why there is no time: after every source of one
            for group in groups:
                for i, part in group.split():  # first, as on the replaying thread's path
                    if i < 0:  # the replay's own GPU time, from the group's slot
                        (last.append if getattr(part, "after_times", False)
                         else self.add_pending)(part)
                        continue
                    pending[i] = [part, *pending[i]] if pending[i] else [part]
            for part in last:
                self.add_pending(part)
        children = []
        for i, proto in enumerate(template):
            attrs = dict(proto.attributes)
            attrs[REPLAY_INDEX_ATTR] = self.index
            attrs[TIME_SOURCE_ATTR] = "replay"  # "gpu" once its stamps place it
            child = CallRecord(proto.name, self.trace_id, _random_span_id(), self.context,
                               self.start_ns, self.end_ns, attrs, describe=proto.describe)
            # The capture-time snapshots, described as the capture-time span was: the
            # same objects every replay, so the native encoder reuses one encoded block.
            child.data, child.kw, child.result = proto.data, proto.kw, proto.result
            child.links = list(proto.links)
            if pending is not None and pending[i] is not None:
                child.pending = list(pending[i])
            children.append(child)
        return children


def _random_span_id() -> int:
    return getrandbits(64) or 1


CallRecord.replay_type = ReplayRecord  # type: ignore[attr-defined] # the encoder's subtype


class _PresetIds(IdGenerator):
    """Hands the SDK the ids chosen on the caller's thread.

    Only our own tracer uses it, and only from the worker thread, so a plain
    attribute is enough; anything else falls back to random ids.
    """

    def __init__(self, fallback: IdGenerator | None) -> None:
        self.fallback = fallback or RandomIdGenerator()
        self.trace_id: int | None = None
        self.span_id: int | None = None

    def generate_span_id(self) -> int:
        value, self.span_id = self.span_id, None
        return value if value is not None else self.fallback.generate_span_id()

    def generate_trace_id(self) -> int:
        value, self.trace_id = self.trace_id, None
        return value if value is not None else self.fallback.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return True


def preset_tracer_ids(tracer: Any) -> _PresetIds | None:
    """Install preset ids on an SDK tracer; None for tracers without an id generator."""
    current = getattr(tracer, "id_generator", None)
    if isinstance(current, _PresetIds):
        return current
    if current is None:
        return None
    preset = _PresetIds(current)
    tracer.id_generator = preset
    return preset


class DirectSpans:
    """Builds finished spans straight into the provider's span processors.

    Going through ``Tracer.start_span``/``end`` costs tens of microseconds per span,
    mostly re-validating attributes we already produced in valid form; that is more
    than a FlashInfer call takes, so the worker would fall behind a busy engine.  When
    the provider is the SDK's with its default parent-based sampler and only the SDK's
    batch/simple processors (whose ``on_start`` does nothing), the same ReadableSpan
    that ``end()`` would produce is handed to ``on_end`` directly.  Any other setup
    takes the general path, so custom samplers and processors always apply.
    """

    def __init__(self, tracer: Any) -> None:
        self.processor = tracer.span_processor
        self.resource = tracer.resource
        self.scope = tracer._instrumentation_scope  # noqa: SLF001
        self.info = tracer.instrumentation_info
        limits = tracer._span_limits  # noqa: SLF001
        self.queues = batch_queues(tracer)
        self.max_attributes = limits.max_span_attributes
        self.max_events = limits.max_events
        self.max_links = limits.max_links

    @staticmethod
    def for_tracer(tracer: Any) -> DirectSpans | None:
        try:
            from opentelemetry.sdk.trace import Tracer, sampling
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:  # pragma: no cover
            return None
        if type(tracer) is not Tracer or not tracer._is_enabled():  # noqa: SLF001
            return None
        sampler = tracer.sampler
        if sampler is not sampling.ALWAYS_ON and not (
            isinstance(sampler, sampling.ParentBased)
            and sampler._root is sampling.ALWAYS_ON  # noqa: SLF001
            and type(sampler) is sampling.ParentBased
            and sampler._remote_parent_sampled is sampling.ALWAYS_ON  # noqa: SLF001
            and sampler._local_parent_sampled is sampling.ALWAYS_ON  # noqa: SLF001
        ):
            return None
        processors = getattr(tracer.span_processor, "_span_processors", None)
        if processors is None or not all(
            type(p) in (BatchSpanProcessor, SimpleSpanProcessor) for p in processors
        ):
            return None
        return DirectSpans(tracer)

    def export(self, record: CallRecord) -> None:
        parent = record.parent
        trace_id, span_id = record.trace_id, record.span_id
        # SpanContext's own __new__ re-validates ids we made; build the tuple directly.
        context = tuple.__new__(SpanContext, (
            trace_id, span_id, False, _SAMPLED,
            parent.trace_state if parent is not None else DEFAULT_TRACE_STATE,
            0 < trace_id < _MAX_TRACE_ID and 0 < span_id < _MAX_SPAN_ID,
        ))
        attributes = record.attributes
        if len(attributes) > self.max_attributes:
            attributes = dict(list(attributes.items())[: self.max_attributes])
        events = ([Event(name, attrs, ts) for name, attrs, ts in record.events[: self.max_events]]
                  if record.events else [])
        status = _UNSET
        if record.error is not None:
            exc_type, message, stacktrace = record.error
            events.append(Event("exception", {
                "exception.type": exc_type,
                "exception.message": message,
                "exception.stacktrace": stacktrace,
                "exception.escaped": "True",
            }, record.end_ns))
            status = Status(StatusCode.ERROR, f"{exc_type}: {message}")
        elif attributes.get("flashinfer.cuda_error"):
            status = Status(StatusCode.ERROR, str(attributes["flashinfer.cuda_error"]))
        span = ReadableSpan(
            name=record.name, context=context, parent=parent, resource=self.resource,
            attributes=attributes, events=events, links=record.links[: self.max_links],
            kind=SpanKind.INTERNAL, status=status, start_time=record.start_ns,
            end_time=record.end_ns, instrumentation_info=self.info,
            instrumentation_scope=self.scope,
        )
        count_full_queues(self.queues)
        self.processor.on_end(span)


def _processors_of(tracer: Any) -> Any:
    """The provider's processors as planned (the SDK replaces the tuple on an add)."""
    return getattr(getattr(tracer, "span_processor", None), "_span_processors", None)


def batch_queues(tracer: Any) -> list[Any]:
    """What a span handed to the provider meets, per processor: a BatchSpanProcessor's
    inner batch processor, else the processor itself.  A span handed to a full queue
    pushes the oldest out, and one handed to a shut processor is ignored, which the SDK
    only logs and we count (whichever path, direct or the SDK's own, hands it on).
    Empty where the provider has no processor to look at."""
    processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", ())
    return [getattr(p, "_batch_processor", None) or p for p in processors]


def count_full_queues(queues: list[Any]) -> None:
    """Before handing one span on: count the span each full queue will drop for it
    (each a destination it loses), and the span itself, once, when every processor
    that would take it was shut down (by the application, or with its provider).  The
    processor's thread may take a batch between this look and the hand-off, so the
    count can err high by a span, never low."""
    shut = 0
    for entry in queues:
        if getattr(entry, "_shutdown", False):
            shut += 1
            continue
        if hasattr(entry, "_max_queue_size") and \
                len(entry._queue) >= entry._max_queue_size:  # noqa: SLF001 - the SDK's
            health.report("spans_dropped", "the SDK's span queue is full: it drops the "
                          "oldest span")
    if shut and shut == len(queues):
        health.report("spans_dropped", "the application shut its span processors down: "
                      "they ignore the spans still handed to them")


_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED | trace_api.TraceFlags.RANDOM_TRACE_ID)
#: A real (blocking) pause between chunks of a backlog: releasing the GIL without
#: blocking lets this thread take it straight back before a waiting caller wakes.
_YIELD_S = 50e-6
#: The worker leaves its GPU-query section after this much of a pass and goes on at
#: once: a graph capture starting on another thread waits for the section to end.
_PASS_BUDGET_S = 0.05
_UNSET = Status(StatusCode.UNSET)
#: While a flush waits, records that wait (statistics, a GPU time) are looked at again
#: this soon (the caller waits for them, and GPU results come within a few ms), then
#: less often, up to the worker's tick (a payload on a slow store takes seconds).
_FLUSH_LOOK_S = 0.005
#: At shutdown, how long the worker gets to hand on the records it gave up waiting for.
_GIVE_UP_S = 1.0
_MAX_TRACE_ID = 1 << 128
_MAX_SPAN_ID = 1 << 64


class _NoGpuTimes:
    """Where no GPU timing runs, no record carries a handle."""

    def ready(self, handle: Any) -> bool:
        return True

    def apply(self, record: CallRecord, handle: Any) -> None:
        pass

    def abandon(self, record: CallRecord, handle: Any, reason: str) -> None:
        pass


#: Held while a worker resolves its tracer (imports); ``os.fork`` waits for it.
_RESOLVING = threading.Lock()


def _reinit_resolving() -> None:
    global _RESOLVING
    _RESOLVING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: _RESOLVING.acquire(),
                        after_in_parent=lambda: _RESOLVING.release(),
                        after_in_child=_reinit_resolving)


def _holds_gpu_work(record: CallRecord) -> bool:
    """Whether ``record`` holds statistics ring slots or GPU events that only resolving
    it (or ``Pipeline._let_go``) gives back."""
    return bool(record.pending or record.gpu is not None or (
        type(record) is ReplayRecord and (record.child_pending or record.group)))


#: Records one native drain takes at most: the encoder holds the GIL while it runs
#: (about a microsecond a record), and callers get it back between chunks.
DRAIN_CHUNK = 512


def _may_hold(queue: deque[CallRecord], native: Any, limit: int) -> bool:
    """Whether the queue may wait for a busy sender: up to ``limit`` records (half the
    record queue), the next batch of them holding no GPU work (a graph's ring can have
    16 slots: those must be resolved to be given back).  However many spans they carry:
    replay records hold 65 each, and encoding more than the outbox takes only for it to
    drop them lost 4,680 of 65,000 level-3 spans behind a replay loop that keeps the GIL
    (``bench_graph_step.py --mode cpu --hold-gil``); waiting in the record queue, which
    is bounded, loses none."""
    if not queue:
        return True
    if len(queue) > limit:
        return False
    return not any(_holds_gpu_work(record)
                   for record in itertools.islice(queue, min(native.batch, DRAIN_CHUNK)))


#: ``Pipeline._sleep_until_work``'s outcomes: slept until the open batch was due, woken
#: by a record (or a flush, a stop), or work was already there.
_DUE, _SUBMITTED, _BUSY = object(), object(), object()
#: The worker's wait for more records after a graph replay's woke it, in ``interval_s``
#: (0.25 s at the default 0.05 s; ``Pipeline._coalesce_wait``).
_COALESCE_INTERVALS = 5


class Pipeline:
    """A bounded queue of records and the one worker thread that exports them."""

    def __init__(
        self,
        tracer: Any = None,
        *,
        tracer_factory: Callable[[], tuple[Any, Any]] | None = None,
        max_queue: int = 65536,
        max_waiting: int = 16384,
        wait_timeout_s: float = 30.0,
        interval_s: float = 0.05,
        coalesce_s: float | None = None,
        provider: Any = None,
        native_export: bool = True,
    ) -> None:
        self.tracer = tracer
        self.provider = provider
        self._tracer_factory = tracer_factory
        self._preset: _PresetIds | None = None
        self._direct: DirectSpans | None = None
        self._sdk_queues: list[Any] = []
        self._planned_processors: Any = None
        #: Planning the way out (``_use_tracer``) and draining into it: a hand-off on the
        #: application's thread waits for the worker's drain in progress (and the
        #: worker's own re-plan, after a processor was added, never interleaves with it).
        self._plan_lock = threading.RLock()
        #: The native encoder and its sender (``export``), when the provider allows it.
        self._native: Any = None
        self.native_export = native_export
        #: Which way spans leave: "native", "direct" (SDK processors), "sdk" (a full
        #: SDK span per record), or "unresolved" before the first export.
        self.export_path = "unresolved"
        self.export_reason = ""
        self._native_counted = 0
        self._native_left_out = (0, 0)
        self._sdk_spans = 0
        #: On the draining thread: the SDK path's spans to hand on after the GPU-query
        #: section (``_drain``).
        self._local = threading.local()
        self.max_queue = max_queue
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self.interval_s = interval_s
        #: How long the worker waits for more after a graph replay's record woke it
        #: (None: five ``interval_s``; ``_coalesce_wait``).
        self.coalesce_s = coalesce_s
        self._batch = max(1, min(512, max_queue // 4))
        #: Attributes every span of a forked child gets (its own pid).
        self.fork_attributes: dict[str, Any] = {}
        #: The application's exporters this pipeline's SDK path watches (``export_watch``).
        self._watched: list[Any] = []
        if tracer is not None:
            self._use_tracer(tracer)
        self.flush_hooks: list[Callable[[float], bool]] = []
        #: The provider's force_flush running now, with the list its result goes in:
        #: one pair, so that a caller reads the result of the thread it waited for.
        self._flusher: tuple[threading.Thread, list[bool]] | None = None
        #: CPU seconds the worker spent building spans (benchmarks report it per call).
        self.worker_cpu_s = 0.0
        self._worker_cost = CostEstimate()
        #: The same, from drains whose spans were mostly graph replays' (templates: ids,
        #: times and a copy).  Eager calls' spans and the drains around a capture cost
        #: 100x more each on the device; charged to replays, they starved ``auto``.
        self._replay_cost = CostEstimate()
        #: Spans of graph replays handed on where they are handed on: by the native
        #: encoder (its count at the last drain) and by Python (the replays it expanded).
        self._native_replays = 0
        self._replay_py = 0
        #: Resolves ``CallRecord.gpu`` handles (``gpu_timing.HANDLES`` where CUDA is).
        self.gpu_times: Any = _NoGpuTimes()
        self._start()
        forking.redo_in_child(self, "_after_fork")

    def _plan_changed(self) -> bool:
        """Whether the provider's processors changed since the way out was planned."""
        native = self._native
        if native is not None:
            return bool(native.setup_changed())
        return (self.tracer is not None
                and _processors_of(self.tracer) is not self._planned_processors)

    def _use_tracer(self, tracer: Any) -> None:
        with self._plan_lock:
            self._plan(tracer)

    def _plan(self, tracer: Any) -> None:
        from .export import native_export_for

        def note(chosen: Any) -> None:
            self.export_reason = chosen.reason

        # Read first: a processor added while this plans is then planned at the next drain.
        processors = _processors_of(tracer)
        old = self._native
        if old is not None:
            try:
                self._count_paths()  # the old encoders' counts, before theirs start at 0
            except Exception as exc:  # noqa: BLE001 - counting must not stop a hand-off
                health.report("export_errors", "could not count the old path's spans", exc)
        self._native = native_export_for(self.provider, tracer, CallRecord, _EMPTY, note,
                                         enabled=self.native_export)
        self._native_counted, self._native_left_out, self._native_replays = 0, (0, 0), 0
        if old is not None and self._native is not None:
            self._native.carry_cost(old)  # priced at the old sender's until it knows
        if old is not None:
            # The provider changed hands (handoff): what the old path still holds goes
            # out through its own exporters, without keeping the caller.
            threads.start(threading.Thread(target=old.shutdown, args=(2.0,), daemon=True,
                                           name="otel_flashinfer-export-handoff"))
        export_watch.unwatch(self._watched)  # the processors planned before
        if self._native is not None:
            self.export_path = "native"
            if self.fork_attributes:
                self._native.set_extra(self.fork_attributes)
            self.tracer = tracer
            return
        # The application's exporters behind the SDK path: our spans in a batch that
        # fails are counted (the SDK only logs it).
        scope = getattr(getattr(tracer, "_instrumentation_scope", None), "name", None)
        if scope is not None:
            self._watched = export_watch.watch(processors, scope)
        self._direct = DirectSpans.for_tracer(tracer)
        self._sdk_queues = batch_queues(tracer) if self._direct is None else []
        #: The processors this plan was made for: one added later (the SDK replaces the
        #: tuple) is planned again at the next drain, its queue counted too.
        self._planned_processors = processors
        self._preset = None
        self.export_path = "direct" if self._direct is not None else "sdk"
        self._preset = preset_tracer_ids(tracer)
        if self._preset is None:
            health.report("foreign_tracer", "tracer provider is not the OTel SDK's; span ids "
                          "are chosen by it, so children of our spans may not nest")
        self.tracer = tracer

    def _resolve_tracer(self) -> Any:
        if self.tracer is None and self._tracer_factory is not None:
            tracer, provider = self._tracer_factory()
            self.provider = provider
            self._use_tracer(tracer)
        return self.tracer

    def _start(self) -> None:
        #: The native sender and its ``cpu_s`` at the last drain's end: what it ran
        #: since goes into the replays' price (``_sender_since_last``).  Priced by the
        #: sender's smoothed estimate per send instead, and with the first sends' debt
        #: capped, ``auto`` charged itself 73% of what tracing added (H200).
        self._sender_at: tuple[Any, float] = (None, 0.0)
        #: The CPU of passes that handed on no span, priced with the next that does.
        self._carried_cpu_s = 0.0
        self._queue: deque[CallRecord] = deque()
        self._waiting: deque[CallRecord] = deque()
        #: Set at shutdown when records still wait (a payload, statistics, a GPU time):
        #: the worker's next pass hands them on, saying why they did not wait longer.
        self._give_up: str | None = None
        #: Records the full queue dropped that still hold GPU work: released by the worker.
        self._let_go_queue: deque[CallRecord] = deque()
        self._wake = threading.Event()
        #: Set with ``_wake`` by whatever needs the drain at once (a full batch, a ring
        #: running low, a flush): the worker then skips its gathering wait.
        self._now = False
        #: The worker waits for more after a graph replay's record woke it (``_run``);
        #: an eager call's record ends that wait.
        self._gathering = False
        #: The worker sleeps without a tick until a record comes (``_sleep_until_work``).
        self._sleeping = False
        #: The last pass stopped for a busy sender (``held_back``), or for its time
        #: budget with records left (``more``): the worker goes on without its tick.
        self._held_back = self._more = False
        self._idle = threading.Condition()
        self._busy = 0
        self._stopping = False
        #: The queue from before ``shutdown``: the worker's to drain once more and sweep.
        self._late: deque[CallRecord] | None = None
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name="otel_flashinfer-pipeline", daemon=True
        )
        threads.start(self._thread)

    def _after_fork(self) -> None:
        # The parent's records and thread do not exist in the child: start afresh.  The
        # provider's Resource still names the parent's pid, so spans say which we are.
        self.fork_attributes = {"process.pid": os.getpid()}
        self._plan_lock = threading.RLock()  # another thread may have held it at the fork
        if self._native is not None:
            self._native.after_fork()  # its lock first: the fork may have copied it held
            self._native.set_extra(self.fork_attributes)
        self._start()

    # ---- caller's thread -------------------------------------------------------------

    def submit(self, record: CallRecord) -> None:
        """Hand a finished call over; never blocks, drops the oldest record when full."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            try:
                dropped = queue.popleft()
            except IndexError:
                pass
            else:
                lost = dropped.spans()
                if _holds_gpu_work(dropped):
                    # What it holds (ring slots, GPU events) goes back on the worker,
                    # which may query CUDA (never while a graph is being captured).
                    if len(self._let_go_queue) < self.max_waiting:
                        self._let_go_queue.append(dropped)
                    else:
                        health.report("stats_errors", "dropped spans' GPU work could not "
                                      "be handed back: their ring slots stay taken")
                health.report("spans_dropped", "span queue full: dropping the oldest spans",
                              n=lost)
                health.count("spans_dropped_queue", lost)  # of them, never encoded
        replay = type(record) is ReplayRecord
        queue.append(record)
        # Wake the worker once per full batch, not once per call past it.  A replay
        # record carries a span per captured call: a batch of spans, not of records
        # (waiting for 512 of them let 30,000 spans pile up for one drain).  An idle
        # worker has no tick: whoever appends while it sleeps wakes it (it then waits
        # its interval).  Read after the append, so a worker that found the queue empty
        # has already said it sleeps; the C hot path leaves the append into an empty
        # queue to this method.
        n = len(queue)
        if replay:
            full = n == self._batch or n % max(1, self._batch // record.spans()) == 0
        else:
            full = n == self._batch
        if full:
            self._now = True  # no gathering wait (``_run``)
            self._wake.set()
        elif self._sleeping or (self._gathering and not replay):
            self._wake.set()  # eager calls' records do not wait the gathering

    def _let_go(self, record: CallRecord) -> None:
        """A record dropped unexported still hands back what it holds (statistics ring
        slots, GPU events): otherwise every drop would shrink the rings for good.  On the
        worker; what the pendings would write goes to a scratch record, never to the
        dropped one's attributes, which it may share with later spans."""
        scratch = CallRecord("dropped", 0, 0, None, 0, 0, {})
        scratch.events = []
        held: list[Any] = []
        gpu, record.gpu = record.gpu, None
        if type(record) is ReplayRecord:
            for pendings in record.child_pending or ():
                held.extend(pendings or ())
            for group in record.group or ():
                try:
                    group.abandon()
                except Exception as exc:  # noqa: BLE001
                    health.report("pending_errors", "could not release a dropped replay's "
                                  "statistics", exc)
            record.child_pending = record.group = None
        held.extend(record.pending)
        record.pending = _EMPTY
        if gpu is not None:
            try:
                self.gpu_times.abandon(scratch, gpu, "queue_full")
            except Exception as exc:  # noqa: BLE001
                health.report("pending_errors", "could not release a dropped span's GPU "
                              "time", exc)
        for pending in held:
            try:
                pending.abandon(scratch, "queue_full")
            except Exception as exc:  # noqa: BLE001 - the others still go back
                health.report("pending_errors", "could not release a dropped span's "
                              "statistics", exc)

    def wake(self) -> None:
        """Have the worker drain now rather than at its next tick (a ring running low)."""
        self._now = True
        self._wake.set()

    # ---- worker thread ----------------------------------------------------------------

    def _sweep_late(self) -> None:
        """Count what a stopped pipeline's last queue still holds as dropped, and give
        its GPU work back (by the worker as it stops, or by ``shutdown`` without one)."""
        late, self._late = self._late, None
        if late is None:
            return
        spans = 0
        while True:
            try:
                record = late.popleft()
            except IndexError:
                break
            spans += record.spans()
            self._give_back(record)
        if spans:
            health.report("spans_dropped", "spans still queued when tracing stopped were "
                          "dropped", n=spans)

    def _give_back(self, record: CallRecord) -> None:
        """What a dropped record holds on the GPU (ring slots, pooled events), handed
        back where a CUDA query is allowed now."""
        if not _holds_gpu_work(record):
            return
        try:
            with capture_guard.gpu_queries() as allowed:
                if allowed:
                    self._let_go(record)
        except Exception as exc:  # noqa: BLE001 - the call goes on
            health.report("stats_errors", "could not give back a dropped span's GPU work",
                          exc)

    def _run(self) -> None:
        while not self._stopping:
            # The drain's CPU counts from here: waking up costs the worker CPU too, and
            # ``auto`` charges tracing what it costs on every thread (whole cost).
            cpu = time.thread_time()
            native = self._native
            if self._held_back and native is not None:
                # Outside the GPU-query section: a capture never waits on the sender.
                native.wait_for_room(self.interval_s)
            elif not self._more and not self._stopping:
                self._wait_before_drain(self._sleep_until_work())
            self._wake.clear()
            self._now = False
            self._drain(cpu)
        if self._late is not None:
            # What was queued before the stop, once more; what still waits then (a
            # payload, statistics) goes out saying so, never dies with this thread.
            self._give_up = self._give_up or "shutdown"
            self._drain()
            if self._waiting:
                self._drain()
            self._sweep_late()

    def _sleep_until_work(self) -> object:
        """With nothing queued or waiting for the GPU, sleep until a record comes
        (``submit`` wakes the first one) rather than waking every ``interval_s``: each
        of those ticks was a drain, 0.45% of a core on the CPU box for a process that
        makes no calls.  A flush or a stop wakes it too, and so does the native
        encoder's open batch falling due (at least ``interval_s`` apart: an overdue
        batch may be waiting for room at the sender).  Returns ``_DUE`` when it slept
        until that batch was due (the drain that hands it on comes at once),
        ``_SUBMITTED`` when woken, and ``_BUSY`` when there was work already."""
        self._sleeping = True
        try:
            if self._queue or self._waiting or self._let_go_queue or self._stopping:
                return _BUSY
            native = self._native
            due = native.due_in() if native is not None else None
            woken = self._wake.wait(None if due is None else max(due, self.interval_s))
            self._wake.clear()
            return _SUBMITTED if woken else _DUE
        finally:
            self._sleeping = False

    def _wait_before_drain(self, woke: object) -> None:
        """After ``_sleep_until_work``: a batch that fell due, or a wake-up that needs
        the drain at once (``_now``), goes now; a graph replay's record that woke the
        worker (the first of the queue), and replays' records alone waiting for their
        GPU times (``_replays_wait``), wait ``_coalesce_wait`` for others (``_gather``);
        anything else waits ``interval_s``, as it always has."""
        if woke is _DUE or self._stopping or self._now:
            return
        queue = self._queue
        if woke is _SUBMITTED and queue and type(queue[0]) is ReplayRecord:
            self._gather(self._replays_queued)
        elif woke is _BUSY and self._replays_wait():
            self._gather(self._replays_wait)
        else:
            self._wake.wait(self.interval_s)

    def _gather(self, still: Callable[[], bool]) -> None:
        """Wait ``_coalesce_wait`` for more replays' records, in ticks, each followed by
        a look at ``still`` (whether only such records keep the worker busy): the C hot
        path appends an eager call's record without waking a gathering worker, which
        then waited the whole interval for it.  A wake-up ends it at once."""
        self._gathering = True
        try:
            deadline = time.monotonic() + self._coalesce_wait()
            while not self._wake.wait(max(0.0, min(self.interval_s,
                                                   deadline - time.monotonic()))):
                if time.monotonic() >= deadline or not still():
                    break
        finally:
            self._gathering = False

    def _replays_queued(self) -> bool:
        """Whether only graph replays' records are queued."""
        return all(type(r) is ReplayRecord for r in list(self._queue))  # (one copy)

    def _replays_wait(self) -> bool:
        """Whether what keeps the worker busy is graph replays' records waiting for
        their GPU times alone: every record waiting or queued a replay's, none holding
        statistics ring slots (a ring's low-water wake fires once; the tick is what
        hands the slots back in time).  They gather as a replay's record that woke the
        worker does.  Back to back the
        host runs hundreds of replays ahead of the GPU, and a sparsely traced replay's
        time comes in that late (300 ms and more): ticking every ``interval_s``
        meanwhile, the worker drained each traced replay on its own, 74 passes where
        16 did with the times in at once, and its CPU per traced replay went from 85
        to 280 us (CPU box, ``REPLAY_EVERY=auto``, level 3, the event pool stood in)."""
        waiting = self._waiting  # (the worker's alone)
        if not waiting or self._let_go_queue:
            return False
        queued = list(self._queue)  # one copy under the GIL: callers append meanwhile
        return all(type(r) is ReplayRecord and r.group is None and r.child_pending is None
                   for records in (waiting, queued) for r in records)

    def _coalesce_wait(self) -> float:
        """After a graph replay's record woke the idle worker: how long to wait for more
        before the drain.  A drain has a fixed cost (waking, the pass's bookkeeping, the
        batch handed to the sender) that one traced graph replay every few tens of ms
        paid alone: 540 us of the worker's CPU for its 65 spans, against 155 us with
        0.25 s to gather (CPU box, ``REPLAY_EVERY=auto``, level 3), so that ``auto``
        traced half as many replays for its budget.  A full batch, a statistics ring
        running low (``wake``), a flush, a stop and an eager call's record end the wait
        at once, and a provider that asked for a shorter delay
        (``OTEL_BSP_SCHEDULE_DELAY``, a simple processor) gets it, down to
        ``interval_s``.  Eager calls are not gathered: bigger drains of level-10
        records, with their payloads, held the GIL long enough to stall callers (3%
        of calls over 5 ms in ``test_s3_store_killed_mid_loop``)."""
        native = self._native
        if native is None:
            return self.interval_s
        coalesce = self.coalesce_s
        if coalesce is None:
            coalesce = _COALESCE_INTERVALS * self.interval_s
        return max(self.interval_s, min(coalesce, native.delay_s))

    def _drain(self, cpu: float | None = None) -> None:
        """One pass over the queues; ``cpu``: this thread's CPU time its work counts
        from (the worker's, before it waited), else from here."""
        # A drain and a plan exclude each other: a hand-off to another provider (on the
        # application's thread) waits for the drain in progress, whose encoder it shuts
        # down; spans encoded into that encoder after its last flush were lost uncounted.
        with self._plan_lock:
            if self._plan_again_if_changed():
                cpu = None  # a new way out (imports, a new sender) is not a span's cost
            with self._idle:
                self._busy += 1  # until the SDK path's spans are handed on (a flush waits)
            later: list[tuple[Any, CallRecord]] = []
            try:
                # Pending GPU work is polled with CUDA queries, which would invalidate a
                # graph capture open on another thread: wait for the next tick instead.
                with capture_guard.gpu_queries() as allowed:
                    if allowed:
                        self._local.later = later
                        self._drain_now(cpu)
                    else:
                        self._held_back = self._more = False  # the next tick, not a spin
            finally:
                self._local.later = None
                # The SDK path's processors after the section (also if the drain failed:
                # these were counted as handed on): a SimpleSpanProcessor exports right
                # there, and a capture starting on another thread waits for the section
                # (up to capture_guard's 5 s with a receiver hung).
                self._hand_on_all(later)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _hand_on_all(self, later: list[tuple[Any, CallRecord]]) -> None:
        for tracer, record in later:
            try:
                self._hand_on(tracer, record)
            except Exception as exc:  # noqa: BLE001 - the others still go out
                health.report("export_errors", "could not export a span", exc)

    def _plan_again_if_changed(self) -> bool:
        """A processor was added to the provider: plan its spans' way out again.  Outside
        the GPU-query section (a capture waits on it) and under ``_RESOLVING`` (planning
        may import the exporters for the first time; a fork waits for that)."""
        try:
            if self._plan_changed():
                with _RESOLVING:
                    self._use_tracer(self.tracer)
                return True
        except Exception as exc:  # noqa: BLE001 - the worker must go on
            health.report("export_errors", "could not plan the spans' way out again", exc)
        return False

    def _drain_now(self, cpu: float | None = None) -> None:
        """One drain inside the GPU-query section; ``_drain`` holds the busy count."""
        if cpu is None:
            cpu = time.thread_time()
        self._held_back = self._more = False
        try:
            # Stopping: the queue from before the stop (``shutdown``), once more.
            late = self._late
            queue, waiting = late if late is not None else self._queue, self._waiting
            let_go = self._let_go_queue
            while let_go:
                self._let_go(let_go.popleft())
            now = time.monotonic()
            deadline = now + self.wait_timeout_s
            native = self._native
            give_up = self._give_up
            while give_up and waiting:
                record = waiting.popleft()
                try:
                    self._finish(record, abandon=give_up)
                except Exception as exc:  # noqa: BLE001 - the others still go out
                    health.report("export_errors", "could not export a span", exc)
            if native is not None and waiting:
                # Statistics still on the GPU last time: the encoder polls them in C and
                # puts back those not in yet; only what it cannot resolve comes here.
                slow = []
                try:
                    native.drain(waiting, slow, len(waiting), waiting, now, deadline)
                except Exception as exc:  # noqa: BLE001 - the worker must go on
                    health.report("export_errors", "the native encoder failed", exc)
                for record in slow:
                    self._consider(record, now)
            else:
                for _ in range(len(waiting)):
                    record = waiting.popleft()
                    self._consider(record, now)
            if queue and self.tracer is None:
                self._resolve_tracer_safely()
                native = self._native
            if native is not None:
                # Ready records are encoded in C; only those still waiting for the GPU
                # (statistics, a GPU time the encoder could not resolve) come back here.
                # What is queued now, in chunks (DRAIN_CHUNK): later arrivals wait for the
                # next tick, and the callers get the GIL back between chunks.  With the
                # outbox full and its sender busy, records holding no GPU work wait while
                # the record queue is under half full (_may_hold; the worker waits for
                # room outside this section); otherwise they are encoded and the outbox
                # drops its oldest, counted.
                left = len(queue)
                while left > 0:
                    chunk = min(left, native.batch, DRAIN_CHUNK)
                    left -= chunk
                    slow: list[CallRecord] = []
                    try:
                        if not native.drain(queue, slow, chunk, waiting, now, deadline,
                                            _may_hold(queue, native, self.max_queue // 2)):
                            self._held_back = True
                            left = 0
                    except Exception as exc:  # noqa: BLE001 - the worker must go on
                        health.report("export_errors", "the native encoder failed", exc)
                    for record in slow:
                        if (record.pending or record.gpu is not None) and not record.deadline:
                            record.deadline = deadline
                        self._consider(record, now)
                    if left > 0 and time.monotonic() - now > _PASS_BUDGET_S:
                        self._more = True  # the rest after leaving the section
                        left = 0
                    if left > 0:
                        time.sleep(_YIELD_S)
                try:
                    native.end_drain()
                except Exception as exc:  # noqa: BLE001
                    health.report("export_errors", "could not hand a batch to the sender",
                                  exc)
            else:
                for i in range(len(queue)):  # what is there now, as above
                    record = queue.popleft()
                    if record.pending or record.gpu is not None:
                        record.deadline = deadline
                    self._consider(record, now)
                    if i % 64 == 63:
                        time.sleep(_YIELD_S)
            while len(waiting) > self.max_waiting:
                record = waiting.popleft()
                try:
                    self._finish(record, abandon="backpressure")
                except Exception as exc:  # noqa: BLE001 - the worker must go on
                    health.report("export_errors", "could not export a span", exc)
        finally:
            spans, replay = self._count_paths()
            spent = time.thread_time() - cpu
            self.worker_cpu_s += spent
            beside = self._sender_since_last() + self._carried_cpu_s
            if spans > 0:
                self._carried_cpu_s = 0.0
                self._worker_cost.add(spent / spans)
                if 2 * replay >= spans:  # mostly replays' spans: what auto charges
                    self._replay_cost.add((spent + beside) / spans)
            else:  # a pass that handed on nothing: its CPU goes with the next spans
                self._carried_cpu_s = beside + spent

    def _sender_since_last(self) -> float:
        """The CPU the native sender ran since the last call (its ``cpu_s``): 0.0 the
        first time and for a new sender (a re-plan's: its first send's one-time work is
        not a span's price)."""
        native = self._native
        now = getattr(native, "cpu_s", 0.0)
        last_native, last = self._sender_at
        self._sender_at = (native, now)
        return max(now - last, 0.0) if native is not None and native is last_native else 0.0

    @property
    def worker_cost_per_span_s(self) -> float:
        """The worker's CPU per span handed on, over drains (``CostEstimate``: the
        first drain's one-time work left out, known from the fourth): what handing on
        one more span costs on this thread.  0.0 until known."""
        return self._worker_cost.value

    @property
    def replay_cost_per_span_s(self) -> float:
        """What one more span of a traced graph replay costs in the background: per
        span, in drains that were mostly replays' (``CostEstimate``), the worker's CPU
        and what the sender ran since the drain before (its ``cpu_s``): in a mix,
        eager spans' requests can land in a replay drain's sample and replays' in an
        eager one's.  0.0 until the sender's estimate is known: spans charged at the
        worker's price alone would never pay the sender's share, since spans handed on
        before a price are charged once, at the first (a new sender after a re-plan
        carries the last one's: ``_plan``).  ``REPLAY_EVERY=auto``
        charges it per child.  Level 10's children, made on the replaying thread and
        written by the encoder as plain records, do not count as replays' spans: their
        blobs' cost is the writers', which ``auto`` does not charge either."""
        native = self._native
        worker = self._replay_cost.value
        if not worker or (native is not None and not native.cost_per_span_s):
            return 0.0
        return worker

    @property
    def cost_per_span_s(self) -> float:
        """What handing on one more span costs in the background: the worker's CPU per
        span, plus the native sender's (encoded requests written or sent)."""
        native = self._native
        sender = native.cost_per_span_s if native is not None else 0.0
        return self.worker_cost_per_span_s + sender

    def _count_paths(self) -> tuple[int, int]:
        """Publish how many spans took each path since the last drain (``counters()``:
        ``spans_native``, ``spans_sdk``); returns how many that was in all, and how many
        of them were graph replays' (counted where they were handed on: a replay whose
        statistics were not in yet is the drain's that writes it, not the one it came
        in with)."""
        spans, replay = 0, self._replay_py
        self._replay_py = 0
        if self._native is not None:
            encoded, replays, *left = self._native.counts()
            replay += replays - self._native_replays
            self._native_replays = replays
            if encoded != self._native_counted:
                spans = encoded - self._native_counted
                health.count("spans_native", spans)
                self._native_counted = encoded
                left_out = tuple(left)
                if left_out != self._native_left_out:
                    attrs = left_out[0] - self._native_left_out[0]
                    described = left_out[1] - self._native_left_out[1]
                    if attrs > 0:
                        health.report("attribute_errors", "attributes the span encoder "
                                      "could not write were left out of their spans",
                                      n=attrs)
                    if described > 0:
                        health.report("describe_errors", "arguments the span encoder could "
                                      "not describe were left out of their spans",
                                      n=described)
                    self._native_left_out = left_out
        if self._sdk_spans:
            spans += self._sdk_spans
            health.count("spans_sdk", self._sdk_spans)
            self._sdk_spans = 0
        return spans, replay

    def _resolve_tracer_safely(self) -> None:
        try:
            # Imports happen in here (the exporters, the encoder): a fork in the middle
            # would leave the child a module import lock held by no thread, and its
            # worker (then its exit flush) waiting on it for good.  Forks wait for it.
            with _RESOLVING:
                self._resolve_tracer()
        except Exception as exc:  # noqa: BLE001 - each record then reports it again
            health.report("export_errors", "could not set up the tracer provider", exc)

    def _consider(self, record: CallRecord, now: float) -> None:
        try:
            if type(record) is ReplayRecord and record.template is not None:
                # A replay the encoder did not write whole: its children as records.
                if not record.deadline:  # its own GPU time may come from a group (expand)
                    record.deadline = now + self.wait_timeout_s
                for child in record.expand():
                    if child.pending:
                        child.deadline = record.deadline
                    self._consider(child, now)
            gpu = record.gpu
            ready = True
            for pending in record.pending:
                if not pending.ready():
                    ready = False
                    break
            if not ready or (gpu is not None and not self.gpu_times.ready(gpu)):
                if now < record.deadline:
                    self._waiting.append(record)
                    return
                self._finish(record, abandon="timeout")
                return
            self._finish(record)
        except Exception as exc:  # noqa: BLE001 - never let one record stop the worker
            health.report("export_errors", "could not export a span", exc)

    def _finish(self, record: CallRecord, abandon: str | None = None) -> None:
        if type(record) is ReplayRecord and record.template is not None:
            # Given up whole (backpressure): its children too, each saying why.
            for child in record.expand():
                try:
                    self._finish(child, abandon)
                except Exception as exc:  # noqa: BLE001 - the others still hand back
                    health.report("export_errors", "could not export a span", exc)
        record.own()
        gpu = record.gpu
        if gpu is not None:
            record.gpu = None
            try:
                times = self.gpu_times
                if abandon is None or times.ready(gpu):
                    times.apply(record, gpu)
                else:
                    times.abandon(record, gpu, abandon)
            except Exception as exc:  # noqa: BLE001
                health.report("pending_errors", "could not resolve a GPU time", exc)
        native = self._native  # once: a provider hand-off may switch it meanwhile
        for pending in record.pending:
            try:
                if abandon is None or pending.ready():
                    # The native encoder decodes statistics rows itself (RawStats).
                    apply = getattr(pending, "apply_raw", None) if native else None
                    (apply or pending.apply)(record)
                else:
                    pending.abandon(record, abandon)
            except Exception as exc:  # noqa: BLE001
                health.report("pending_errors", "could not resolve GPU results", exc)
        record.pending = _EMPTY
        if REPLAY_INDEX_ATTR in record.attributes:
            # A graph replay's span that Python hands on (the encoder counts those it
            # writes whole; see ``replay_cost_per_span_s`` for what neither counts).
            self._replay_py += 1
        tracer = self._resolve_tracer()
        if native is None:
            native = self._native  # resolved just now (its events are decoded: fine)
        if native is not None:
            native.add(record)  # argument description happens in the encoder
            return
        if record.describe is not None:
            try:
                record.describe(record)
            except Exception as exc:  # noqa: BLE001
                health.report("describe_errors", "could not describe arguments", exc)
        if self.fork_attributes:
            record.attributes.update(self.fork_attributes)
        self._sdk_spans += 1
        later = getattr(self._local, "later", None)
        if later is not None:  # inside the drain's GPU-query section: after it
            later.append((tracer, record))
            return
        self._hand_on(tracer, record)

    def _hand_on(self, tracer: Any, record: CallRecord) -> None:
        """One span to the SDK path's processors."""
        if self._direct is not None:
            self._direct.export(record)
        else:
            export_record(tracer, self._preset, record, self._sdk_queues)

    # ---- flush / shutdown ------------------------------------------------------------

    def pending_count(self) -> int:
        return len(self._queue) + len(self._waiting)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every submitted record is exported and handed to the provider."""
        deadline = time.monotonic() + timeout_s
        ok = True
        looked, gap = -_FLUSH_LOOK_S, _FLUSH_LOOK_S
        while True:
            if self._thread.is_alive() and os.getpid() == self._pid:
                # Queued records go out now; those that wait (a payload, statistics)
                # are looked at again after _FLUSH_LOOK_S, then twice as long each time
                # up to the worker's own tick.  Waking the worker for them after every
                # drain spun it: each drain notifies this loop, which woke it again (4.7
                # s of CPU in a 5 s flush with level-10 spans waiting on a slow store,
                # the GIL held through most of it).
                now = time.monotonic()
                if self._queue or self._let_go_queue:
                    self.wake()
                elif self._waiting and now - looked >= gap:
                    looked, gap = now, min(2 * gap, max(self.interval_s, _FLUSH_LOOK_S))
                    self.wake()
            else:
                self._drain()
            with self._idle:
                empty = not self._queue and not self._waiting and self._busy == 0
                if empty:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ok = False
                    break
                self._idle.wait(min(remaining, _FLUSH_LOOK_S))
        for hook in self.flush_hooks:
            try:
                ok = hook(max(0.0, deadline - time.monotonic())) and ok
            except Exception as exc:  # noqa: BLE001
                health.report("flush_errors", "a flush hook failed", exc)
                ok = False
        if self._native is not None:
            ok = self._native.flush(deadline) and ok
        if self.tracer is None and self._tracer_factory is not None and not self.flush_hooks:
            return ok
        force_flush = getattr(self.provider, "force_flush", None)
        if force_flush is not None:
            ok = self._force_flush(force_flush, deadline) and ok
        return ok

    def _force_flush(self, force_flush: Callable[[int], Any], deadline: float) -> bool:
        """The provider's force_flush, waited for no longer than ``deadline``.

        The SDK's BatchSpanProcessor ignores its timeout and exports synchronously,
        retrying a dead endpoint for up to OTEL_EXPORTER_OTLP_TIMEOUT per batch, and
        returns True regardless; so it runs on a helper thread (one at a time) and a
        late one counts as not flushed.
        """
        remaining = max(0.0, deadline - time.monotonic())
        running = self._flusher
        if running is not None and running[0].is_alive():
            thread, result = running
        else:
            result = [False]

            def run() -> None:
                try:
                    result[0] = bool(force_flush(max(int(remaining * 1000), 1)))
                except Exception as exc:  # noqa: BLE001
                    health.report("flush_errors", "the tracer provider's force_flush failed", exc)

            thread = threading.Thread(
                target=run, name="otel_flashinfer-force-flush", daemon=True
            )
            try:
                threads.start(thread)
            except RuntimeError:  # interpreter shutdown (3.12+ refuses new threads)
                run()  # at exit there is no engine left to keep waiting
                return result[0]
            self._flusher = (thread, result)
        thread.join(remaining)
        if thread.is_alive():
            health.count("flush_timeouts")
            return False
        return result[0]

    def give_up_waiting(self, reason: str, timeout_s: float = _GIVE_UP_S) -> bool:
        """Hand on the spans still waiting for their payload (a blob store slow or down),
        statistics or GPU time, each saying what it did not wait for (``reason``): at
        shutdown and exit, where they would otherwise die with the worker, uncounted.
        Returns whether everything was handed on within ``timeout_s`` (False with
        nothing waiting: what kept the flush that called it from finishing still holds).
        A worker mid-pass counts as holding some: it pops each waiting record to look at
        it, so the deque can be empty just then."""
        if not ((self._waiting or self._busy) and self._thread.is_alive()
                and os.getpid() == self._pid):
            return False
        self._give_up = reason
        self.wake()
        try:
            return self.flush(timeout_s)
        finally:
            self._give_up = None  # later calls (other exit handlers') wait as usual

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        ok = self.flush(timeout_s)
        if type(self._queue) is _ClosedQueue:
            return ok
        if not ok:
            ok = self.give_up_waiting("shutdown", min(_GIVE_UP_S, timeout_s))
        # Calls still in flight (another thread's, across uninstrument() or a new
        # instrument()) end after this: their records are counted as dropped (what they
        # hold on the GPU given back), never left in a queue that no worker reads.  What
        # was queued before is the worker's: it drains it once more as it stops, and
        # counts what it could not hand on (only the worker pops it).
        self._late = self._queue
        self._queue = _ClosedQueue(self)
        self._stopping = True
        self._wake.set()
        if not (self._thread.is_alive() and os.getpid() == self._pid):
            self._sweep_late()
        elif self._thread is not threading.current_thread():
            # Its last pass, before the sender it hands that pass to stops.
            self._thread.join(min(_GIVE_UP_S, timeout_s))
        if self._native is not None:
            ok = self._native.shutdown(min(_GIVE_UP_S, timeout_s) if ok else 0.0) and ok
        # The application's exporters as they were (what its processors still hold after
        # this goes out uncounted: no one reads ``counters()`` after tracing stopped).
        export_watch.unwatch(self._watched)
        return ok


class _ClosedQueue:
    """A stopped pipeline's queue: what is appended is counted as dropped and its GPU
    work given back.  The C hot path reads ``_queue`` on each call (its length, then
    ``append``), as ``submit``."""

    __slots__ = ("_pipeline",)

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def __len__(self) -> int:
        return 0

    def append(self, record: CallRecord) -> None:
        health.report("spans_dropped", "spans of calls that ended after tracing stopped "
                      "were dropped", n=record.spans())
        self._pipeline._give_back(record)  # noqa: SLF001 - the pipeline's own queue

    def popleft(self) -> CallRecord:
        raise IndexError("a stopped pipeline's queue is empty")


def export_record(tracer: Any, preset: _PresetIds | None, record: CallRecord,
                  queues: list[Any] | None = None) -> None:
    """Build and end one SDK span from a record, keeping its ids and times; ``queues``:
    the provider's batch queues, counted when the span ends into them full."""
    if record.parent is not None:
        context = trace_api.set_span_in_context(NonRecordingSpan(record.parent))
    else:
        context = _ROOT_CONTEXT
    if preset is not None:
        preset.trace_id = record.trace_id
        preset.span_id = record.span_id
    span = tracer.start_span(
        record.name,
        context=context,
        kind=SpanKind.INTERNAL,
        attributes=record.attributes,
        links=record.links,
        start_time=record.start_ns,
        record_exception=False,
        set_status_on_exception=False,
    )
    if preset is not None:
        preset.trace_id = preset.span_id = None
    if not span.is_recording():
        return
    for name, attributes, timestamp in record.events:
        span.add_event(name, attributes, timestamp)
    if record.error is not None:
        exc_type, message, stacktrace = record.error
        span.add_event(
            "exception",
            {
                "exception.type": exc_type,
                "exception.message": message,
                "exception.stacktrace": stacktrace,
                "exception.escaped": "True",
            },
            record.end_ns,
        )
        span.set_status(Status(StatusCode.ERROR, f"{exc_type}: {message}"))
    elif record.attributes.get("flashinfer.cuda_error"):
        span.set_status(Status(StatusCode.ERROR, str(record.attributes["flashinfer.cuda_error"])))
    if queues and span.get_span_context().trace_flags.sampled:
        count_full_queues(queues)  # only a sampled span reaches a batch processor's queue
    span.end(end_time=record.end_ns)
