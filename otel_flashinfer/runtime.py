"""The one live instrumentation state of a process: settings, pipeline and the
optional per-level machinery (GPU timing, statistics, blobs, journal).

``instrument()`` starts it, ``uninstrument()`` stops it.  Everything that depends on
the tracer provider is resolved lazily, on the first traced call, so an application
that configures OpenTelemetry after importing us still gets its own provider.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import SpanKind

from . import health, native, threads
from .config import Settings, load_settings
from .pipeline import Pipeline
from .version import __version__

SCOPE_NAME = "otel_flashinfer"

_lock = threading.RLock()
_current: Runtime | None = None
_generation = 0


class _LazyTracer:
    """Resolves the provider on first use (background thread or first root span)."""

    def __init__(self, traces_file: str) -> None:
        self.traces_file = traces_file
        self.provider: Any = None
        self.tracer: Any = None
        self.sampler: Any = None
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget the resolved provider (it was handed over); the next use resolves."""
        with self._lock:
            self.provider = self.tracer = self.sampler = None

    def resolve(self) -> Any:
        if self.tracer is None:
            with self._lock:
                if self.tracer is None:
                    from .provider import resolve_provider

                    provider = resolve_provider(self.traces_file)
                    tracer = provider.get_tracer(SCOPE_NAME, __version__)
                    self.sampler = getattr(tracer, "sampler", None)
                    self.provider = provider
                    self.tracer = tracer
                    # atexit runs last-registered first: re-register so that our flush
                    # runs before the provider (created later) shuts down on exit.
                    atexit.unregister(_at_exit)
                    atexit.register(_at_exit)
        return self.tracer


class Runtime:
    """Live state for one ``instrument()``; replaced, never mutated, on re-configuration."""

    def __init__(self, settings: Settings) -> None:
        global _generation
        self.settings = settings
        # Before any wrapper or hook is made: which of the two kinds they are.
        native.c_hot_path = settings.c_hot_path
        _generation += 1
        self.generation = _generation
        self._lazy = _LazyTracer(settings.traces_file)
        self._root_always = False
        self.pipeline = Pipeline(
            tracer=None, tracer_factory=self._resolve, max_queue=settings.queue_size,
            native_export=settings.native_export,
        )
        self.journal: Any = None
        self.stats: Any = None
        self.blobs: Any = None
        self.gpu_timer: Any = None
        #: (before, after) pairs run around each call, outermost first: statistics and
        #: blobs capture inputs before the GPU timer starts and outputs after it ends.
        self.hooks: list[tuple[Callable[..., Any], Callable[..., Any]]] = []
        self._start_extensions()

    def _resolve(self) -> tuple[Any, Any]:
        tracer = self._lazy.resolve()
        return tracer, self._lazy.provider

    def _start_extensions(self) -> None:
        """Optional per-level machinery; a part that cannot start is reported, not raised
        (except a bad configuration, which ``instrument()`` must name)."""
        settings = self.settings
        if settings.journal_dir:
            try:
                from .journal import open_journal
            except ImportError:
                open_journal = None
            if open_journal is not None:
                try:
                    self.journal = open_journal(settings, self)
                except Exception as exc:  # noqa: BLE001
                    health.report("journal_errors", "could not open the crash journal", exc)
        if settings.level >= 5:
            try:
                from .stats.hooks import make_hooks
                from .stats.recorder import StatsRecorder

                self.stats = StatsRecorder(stats_max_mb=settings.stats_max_mb,
                                           on_low=self.pipeline.wake,
                                           gpu_time=settings.gpu_timing)
                self.hooks.append(make_hooks(self.stats))
            except Exception as exc:  # noqa: BLE001
                health.report("stats_errors", "could not start tensor statistics", exc)
        if settings.level >= 10:
            try:
                self._start_blobs()
            except Exception as exc:
                from .config import ConfigError

                if isinstance(exc, (ConfigError, OSError, ValueError)):
                    raise  # a store that cannot be written is a startup error naming the URL
                health.report("blob_errors", "could not start the blob recorder", exc)
        try:
            self._start_gpu_timing()
        except Exception as exc:  # noqa: BLE001
            health.report("gpu_timing_errors", "could not start GPU timing", exc)

    def resolve_provider(self) -> Any:
        """Pick (or build) the tracer provider now rather than at the first span."""
        self._lazy.resolve()
        return self._lazy.provider

    def provider_changed(self) -> None:
        """The global provider changed hands (``handoff``): resolve it again, so spans
        built from now on go to the new one."""
        self._lazy.reset()
        self._root_always = False
        tracer = self._lazy.resolve()
        self.pipeline.provider = self._lazy.provider
        self.pipeline._use_tracer(tracer)  # noqa: SLF001 - the pipeline is ours

    def _start_blobs(self) -> None:
        from .blobs.capture import BlobRecorder
        from .blobs.hooks import make_hooks
        from .blobs.store import StoreError
        from .config import OTEL_FLASHINFER_BLOB_URL, ConfigError

        try:
            self.blobs = BlobRecorder(self.settings)
        except StoreError as exc:
            if isinstance(exc.__cause__, (ImportError, ValueError)):
                # fsspec's protocol is known but its package is missing (gs:// without
                # gcsfs), or the URL is malformed: the variable's error, named.
                url = self.settings.blob_url
                raise ConfigError(
                    f"{OTEL_FLASHINFER_BLOB_URL}={url!r}: {exc.__cause__}") from None
            raise
        self.pipeline.flush_hooks.append(self.blobs.flush)
        self.hooks.append(make_hooks(self.settings, self.blobs))

    def _start_gpu_timing(self) -> None:
        if self.settings.level >= 3 and self.settings.gpu_timing:
            from . import gpu_timing

            hooks = gpu_timing.make_hooks()
            if hooks is not None:
                self.gpu_timer = gpu_timing.timer
                self.pipeline.gpu_times = gpu_timing.HANDLES
                self.hooks.append(hooks)

    def sample_root(self, trace_id: int, name: str) -> bool:
        """The sampler's decision for a new root span, made on the caller's thread so
        that unsampled calls cost nothing more."""
        if self._root_always:
            return True
        self._lazy.resolve()
        sampler = self._lazy.sampler
        if sampler is None or sampler is sampling.ALWAYS_ON or (
            type(sampler) is sampling.ParentBased and sampler._root is sampling.ALWAYS_ON
        ):
            self._root_always = True  # the SDK default: every root is sampled
            return True
        result = sampler.should_sample(None, trace_id, name, SpanKind.INTERNAL)
        return result.decision.is_sampled()

    def call_hooks(self, level: int) -> list[tuple[Callable[..., Any], Callable[..., Any]]]:
        """(before, after) pairs the wrapper runs around each call at ``level``."""
        return list(self.hooks) if level == self.settings.level else []

    def replay_timer(self) -> Any:
        return self.gpu_timer

    def flush(self, timeout_s: float) -> bool:
        return self.pipeline.flush(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> bool:
        ok = self.pipeline.shutdown(timeout_s)
        self._settle_recovered(ok)
        if self.blobs is not None:
            try:
                ok = self.blobs.shutdown(timeout_s) and ok
            except Exception as exc:  # noqa: BLE001
                health.report("blob_errors", "could not shut the blob recorder down", exc)
        if self.journal is not None:
            try:
                self.journal.close()
            except Exception as exc:  # noqa: BLE001
                health.report("journal_errors", "could not close the crash journal", exc)
        return ok

    def _settle_recovered(self, flushed: bool) -> None:
        """The crash journals this process recovered: deleted if their spans went out."""
        recovered = getattr(self.journal, "recovered", None)
        if recovered is not None:
            try:
                recovered.settle(flushed)
            except Exception as exc:  # noqa: BLE001
                health.report("journal_errors", "could not settle recovered journals", exc)


def current() -> Runtime | None:
    return _current


def provider_changed() -> None:
    """Called by ``handoff`` when the application's provider takes over."""
    runtime = _current
    if runtime is not None:
        try:
            runtime.provider_changed()
        except Exception as exc:  # noqa: BLE001
            health.report("provider_errors", "could not switch to the new tracer provider", exc)


def ensure(settings: Settings | None = None) -> Runtime:
    """The live runtime, started from ``settings`` (or the environment) if none is."""
    global _current
    with _lock:
        if _current is None:
            _current = Runtime(settings or load_settings())
        return _current


def start(settings: Settings) -> Runtime:
    """Replace the live runtime (flushing the old one)."""
    global _current
    with _lock:
        old, _current = _current, Runtime(settings)
    if old is not None:
        old.stop()
    return _current


def stop(timeout_s: float = 5.0) -> bool:
    global _current
    with _lock:
        old, _current = _current, None
    return old.stop(timeout_s) if old is not None else True


#: Longest that interpreter exit waits for pending spans.  The SDK's own shutdown waits
#: 30 s per BatchSpanProcessor when the collector is down; a serving engine must not.
EXIT_BUDGET_S = 5.0


def _at_exit() -> None:
    deadline = time.monotonic() + EXIT_BUDGET_S
    runtime = _current
    if runtime is not None:
        flushed = runtime.flush(EXIT_BUDGET_S)
        runtime._settle_recovered(flushed)  # noqa: SLF001 - the module's own runtime
        if not flushed:
            try:  # what still waits (a payload, statistics) goes out saying so
                runtime.pipeline.give_up_waiting("exit")
            except Exception as exc:  # noqa: BLE001
                health.report("export_errors", "could not hand on the spans still "
                              "waiting", exc)
    from .provider import left_behind, our_provider

    provider = our_provider()
    if provider is not None:
        # Daemon thread: whatever is still retrying when the budget runs out dies with us.
        closer = threading.Thread(target=provider.shutdown, name="otel_flashinfer-exit",
                                  daemon=True)
        threads.start(closer)
        closer.join(max(0.1, deadline - time.monotonic()))
        if closer.is_alive():
            lost = left_behind(provider)
            if lost:
                health.report("spans_dropped", "spans still queued or being sent when the "
                              "exit's time ran out were dropped", n=lost)


atexit.register(_at_exit)


def activate(settings: Settings) -> Runtime:
    """Start a runtime for ``settings`` (level >= 1) and hook CUDA graph replays."""
    from . import graphs, native

    runtime = start(settings)
    graphs.unpatch()
    graphs.patch(runtime, native.replay_gate_types())
    try:  # however it was turned on (instrument(), the environment, the launcher)
        install_fork_exit_flush()  # fork children leave by os._exit: no atexit flush
    except Exception as exc:  # noqa: BLE001 - reported, the program goes on
        health.report("config_errors", "no exit flush for multiprocessing fork children", exc)
    return runtime


class _ForkToken:
    """Kept alive for the process' lifetime: multiprocessing's after-fork registry
    holds it by weak reference."""


_fork_token = _ForkToken()
_fork_flush_installed = False


def _flush_now() -> None:
    try:
        from opentelemetry import trace as trace_api

        current = _current
        if current is not None and not current.flush(10.0):
            current.pipeline.give_up_waiting("exit")
        provider = trace_api.get_tracer_provider()
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            force_flush(10_000)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("otel_flashinfer").debug("otel_flashinfer: flush at exit failed: %s", exc)


def _register_exit_finalizer(_token: Any) -> None:
    import multiprocessing.util as mp_util

    mp_util.Finalize(_token, _flush_now, exitpriority=100)


def install_fork_exit_flush() -> None:
    """A multiprocessing child created by fork ends in ``os._exit`` (no ``atexit``);
    register a multiprocessing finalizer in each such child that flushes our spans."""
    global _fork_flush_installed
    if _fork_flush_installed:
        return
    _fork_flush_installed = True
    import multiprocessing.util as mp_util

    mp_util.register_after_fork(_fork_token, _register_exit_finalizer)


def deactivate(timeout_s: float = 5.0) -> bool:
    """Undo ``activate``: unhook graphs, flush and stop the runtime."""
    from . import graphs

    graphs.unpatch()
    return stop(timeout_s)


_env_checked = False


def from_environment() -> Runtime | None:
    """For ``traced`` without ``instrument()``: start once from OTEL_FLASHINFER_LEVEL."""
    global _env_checked
    if _env_checked:
        return _current
    with _lock:
        if not _env_checked:
            _env_checked = True
            try:
                settings = load_settings()
            except Exception as exc:  # noqa: BLE001 - reported, the program goes on
                health.report("config_errors", f"ignoring OTEL_FLASHINFER_* settings: {exc}", exc)
                return None
            from opentelemetry import trace

            from .provider import sdk_disabled

            nothing_to_record = sdk_disabled() and isinstance(
                trace.get_tracer_provider(), trace.ProxyTracerProvider)
            if settings.level > 0 and _current is None and not nothing_to_record:
                from .provider import check_env

                try:
                    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                        check_env()  # ours would be built: a bad OTLP setting turns us off
                except Exception as exc:  # noqa: BLE001 - reported, the program goes on
                    health.report("config_errors", f"tracing is off: {exc}")
                    return None
                activate(settings)
    return _current
