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
import traceback
from collections.abc import Callable
from random import getrandbits
from time import time_ns
from typing import Any, NamedTuple

from opentelemetry import context as context_api
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.trace import NonRecordingSpan, SpanContext
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from . import describe as _describe
from . import graphs, health, hotstate, native
from .config import Settings
from .pipeline import CallRecord, Pipeline

_SAMPLED = hotstate.SAMPLED
_MAX_MESSAGE = 1024


class ArgPlan:
    """How positional arguments map to names, and the defaults of missing ones."""

    __slots__ = ("_missing", "defaults", "is_plan", "module", "names", "prefixes", "qualname",
                 "signature", "skip_self", "varargs")

    def __init__(self, fn: Callable[..., Any], is_method: bool) -> None:
        self.names: list[str] = []
        self.defaults: dict[str, Any] = {}
        self.varargs: str | None = None
        self.module: str = getattr(fn, "__module__", None) or ""
        self.qualname: str = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "")
        #: A ``plan*`` method: level 10 notes its page count (``BlobRecorder.note_plan``).
        self.is_plan = self.qualname.rsplit(".", 1)[-1].startswith("plan")
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
        #: (number of positional arguments, keyword names) -> attributes of the
        #: defaults such a call leaves out (described once, not on every span).
        self._missing: dict[tuple[Any, ...], dict[str, Any]] = {}

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
            key = (len(arg_snaps), tuple(kw_snaps))
            missing = self._missing.get(key)
            if missing is None:
                missing = {}
                given = set(names[: len(arg_snaps)]) | set(kw_snaps)
                for name, (prefix, snap) in self.defaults.items():
                    if name not in given:
                        put(missing, prefix, snap)
                if len(self._missing) < 64:
                    self._missing[key] = missing
            out.update(missing)


class Describer:
    """A call site's argument and result snapshots -> ``flashinfer.arg.*`` /
    ``flashinfer.result.*`` attributes (background thread).

    The native encoder calls ``attributes`` and keeps the encoded block for as long as
    the site's snapshots repeat, so an engine's steady state describes nothing; the
    SDK path calls the object itself on a record."""

    __slots__ = ("plan",)

    def __init__(self, plan: ArgPlan) -> None:
        self.plan = plan

    def attributes(self, data: list[Any], kw: dict[str, Any] | None,
                   result: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.plan.describe_into(out, data, kw or _NO_KWARGS)
        if result is not _NO_RESULT and result is not None:
            out.update(_describe.result_attributes(result))
        return out

    def __call__(self, record: CallRecord) -> None:
        record.attributes.update(self.attributes(record.data, record.kw, record.result))




def _error_facts(exc: BaseException) -> tuple[str, str, str]:
    """(type, message, traceback) of the user's exception; one whose ``__str__`` itself
    raises still gets a span."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = f"<unprintable {type(exc).__qualname__}>"
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    try:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # noqa: BLE001
        stack = ""
    return type(exc).__qualname__, message, stack[-8192:]


class _ApiContext:
    """``get``/``set``/``reset`` over the public OTel context API (fallback)."""

    get = staticmethod(context_api.get_current)
    set = staticmethod(context_api.attach)
    reset = staticmethod(context_api.detach)


class CallHooks(NamedTuple):
    """One target's traced call in three steps, for wrappers of any shape (a plain
    call, a coroutine, a generator: ``shapes``).  ``enter`` never raises; ``leave`` and
    ``failed`` report their own errors."""

    #: ``enter(args, kwargs)``: the record of a call about to run, its span current and
    #: its journal note taken; None when the call is not traced.
    enter: Callable[[tuple[Any, ...], dict[str, Any]], CallRecord | None]
    #: ``leave(record, result)``: the call returned ``result``.
    leave: Callable[[CallRecord, Any], Any]
    #: ``failed(record, exc)``: the call raised ``exc`` (the caller re-raises it).
    failed: Callable[[CallRecord, BaseException], None]
    #: ``(get, set, reset)`` of the context variable the span is made current in.
    context: tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Any]]


def make_wrapper(fn: Callable[..., Any], api_name: str, *, settings: Settings,
                 runtime: Any) -> Callable[..., Any]:
    """Build the traced wrapper for one target at ``settings.level`` (>= 1).

    ``runtime`` (``runtime.Runtime``) hands the wrapper everything live: the pipeline,
    the hooks, the journal.  The caller's thread allocates one ``CallRecord`` per call
    and, from level 3, one list plus one tuple per tensor for argument facts; nothing
    else outlives the call (see ``CallRecord``).
    """
    hooks, entry = _make_hooks(fn, api_name, settings, runtime)
    if entry is not None:
        return _native_wrapper(fn, api_name, entry, hooks.failed)
    enter, leave, failed = hooks.enter, hooks.leave, hooks.failed

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record = enter(args, kwargs)
        if record is None:
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            failed(record, exc)
            raise
        leave(record, result)
        return result

    wrapper._otel_flashinfer_api = api_name  # type: ignore[attr-defined]
    # torch.compile (Dynamo) inlines the original where it meets this wrapper: our host
    # code would not run in a compiled graph anyway, and its context lookups are not
    # traceable (fullgraph=True refused the whole model; without it, a graph break).
    wrapper._torchdynamo_inline = fn  # type: ignore[attr-defined]
    return wrapper


def make_hooks(fn: Callable[..., Any], api_name: str, *, settings: Settings,
               runtime: Any) -> CallHooks:
    """``make_wrapper``'s three steps, for a wrapper of another shape (``shapes``)."""
    return _make_hooks(fn, api_name, settings, runtime)[0]


def _make_hooks(fn: Callable[..., Any], api_name: str, settings: Settings,
                runtime: Any) -> tuple[CallHooks, Any]:
    """(the hooks, the C hot path's ``Entry`` or None where Python runs them)."""
    rt = runtime
    is_method = "." in api_name and _first_param_is_self(fn)
    method = api_name.rsplit(".", 1)[-1] if is_method else ""
    plan = ArgPlan(fn, is_method)
    level = settings.level
    submit = rt.pipeline.submit
    var = hotstate.context_var() or _ApiContext
    get_current, set_context, reset_context = var.get, var.set, var.reset
    context = (get_current, set_context, reset_context)
    for_call = CallRecord.for_call
    instances = hotstate.instances
    plan_of = instances.plan_of
    capture_state = graphs.capture_state
    snapshot = _describe.snapshot
    is_plan = method.startswith("plan")
    is_run = method.startswith("run") or method == "forward"
    is_init = method == "__init__"
    detailed = level >= 3
    skip_self = plan.skip_self
    hooks = tuple(rt.call_hooks(level))  # (before, after) for GPU timing, stats, blobs
    befores = tuple(before for before, _ in hooks)
    afters = tuple(after for _, after in reversed(hooks))
    journal = rt.journal
    journal_name = api_name.encode("utf-8")[:64]
    #: Shared by every record of this wrapper until the worker copies it (``own``).
    base_attrs: dict[str, Any] = {"flashinfer.api": api_name, "flashinfer.level": level}

    describe = Describer(plan)

    def on_capture(record: CallRecord, capture: Any) -> None:
        """A call inside a CUDA graph capture (rare): attributes of its own, now."""
        attrs = record.own()
        attrs["flashinfer.cuda_graph.capturing"] = True
        attrs["flashinfer.cuda_graph.id"] = capture.graph_id

    entry_type = native.entry_type(hotstate.context_var())
    if entry_type is not None:
        # GPU timing (innermost pair, gpu_timing.make_hooks) runs inside the C path.
        gpu = getattr(hooks[-1][0], "native", None) if hooks else None
        if gpu is not None:
            hooks = hooks[:-1]
            befores = tuple(before for before, _ in hooks)
            afters = tuple(after for _, after in reversed(hooks))
        entry = entry_type(
            api_name=api_name, base_attrs=base_attrs, name_bytes=journal_name, plan=plan,
            describe=describe, on_capture=on_capture, befores=befores, afters=afters,
            journal=journal, runtime=rt, submit=submit, gpu=gpu, detailed=detailed,
            is_method=is_method, is_init=is_init, is_plan=is_plan, is_run=is_run,
            skip_self=skip_self, pipeline=_direct_pipeline(rt.pipeline))
        _, failed = _end_hooks(api_name, entry.gpu_end, entry.journal_end, reset_context,
                               afters, detailed, describe, submit)
        return CallHooks(entry.enter, entry.leave, failed, context), entry

    def enter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallRecord | None:
        record = None
        try:
            ctx = get_current()
            # Untraced calls run after this block, never inside it: an exception of
            # the user's must not reach our handler (it would call fn a second time).
            if ctx.get(_SUPPRESS_INSTRUMENTATION_KEY):
                return None
            span = ctx.get(_SPAN_KEY)
            parent = span.get_span_context() if span is not None else hotstate.process_parent
            if parent is not None and parent.is_valid:
                if not parent.trace_flags & 1:
                    return None
                record = for_call(api_name, parent.trace_id, getrandbits(64) or 1, parent,
                                  base_attrs)
            else:
                trace_id = getrandbits(128) or 1
                if not rt.sample_root(trace_id, api_name):
                    return None
                record = for_call(api_name, trace_id, getrandbits(64) or 1, None, base_attrs)
            span_context = tuple.__new__(SpanContext, (
                record.trace_id, record.span_id, False, _SAMPLED, DEFAULT_TRACE_STATE, True))
            if is_method and args:
                key = record.instance = id(args[0])
                if is_init:
                    instances.forget(key)
                elif is_plan:
                    instances.remember_plan(key, span_context)
                elif is_run:
                    record.plan_link = plan_of(key)
            capture = capture_state() if graphs._capturing is not None else None
            if capture is not None:
                on_capture(record, capture)
                record.capture = capture
            arg_snaps = None
            if detailed:
                arg_snaps = [snapshot(a) for a in (args[1:] if skip_self else args)]
                record.data = arg_snaps
                if kwargs:
                    record.kw = {k: snapshot(v) for k, v in kwargs.items()}
            if befores:
                record.states = [before(record, plan, args, kwargs) for before in befores]
            record.start_ns = time_ns()
            if journal is not None:
                record.slot = (journal.begin(record, arg_snaps, journal_name, plan, record.kw)
                               if detailed else journal.begin(record, None, journal_name))
            record.token = set_context(ctx.__class__(
                {**ctx, _SPAN_KEY: NonRecordingSpan(span_context)}))
            return record
        except Exception as exc:  # noqa: BLE001 - our failure must not stop the call
            health.report("wrapper_errors", f"tracing {api_name} failed before the call", exc)
            if record is not None and record.slot is not None:
                journal.end(record.slot)  # the call runs untraced: no note left live
            return None

    leave, failed = _end_hooks(api_name, None, journal.end if journal is not None else None,
                               reset_context, afters, detailed, describe, submit)
    return CallHooks(enter, leave, failed, context), None


def _direct_pipeline(pipeline: Any) -> Any:
    """The pipeline whose queue the C hot path may append to itself (skipping
    ``submit``'s Python frame), or None when ``submit`` is not ``Pipeline.submit``."""
    return pipeline if getattr(type(pipeline), "submit", None) is Pipeline.submit else None


def _end_hooks(api_name: str, gpu_end: Callable[[CallRecord], Any] | None,
               journal_end: Callable[[Any], Any] | None,
               reset_context: Callable[[Any], Any], afters: tuple[Any, ...],
               detailed: bool, describe: Describer,
               submit: Callable[[CallRecord], None]) -> tuple[Callable[..., None],
                                                              Callable[..., None]]:
    """(leave, failed): a traced call's end in Python, returned or raised.  The record
    ends (with the exception's facts when it raised) and is handed on; the caller
    re-raises.  The C path has its own ``leave`` and takes ``failed`` only (with
    ``gpu_end``: its GPU timing runs in C)."""
    from . import _hotpath

    gpu_drop = _hotpath.gpu_drop if gpu_end is not None else None
    snapshot = _describe.snapshot

    def leave(record: CallRecord, result: Any, exc: BaseException | None = None) -> None:
        record.end_ns = time_ns()
        slot, record.slot = record.slot, None
        try:
            token, record.token = record.token, None
            if token is not None:
                try:
                    reset_context(token)
                except (ValueError, RuntimeError):
                    # Ended in another context than it began in (a coroutine closed by
                    # the garbage collector, outside its task): nothing of ours is
                    # current there, and the span still ends.
                    pass
            if exc is not None:
                if gpu_end is not None:
                    gpu_end(record)
                record.error = _error_facts(exc)
            states, record.states = record.states, None
            if states:
                n = len(states)
                for i, after in enumerate(afters):
                    after(record, states[n - 1 - i], result, exc)
            if detailed:
                record.result = snapshot(result) if exc is None else _NO_RESULT
                record.describe = describe
            capture, record.capture = record.capture, None
            if capture is not None:
                capture.add(record)
            submit(record)
        except Exception as inner:  # noqa: BLE001
            health.report("wrapper_errors", f"tracing {api_name} failed after "
                          f"{'the call' if exc is None else 'an error'}", inner)
            if exc is not None and gpu_drop is not None:
                gpu_drop(record)  # not submitted: its events go back to the pool
        finally:
            if slot is not None and journal_end is not None:
                try:  # the call is over: never left live for recovery
                    journal_end(slot)
                except Exception as inner:  # noqa: BLE001
                    health.report("wrapper_errors", "clearing a journal note failed", inner)

    def failed(record: CallRecord, exc: BaseException) -> None:
        leave(record, _NO_RESULT, exc)

    return leave, failed


def _native_wrapper(fn: Callable[..., Any], api_name: str, entry: Any,
                    failed: Callable[[CallRecord, BaseException], None]) -> Callable[..., Any]:
    """The wrapper over the C hot path (``native``): a ``_hotpath.Wrapper`` whose
    ``enter`` and ``leave`` do what the Python wrapper does and never raise; only the
    error path, ``failed``, stays in Python."""
    from . import _hotpath

    wrapper = _hotpath.Wrapper(entry, fn, failed)
    functools.update_wrapper(wrapper, fn)
    wrapper._otel_flashinfer_api = api_name
    return wrapper


_NO_RESULT = object()
_NO_KWARGS: dict[str, Any] = {}  # shared, never written
_NO_STATES: list[Any] = []  # shared, never written


def _first_param_is_self(fn: Callable[..., Any]) -> bool:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None or code.co_argcount == 0:
        return False
    return code.co_varnames[0] in ("self", "cls")

