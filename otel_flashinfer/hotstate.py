"""What a traced call reads on its way in, in one place: the sampled trace flags, the
span context the process was started under, the plan each wrapper object last ran,
and OTel's context variable.

The Python wrapper (``spans``) and the C hot path (``native``) both read these, so they
live here rather than in either: neither imports the other, and nothing here imports
the runtime that builds them.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as context_api
from opentelemetry.trace import SpanContext, TraceFlags

#: Flags of every span we start: sampled, with a random trace id.
SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
#: Wrapper objects whose last plan is remembered (the oldest is forgotten first).
MAX_INSTANCES = 4096

#: The span context this process was started under (``otel-flashinfer run`` passes
#: TRACEPARENT): the parent of calls on threads that have no current span.  The C hot
#: path reads it from this module's dict on every root call.
process_parent: SpanContext | None = None


class Instances:
    """Per-object state of wrapper classes: the plan span a later run links to.

    Keyed by ``id(self)`` and bounded, so it holds no reference to user objects.  A
    plain dict in insertion order (the C hot path updates the same dict): a re-planned
    object moves to the end, and the oldest entry goes first when full.
    """

    def __init__(self) -> None:
        self.plans: dict[int, SpanContext] = {}

    def forget(self, key: int) -> None:
        self.plans.pop(key, None)

    def remember_plan(self, key: int, span_context: SpanContext) -> None:
        plans = self.plans
        plans.pop(key, None)
        plans[key] = span_context
        if len(plans) > MAX_INSTANCES:
            del plans[next(iter(plans))]

    def plan_of(self, key: int) -> SpanContext | None:
        return self.plans.get(key)


instances = Instances()


def context_var() -> Any:
    """The ContextVar behind OTel's default runtime context, used directly on the hot
    path (two Python frames fewer per get/attach/detach); None for any other runtime
    context, which then goes through the public API."""
    runtime_context = getattr(context_api, "_RUNTIME_CONTEXT", None)
    if type(runtime_context).__name__ != "ContextVarsRuntimeContext":
        return None
    return getattr(runtime_context, "_current_context", None)
