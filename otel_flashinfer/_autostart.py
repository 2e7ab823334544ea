"""Env-only activation: what the installed ``otel_flashinfer_autostart.pth`` runs.

``OTEL_FLASHINFER_LEVEL=3 python app.py`` must trace, as ``FLASHINFER_LOGLEVEL=3``
logs, with no code change and no wrapper command.  Python runs every ``.pth`` line
that starts with ``import`` at interpreter start, before the application (the
pattern coverage.py uses for ``COVERAGE_PROCESS_START``); ours checks two
environment variables inline and imports this module only when the level is above
0 and ``OTEL_FLASHINFER_AUTOSTART`` is not 0, so a process with tracing off pays a
dictionary lookup.  Every Python process that inherits the environment
(subprocesses, multiprocessing workers) runs it too.

``start`` puts a provider in place first (``handoff``: the engine's own spans are
recorded, and an application that sets its own provider later takes over), then
does what ``otel-flashinfer run``'s bootstrap does: continue a ``TRACEPARENT`` if
one is given, and instrument.  FlashInfer is not imported here: its modules are
wrapped when the application imports them (post-import hooks).
It stands aside for ``opentelemetry-instrument``, which configures the SDK and
calls our instrumentor itself, and for our own command line tool.
"""

from __future__ import annotations

import os
import sys

#: Whether this process was activated by the start-up hook.
started = False

_AUTO_INSTRUMENTATION = os.path.join("opentelemetry", "instrumentation", "auto_instrumentation")


def opentelemetry_instrument_active(path: list[str] | None = None) -> bool:
    """``opentelemetry-instrument`` puts its ``sitecustomize`` folder on PYTHONPATH."""
    return any(p.rstrip(os.sep).endswith(_AUTO_INSTRUMENTATION) for p in (path or sys.path))


def _warn(message: str) -> None:
    try:
        sys.stderr.write(f"otel-flashinfer: {message}\n")
    except Exception:  # noqa: BLE001
        pass


def start() -> bool:
    """Activate instrumentation from the environment; whether it did.  Never raises."""
    global started
    if started:
        return True
    try:
        from .config import autostart_enabled, load_settings

        if not autostart_enabled() or opentelemetry_instrument_active():
            return False
        if os.path.basename(sys.argv[0] if sys.argv else "") == "otel-flashinfer":
            return False  # our own tool: pull/replay must not trace what they replay
        settings = load_settings()
        if settings.level <= 0:
            return False
        from . import handoff

        handoff.install(settings.traces_file)
    except Exception as exc:  # noqa: BLE001 - a broken tracer must not stop the program
        _warn(f"instrumentation is off in process {os.getpid()}: {exc}")
        return False
    from .launcher import bootstrap_child

    started = bootstrap_child()
    return started
