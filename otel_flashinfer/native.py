"""The optional C hot path (``csrc/hotpath.c``, built at install time when a compiler
exists): binds it once to the OTel context and our record type.

``entry_type()`` is the ``_hotpath.Entry`` class when the extension loaded and fits
this process (the default contextvars runtime context, the journal layout it was
built for), else None, and ``spans.make_wrapper`` then builds the pure-Python wrapper,
which does the same work.  ``enabled = False`` forces that path (tests compare both).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from . import health

#: Tests set this to False to exercise the pure-Python wrapper.
enabled = True
#: ``OTEL_FLASHINFER_C_HOT_PATH`` of the live runtime (``runtime.Runtime`` sets it):
#: False, wrappers (and the statistics hooks that follow them) are the Python ones.
c_hot_path = True

_lock = threading.Lock()
_entry: Any = None
_state = "unloaded"  # unloaded | ready | unavailable


def _bind(var: Any) -> Any:
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
    from opentelemetry.trace import NonRecordingSpan, SpanContext
    from opentelemetry.trace.propagation import _SPAN_KEY
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE

    from . import _hotpath, describe, graphs, hotstate, pipeline
    from . import journal_format as fmt

    if (_hotpath.BODY_SIZE, _hotpath.ARGS_OFFSET) != (fmt.BODY.size, fmt.ARGS_OFFSET):
        raise RuntimeError("the C hot path was built for another journal layout")
    _hotpath.setup(
        var=var, suppress_key=_SUPPRESS_INSTRUMENTATION_KEY, span_key=_SPAN_KEY,
        span_context_type=SpanContext, non_recording_type=NonRecordingSpan,
        record_type=pipeline.CallRecord, empty=pipeline._EMPTY,
        sampled_flags=hotstate.SAMPLED, default_trace_state=DEFAULT_TRACE_STATE,
        spans_globals=vars(hotstate), graphs_globals=vars(graphs),
        capture_state=graphs.capture_state, snapshot=describe.snapshot,
        plans=hotstate.instances.plans, max_plans=hotstate.MAX_INSTANCES,
        report=health.report, count=health.count, plain_getters=_plain_getters(),
        plain_span_init=_plain_span_init(NonRecordingSpan),
    )
    graphs._untrack = _hotpath.untrack  # noqa: SLF001 - replay records, out of the GC
    return _hotpath.Entry


_CAST_NAMES = {"_context", "typing", "cast", "trace_api", "SpanContext"}


def _plain_getters() -> tuple[Any, ...]:
    """``get_span_context`` functions whose whole body is ``return self._context``
    (checked here, so an SDK that changes them loses only the shortcut)."""
    from opentelemetry.trace import NonRecordingSpan

    classes: list[Any] = [NonRecordingSpan]
    try:
        from opentelemetry.sdk.trace import Span

        classes.append(Span)
    except ImportError:
        pass
    getters = []
    for cls in classes:
        fn = cls.__dict__.get("get_span_context")
        code = getattr(fn, "__code__", None)
        # ``return self._context``, possibly through ``typing.cast(SpanContext, ...)``
        if (code is not None and code.co_argcount == 1 and "_context" in code.co_names
                and set(code.co_names) <= _CAST_NAMES):
            getters.append(fn)
    return tuple(getters)


def _plain_span_init(cls: type) -> bool:
    """Whether ``cls.__init__`` does nothing but ``self._context = context`` (the C path
    then makes the current span without running it; any other ``__init__`` runs)."""
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    return (code is not None and code.co_argcount == 2 and code.co_names == ("_context",)
            and not code.co_freevars and cls.__new__ is object.__new__
            and "__slots__" not in cls.__dict__)


def entry_type(var: Any) -> Any:
    """``_hotpath.Entry`` bound to ``var`` (OTel's context variable), or None."""
    global _entry, _state
    if not enabled or not c_hot_path or var is None:
        return None
    if _state == "unloaded":
        with _lock:
            if _state == "unloaded":
                try:
                    _entry = _bind(var)
                    _state = "ready"
                except ImportError:
                    _state = "unavailable"  # built without a compiler: Python path
                except Exception as exc:  # noqa: BLE001 - fall back, say why once
                    _state = "unavailable"
                    health.report("native_unavailable", "the C hot path did not load; "
                                  "using the Python wrapper", exc)
    return _entry if _state == "ready" else None


def register_api(capsule: Any) -> None:
    """Lend the C hot path the CUDA event pool's events and tensor facts, and the span
    encoder its GPU-time resolution (``csrc/hotpath_api.h``), once ``gpu_timing`` has
    built the pool."""
    try:
        from . import _otlp
    except ImportError:
        pass
    else:
        try:
            _otlp.register_api(capsule)
        except Exception as exc:  # noqa: BLE001 - the worker then resolves them in Python
            health.report("native_unavailable", "the span encoder cannot use the event pool",
                          exc)
    try:
        from . import _hotpath
    except ImportError:
        return
    try:
        _hotpath.register_api(capsule)
    except Exception as exc:  # noqa: BLE001 - GPU times then come from Python hooks only
        health.report("native_unavailable", "the C hot path cannot use the event pool", exc)


def register_stats(capsule: Any, pending_type: type, group_type: type | None = None) -> bool:
    """Lend the span encoder the statistics extension's event query
    (``csrc/stats_api.h``), so it resolves level-5 statistics without Python; False
    when it cannot (the worker then resolves them in Python)."""
    try:
        from . import _otlp
    except ImportError:
        return False
    try:
        if group_type is None:
            _otlp.register_stats(capsule, pending_type)
        else:
            _otlp.register_stats(capsule, pending_type, group_type)
    except Exception as exc:  # noqa: BLE001 - the Python resolver still works
        health.report("native_unavailable", "the span encoder cannot resolve statistics",
                      exc)
        return False
    return True


def _hotpath_types(*names: str) -> tuple[Any, ...] | None:
    """The C hot path's types by name, or None when it is off, missing, or lacks one."""
    if not enabled:
        return None
    try:
        from . import _hotpath
    except ImportError:
        return None
    found = tuple(getattr(_hotpath, name, None) for name in names)
    return None if any(t is None for t in found) else found


def switch_type() -> Any:
    """``_hotpath.Switch`` (a hook whose target can be swapped later), or None when the
    C hot path is off or missing."""
    found = _hotpath_types("Switch")
    return found[0] if found else None


def replay_gate_types() -> tuple[Any, ...] | None:
    """``(_hotpath.ReplayGate, _hotpath.GraphSkip)``: CUDA graph replays the sampler
    says are untraced skip ``graphs``' Python replay; None when the C hot path is off
    (``enabled``) or missing (every replay then runs the Python one).
    ``OTEL_FLASHINFER_C_HOT_PATH=0`` keeps it: it stands before torch's replay, which
    ``torch.compile`` does not trace, not before a FlashInfer function."""
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        return None  # the gate compares CLOCK_MONOTONIC with the sampler's perf_counter
    found = _hotpath_types("ReplayGate", "GraphSkip")
    if found is not None and not hasattr(found[1], "gate_closed"):
        return None  # an extension built before gated graphs could be armed
    return found
