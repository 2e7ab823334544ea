"""One traced call -> one span: the wrapper factory and its hot path.

Everything fixed per target (name, parameter names, defaults, level, whether it is
a method) is worked out once, when wrapping.  The wrapper itself picks ids, attaches
a lightweight span context (so nested calls and the engine's own instrumentation
nest under it), takes two timestamps and, from level 3, the raw argument facts;
then it hands a ``CallRecord`` to the background pipeline.  Nothing on this path
formats a string or talks to an exporter.
"""

from __future__ import annotations

import functools
import inspect
import os
import traceback
from collections import OrderedDict
from collections.abc import Callable
from random import getrandbits
from time import time_ns
from typing import Any

from opentelemetry import context as context_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from . import describe as _describe
from . import graphs, health
from .config import Settings
from .pipeline import CallRecord

_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_PID = os.getpid()
_MAX_INSTANCES = 4096
_MAX_MESSAGE = 1024


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class ArgPlan:
    """How positional arguments map to names, and the defaults of missing ones."""

    __slots__ = ("defaults", "module", "names", "prefixes", "qualname", "signature", "skip_self",
                 "varargs")

    def __init__(self, fn: Callable[..., Any], is_method: bool) -> None:
        self.names: list[str] = []
        self.defaults: dict[str, Any] = {}
        self.varargs: str | None = None
        self.module: str = getattr(fn, "__module__", None) or ""
        self.qualname: str = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "")
        self.signature: inspect.Signature | None
        try:
            self.signature = inspect.signature(fn)
            params = list(self.signature.parameters.values())
        except (TypeError, ValueError):
            self.signature = None
            params = []
        self.skip_self = bool(is_method and params)
        if self.skip_self:
            params = params[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                self.names.append(p.name)
            elif p.kind is p.VAR_POSITIONAL:
                self.varargs = p.name
            if p.default is not p.empty and p.kind is not p.VAR_KEYWORD:
                self.defaults[p.name] = (f"flashinfer.arg.{p.name}",
                                         _describe.snapshot(p.default))
        self.prefixes = [f"flashinfer.arg.{name}" for name in self.names]

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Argument name -> value, defaults included (used where values are needed)."""
        if self.skip_self:
            args = args[1:]
        bound: dict[str, Any] = {}
        names = self.names
        for i, value in enumerate(args):
            if i < len(names):
                bound[names[i]] = value
            else:
                bound[f"{self.varargs or 'arg'}.{i - len(names)}"] = value
        bound.update(kwargs)
        return bound

    def describe_into(self, out: dict[str, Any], arg_snaps: list[Any],
                      kw_snaps: dict[str, Any]) -> None:
        """Snapshots -> ``flashinfer.arg.*`` attributes in ``out`` (background thread)."""
        names, prefixes = self.names, self.prefixes
        put = _describe.put_attributes
        for i, snap in enumerate(arg_snaps):
            if i < len(names):
                put(out, prefixes[i], snap)
            else:
                put(out, f"flashinfer.arg.{self.varargs or 'arg'}.{i - len(names)}", snap)
        for name, snap in kw_snaps.items():
            put(out, f"flashinfer.arg.{name}", snap)
        if self.defaults:
            given = names[: len(arg_snaps)]
            for name, (prefix, snap) in self.defaults.items():
                if name not in kw_snaps and name not in given:
                    put(out, prefix, snap)


class _Instances:
    """Per-object state of wrapper classes: the plan span a later run links to.

    Keyed by ``id(self)`` and bounded, so it holds no reference to user objects.
    """

    def __init__(self) -> None:
        self._plans: OrderedDict[int, SpanContext] = OrderedDict()

    def forget(self, key: int) -> None:
        self._plans.pop(key, None)

    def remember_plan(self, key: int, span_context: SpanContext) -> None:
        plans = self._plans
        plans[key] = span_context
        plans.move_to_end(key)
        if len(plans) > _MAX_INSTANCES:
            plans.popitem(last=False)

    def plan_of(self, key: int) -> SpanContext | None:
        return self._plans.get(key)


instances = _Instances()


def _error_facts(exc: BaseException) -> tuple[str, str, str]:
    message = str(exc)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type(exc).__qualname__, message, stack[-8192:]


#: The span context this process was started under (``otel-flashinfer run`` passes
#: TRACEPARENT): the parent of calls on threads that have no current span.
process_parent: SpanContext | None = None


def _new_ids(ctx: Any, runtime: Any, name: str) -> tuple[int, SpanContext | None] | None:
    """(trace id, parent) for a new span, or None when it will not be sampled."""
    span = ctx.get(_SPAN_KEY)
    parent = span.get_span_context() if span is not None else process_parent
    if parent is not None and parent.is_valid:
        if not parent.trace_flags & 1:
            return None
        return parent.trace_id, parent
    trace_id = getrandbits(128) or 1
    if not runtime.sample_root(trace_id, name):
        return None
    return trace_id, None


def make_wrapper(fn: Callable[..., Any], api_name: str, *, settings: Settings,
                 runtime: Any = None) -> Callable[..., Any]:
    """Build the traced wrapper for one target at ``settings.level`` (>= 1)."""
    from . import runtime as _runtime

    rt = runtime or _runtime.ensure(settings)
    is_method = "." in api_name and _first_param_is_self(fn)
    method = api_name.rsplit(".", 1)[-1] if is_method else ""
    plan = ArgPlan(fn, is_method)
    level = settings.level
    submit = rt.pipeline.submit
    get_current = context_api.get_current
    attach, detach = context_api.attach, context_api.detach
    new_record = CallRecord
    is_plan = method.startswith("plan")
    is_run = method.startswith("run") or method == "forward"
    is_init = method == "__init__"
    detailed = level >= 3
    hooks = rt.call_hooks(level)  # [(before, after)] for GPU timing, stats, blobs
    journal = rt.journal
    journal_name = api_name.encode("utf-8")[:64]

    def describe(record: CallRecord) -> None:
        arg_snaps, kw_snaps, result_snap = record.data
        attrs = record.attributes
        plan.describe_into(attrs, arg_snaps, kw_snaps)
        if result_snap is not _NO_RESULT and result_snap is not None:
            attrs.update(_describe.result_attributes(result_snap))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            ctx = get_current()
            # Untraced calls run after this block, never inside it: an exception of
            # the user's must not reach our handler (it would call fn a second time).
            ids = None if ctx.get(_SUPPRESS_INSTRUMENTATION_KEY) else _new_ids(
                ctx, rt, api_name)
            if ids is not None:
                trace_id, parent = ids
                span_id = getrandbits(64) or 1
                span_context = tuple.__new__(
                    SpanContext, (trace_id, span_id, False, _SAMPLED, DEFAULT_TRACE_STATE, True)
                )
                attrs: dict[str, Any] = {"flashinfer.api": api_name, "flashinfer.level": level}
                record = new_record(api_name, trace_id, span_id, parent, 0, 0, attrs)
                if is_method and args:
                    key = id(args[0])
                    attrs["flashinfer.instance.id"] = f"{_PID}:{key}"
                    if is_init:
                        instances.forget(key)
                    elif is_plan:
                        instances.remember_plan(key, span_context)
                    elif is_run:
                        plan_context = instances.plan_of(key)
                        if plan_context is not None:
                            record.links.append(Link(plan_context))
                capture = graphs.capture_state()
                if capture is not None:
                    attrs["flashinfer.cuda_graph.capturing"] = True
                    attrs["flashinfer.cuda_graph.id"] = capture.graph_id
                if detailed:
                    positional = args[1:] if plan.skip_self else args
                    arg_snaps = [_describe.snapshot(a) for a in positional]
                    kw_snaps = ({k: _describe.snapshot(v) for k, v in kwargs.items()}
                                if kwargs else _NO_KWARGS)
                states = ([before(record, plan, args, kwargs) for before, _ in hooks]
                          if hooks else ())
                record.start_ns = time_ns()
                slot = None
                if journal is not None:
                    slot = (journal.begin(record, arg_snaps, journal_name, plan, kw_snaps)
                            if detailed else journal.begin(record, None, journal_name))
                token = attach(ctx.__class__({**ctx, _SPAN_KEY: NonRecordingSpan(span_context)}))
        except Exception as exc:  # noqa: BLE001 - our failure must not stop the call
            health.report("wrapper_errors", f"tracing {api_name} failed before the call", exc)
            ids = None
        if ids is None:
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            record.end_ns = time_ns()
            try:
                detach(token)
                record.error = _error_facts(exc)
                for i in range(len(states) - 1, -1, -1):
                    hooks[i][1](record, states[i], _NO_RESULT, exc)
                if detailed:
                    record.data = (arg_snaps, kw_snaps, _NO_RESULT)
                    record.describe = describe
                if capture is not None:
                    capture.add(record)
                submit(record)
                if slot is not None:
                    journal.end(slot)
            except Exception as inner:  # noqa: BLE001
                health.report("wrapper_errors", f"tracing {api_name} failed after an error", inner)
            raise
        try:
            record.end_ns = time_ns()
            detach(token)
            for i in range(len(states) - 1, -1, -1):
                hooks[i][1](record, states[i], result, None)
            if detailed:
                record.data = (arg_snaps, kw_snaps, _describe.snapshot(result))
                record.describe = describe
            if capture is not None:
                capture.add(record)
            submit(record)
            if slot is not None:
                journal.end(slot)
        except Exception as exc:  # noqa: BLE001
            health.report("wrapper_errors", f"tracing {api_name} failed after the call", exc)
        return result

    wrapper._otel_flashinfer_api = api_name  # type: ignore[attr-defined]
    return wrapper


_NO_RESULT = object()
_NO_KWARGS: dict[str, Any] = {}  # shared, never written


def _first_param_is_self(fn: Callable[..., Any]) -> bool:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None or code.co_argcount == 0:
        return False
    return code.co_varnames[0] in ("self", "cls")

