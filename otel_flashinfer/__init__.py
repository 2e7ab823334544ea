"""OpenTelemetry tracing for FlashInfer: every API call a span, GPU statistics as
span events, tensors in a blob store, all built off the caller's thread.

Public API (DESIGN.md): ``instrument``, ``uninstrument``, ``traced``, ``flush``,
``FlashInferInstrumentor``; ``counters`` shows our own dropped/failed work.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any, TypeVar, overload

from . import health as _health
from . import runtime as _runtime
from .config import ConfigError, Settings, load_settings
from .version import __version__

__all__ = [
    "ConfigError",
    "FlashInferInstrumentor",
    "Settings",
    "__version__",
    "counters",
    "flush",
    "instrument",
    "load_settings",
    "traced",
    "uninstrument",
]

F = TypeVar("F", bound=Callable[..., Any])


def _flashinfer_installed() -> bool:
    try:
        return importlib.util.find_spec("flashinfer") is not None
    except (ImportError, ValueError):
        return False


def instrument(level: int | None = None, **settings: Any) -> Settings:
    """Trace every FlashInfer API (and every ``traced`` function) at ``level``.

    Arguments override the ``OTEL_FLASHINFER_*`` environment; a bad value raises
    ``ConfigError`` naming it.  Level 0 installs nothing.
    """
    parsed = load_settings(level=level, **settings)
    uninstrument()
    if parsed.level == 0:
        return parsed
    from opentelemetry import trace

    from .provider import sdk_disabled

    if sdk_disabled() and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # OTEL_SDK_DISABLED=true and no provider of the application's: nothing could be
        # recorded, so install nothing rather than pay for spans that go nowhere.
        return parsed
    try:
        _activate(parsed)
    except Exception:
        # Nothing half-on: a runtime left active would try to build its provider
        # again on every traced call.
        uninstrument()
        raise
    return parsed


def _activate(parsed: Any) -> None:
    activated = False
    if _flashinfer_installed():
        try:
            from .instrumentor import FlashInferInstrumentor
        except ImportError as exc:  # a broken install: say so rather than trace nothing
            from .health import report

            hint = (" (is opentelemetry-instrumentation installed?)"
                    if "opentelemetry" in (getattr(exc, "name", None) or "") else "")
            report("instrumentor_unavailable", "FlashInfer is installed but its APIs are "
                   f"not traced: the instrumentor cannot be imported{hint}", exc)
            FlashInferInstrumentor = None
        if FlashInferInstrumentor is not None:
            FlashInferInstrumentor().instrument(settings=parsed)
            activated = _runtime.current() is not None
    if not activated:
        _runtime.activate(parsed)
    # Called from the application's code: its provider, if any, is set by now, and
    # the engine's own spans should go to the same provider as ours from here on.
    _runtime.ensure(parsed).resolve_provider()


def counters() -> dict[str, int]:
    """Our own counters: spans per export path, dropped spans and statistics, internal
    errors, and (``blob.*``) the level-10 recorder's payloads written and skipped."""
    out = _health.counters()
    runtime = _runtime.current()
    recorder = getattr(runtime, "blobs", None) if runtime is not None else None
    if recorder is not None:
        # One C-level copy: the recorder's threads may add a kind while we read.
        counts = dict(recorder.counters)
        out.update({f"blob.{k}": v for k, v in counts.items() if v})
    return out


def uninstrument() -> None:
    """Restore every wrapped FlashInfer API and stop tracing ``traced`` functions."""
    if _flashinfer_installed():
        try:
            from .instrumentor import FlashInferInstrumentor
        except ImportError:
            FlashInferInstrumentor = None
        if FlashInferInstrumentor is not None:
            instrumentor = FlashInferInstrumentor()
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()
    _runtime.deactivate()


def flush(timeout_s: float = 30) -> bool:
    """Wait until every pending span, statistic and blob has been handed on."""
    runtime = _runtime.current()
    if runtime is None:
        return True
    return runtime.flush(timeout_s)


@overload
def traced(fn: F, *, name: str | None = None) -> F: ...
@overload
def traced(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def traced(fn: Any = None, *, name: str | None = None) -> Any:
    """Trace a function or method of your own like a FlashInfer API.

    The span is named ``name`` or the function's qualified name.  The level is the
    live one (``instrument()`` or ``OTEL_FLASHINFER_LEVEL``), looked up per call so
    that decorating at import time and instrumenting later both work.
    ``OTEL_FLASHINFER_INCLUDE/_EXCLUDE`` apply to that name as to FlashInfer's APIs.
    On an ``async def`` or a generator the span covers the work, from the first step
    to the last, and the wrapper has the function's shape (``shapes``).
    """
    if fn is None:
        return functools.partial(traced, name=name)
    api_name = name or fn.__qualname__.replace(".<locals>", "")
    built: list[Any] = [None, -1]
    from .shapes import shape_of, shaped_wrapper

    shape = shape_of(fn)
    if shape != "call":  # async def, generators: the span lasts as long as the work
        def hooks() -> Any:
            runtime = _runtime.current() or _runtime.from_environment()
            if runtime is None:
                return None
            if built[1] != runtime.generation:
                built[0] = _build_hooks(fn, api_name, runtime)
                built[1] = runtime.generation
            return built[0]

        shaped = shaped_wrapper(fn, shape, hooks)
        shaped._otel_flashinfer_api = api_name  # type: ignore[attr-defined]
        return shaped

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        runtime = _runtime.current()
        if runtime is None:
            runtime = _runtime.from_environment()
            if runtime is None:
                return fn(*args, **kwargs)
        if built[1] != runtime.generation:
            built[0] = _build(fn, api_name, runtime)
            built[1] = runtime.generation
        return built[0](*args, **kwargs)

    wrapper._otel_flashinfer_api = api_name  # type: ignore[attr-defined]
    return wrapper


def _build(fn: Callable[..., Any], api_name: str, runtime: Any) -> Callable[..., Any]:
    """The traced wrapper for the live runtime; ``fn`` itself when the include/exclude
    patterns leave it out or building fails."""
    from .filters import selected

    settings = runtime.settings
    if not selected(api_name, settings.include, settings.exclude):
        return fn
    try:
        from .spans import make_wrapper

        return make_wrapper(fn, api_name, settings=runtime.settings, runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - never break the user's call
        from .health import report

        report("wrapper_errors", f"could not trace {api_name}; calling it untraced", exc)
        return fn


def _build_hooks(fn: Callable[..., Any], api_name: str, runtime: Any) -> Any:
    """``_build`` for a coroutine or generator: its ``spans.CallHooks``, or None."""
    from .filters import selected

    settings = runtime.settings
    if not selected(api_name, settings.include, settings.exclude):
        return None
    try:
        from .spans import make_hooks

        return make_hooks(fn, api_name, settings=settings, runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - never break the user's call
        from .health import report

        report("wrapper_errors", f"could not trace {api_name}; calling it untraced", exc)
        return None


def __getattr__(name: str) -> Any:
    if name == "FlashInferInstrumentor":
        from .instrumentor import FlashInferInstrumentor

        return FlashInferInstrumentor
    raise AttributeError(name)
