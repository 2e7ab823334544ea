"""``otel-flashinfer run -- CMD...``: instrumentation in every Python process CMD starts.

The launcher opens a span for the run, puts the W3C ``TRACEPARENT``/``TRACESTATE`` of
it into the environment and prepends ``_bootstrap/`` (a ``sitecustomize``) to
``PYTHONPATH``.  Every Python process that inherits that environment (the command,
its subprocesses, multiprocessing spawn and forkserver workers) then runs
``bootstrap_child`` at startup: it attaches the parent context for the process'
lifetime, so its spans continue the launcher's trace, and instruments itself.
Forked children inherit all of it; the pipeline restarts its thread after fork, and
``runtime.install_fork_exit_flush`` makes a multiprocessing fork child flush before its
``os._exit``.  Where the package is installed, its start-up hook (``_autostart``) may
have run ``bootstrap_child`` already in that process; it runs once either way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

_LOG = logging.getLogger(__name__)

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"
RUN_SPAN_NAME = "otel-flashinfer run"
DEFAULT_LEVEL = "1"

_process_token: Any = None
_process_context: Any = None
_bootstrapped = False


def bootstrap_dir() -> str:
    return str(BOOTSTRAP_DIR)


def child_environment(environ: Mapping[str, str], carrier: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: level default 1, bootstrap first on PYTHONPATH (once),
    and the run span's W3C context (pure)."""
    env = dict(environ)
    if not env.get("OTEL_FLASHINFER_LEVEL", "").strip():
        env["OTEL_FLASHINFER_LEVEL"] = DEFAULT_LEVEL
    boot = bootstrap_dir()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *parts])
    env.pop("TRACEPARENT", None)
    env.pop("TRACESTATE", None)
    if carrier.get("traceparent"):
        env["TRACEPARENT"] = carrier["traceparent"]
        if carrier.get("tracestate"):
            env["TRACESTATE"] = carrier["tracestate"]
    return env


def context_from_environment(environ: Mapping[str, str]) -> Any:
    """The OTel context carried by ``TRACEPARENT``/``TRACESTATE`` (empty if none)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {}
    if environ.get("TRACEPARENT"):
        carrier["traceparent"] = environ["TRACEPARENT"]
        if environ.get("TRACESTATE"):
            carrier["tracestate"] = environ["TRACESTATE"]
    return TraceContextTextMapPropagator().extract(carrier)


def inject_carrier(context: Any = None) -> dict[str, str]:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return carrier


def process_parent_context() -> Any:
    """The context this process was started under (``TRACEPARENT``), or None.

    Threads other than the main one start with an empty context; spans.py can use
    this as the parent for calls that find no current span.
    """
    return _process_context


def bootstrap_child(environ: MutableMapping[str, str] | None = None) -> bool:
    """Run in a started process (from ``sitecustomize`` or the installed start-up hook,
    ``_autostart``; once, whichever comes first): continue the parent's trace and
    instrument.  Never raises: a broken tracer must not stop the user's program."""
    global _process_token, _process_context, _bootstrapped
    if _bootstrapped:
        return True
    _bootstrapped = True
    env = os.environ if environ is None else environ
    try:
        from opentelemetry import context as context_api
        from opentelemetry import trace as trace_api

        ctx = context_from_environment(env)
        if trace_api.get_current_span(ctx).get_span_context().is_valid:
            _process_context = ctx
            _process_token = context_api.attach(ctx)
            from . import hotstate

            hotstate.process_parent = trace_api.get_current_span(ctx).get_span_context()
    except Exception as exc:  # noqa: BLE001
        _warn(f"could not continue the parent trace: {exc}")
    try:
        import otel_flashinfer

        otel_flashinfer.instrument()
        from .runtime import install_fork_exit_flush

        install_fork_exit_flush()
        return True
    except Exception as exc:  # noqa: BLE001
        _warn(f"instrumentation is off in process {os.getpid()}: {exc}")
        return False


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"otel-flashinfer: {message}\n")
    except Exception:  # noqa: BLE001
        pass


def _provider_and_tracer() -> tuple[Any, Any]:
    from opentelemetry import trace as trace_api

    from .config import load_settings
    from .provider import resolve_provider
    from .version import __version__

    provider = resolve_provider(load_settings().traces_file)
    if isinstance(provider, trace_api.ProxyTracerProvider):
        provider = trace_api.get_tracer_provider()
    return provider, provider.get_tracer("otel_flashinfer", __version__)


def _forward_signals(proc: subprocess.Popen[bytes]) -> dict[int, Any]:
    previous: dict[int, Any] = {}

    def forward(signum: int, _frame: Any) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread, or unsupported
            pass
    return previous


def run_command(argv: Sequence[str]) -> int:
    """``otel-flashinfer run [--] CMD...``: run CMD traced; returns its exit code
    (128 + N when a signal N ended it, as shells report it)."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        _warn("usage: otel-flashinfer run -- COMMAND [ARGS...]")
        return 2
    from opentelemetry import trace as trace_api
    from opentelemetry.trace import SpanKind, Status, StatusCode

    from .config import load_settings

    load_settings(environ=child_environment(os.environ, {}))  # a bad value fails here, named
    parent = None
    if not trace_api.get_current_span().get_span_context().is_valid:
        parent = context_from_environment(os.environ)
    provider, tracer = _provider_and_tracer()
    span = tracer.start_span(
        RUN_SPAN_NAME, context=parent, kind=SpanKind.INTERNAL,
        attributes={"process.command": args[0], "process.command_args": args},
    )
    context = trace_api.set_span_in_context(span, parent)
    carrier = inject_carrier(context)
    if not carrier.get("traceparent"):
        carrier = _synthetic_carrier()
    env = child_environment(os.environ, carrier)
    code = 127
    try:
        proc = subprocess.Popen(args, env=env)
    except OSError as exc:
        _warn(f"cannot run {args[0]!r}: {exc}")
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        span.record_exception(exc)
    else:
        previous = _forward_signals(proc)
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = 128 - returncode if returncode < 0 else returncode
        span.set_attribute("process.exit.code", code)
        if code != 0:
            span.set_status(Status(StatusCode.ERROR, f"exit code {code}"))
    span.end()
    force_flush = getattr(provider, "force_flush", None)
    if force_flush is not None:
        try:
            force_flush(30_000)
        except Exception as exc:  # noqa: BLE001
            _LOG.debug("otel_flashinfer: flush failed: %s", exc)
    return code


def _synthetic_carrier() -> dict[str, str]:
    """Tracing is off in the launcher (no SDK, OTEL_SDK_DISABLED): still give the
    children one shared trace id so their spans land in one trace."""
    from random import getrandbits

    trace_id = getrandbits(128) or 1
    span_id = getrandbits(64) or 1
    return {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
