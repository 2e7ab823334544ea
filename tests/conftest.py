"""Shared test setup: the `gpu` marker skips cleanly on machines without CUDA."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# One in-memory provider for the whole session: OpenTelemetry allows setting the
# global tracer provider only once per process.
_EXPORTER = None


def _memory_exporter():  # noqa: ANN202
    global _EXPORTER
    if _EXPORTER is None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        _EXPORTER = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture(scope="session", autouse=True)
def _global_provider():  # noqa: ANN202
    """The in-memory provider is the process's global one from the start.  OTel lets the
    global provider be set once: a test that instrumented first (building the embedded
    default) left ``spans`` recording nothing when run on its own or in another order."""
    _memory_exporter()


@pytest.fixture(autouse=True)
def _no_shell_bsp_settings(monkeypatch):  # noqa: ANN001, ANN202
    """The shell's OTEL_BSP_* (batch, queue, delay) would change what the export path
    plans and when batches go: tests set their own."""
    for var in ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE",
                "OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_EXPORT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=["native", "python"])
def wrapper_path(request, monkeypatch):  # noqa: ANN001, ANN201
    """Run a test over the C hot path and over the pure-Python wrapper (``native``).

    The C path must be there when the package was built with a compiler (CI is), so
    a broken build fails here instead of silently testing Python twice."""
    from otel_flashinfer import native

    if request.param == "native":
        from opentelemetry import context

        var = context._RUNTIME_CONTEXT._current_context  # noqa: SLF001
        assert native.entry_type(var) is not None, "the C hot path did not load"
    monkeypatch.setattr(native, "enabled", request.param == "native")
    return request.param


@pytest.fixture
def spans(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """The in-memory exporter, emptied; instrumentation is undone after the test.

    Tests read ``spans.finished()`` after ``otel_flashinfer.flush()``.
    """
    import otel_flashinfer
    from otel_flashinfer import health

    monkeypatch.chdir(tmp_path)
    exporter = _memory_exporter()
    exporter.clear()
    health.reset()

    class _Spans:
        exporter = _EXPORTER

        @staticmethod
        def finished():  # noqa: ANN205
            assert otel_flashinfer.flush(10)
            return list(exporter.get_finished_spans())

        @staticmethod
        def by_name(name: str):  # noqa: ANN205
            return [s for s in _Spans.finished() if s.name == name]

        @staticmethod
        def tracer():  # noqa: ANN205
            from opentelemetry import trace

            return trace.get_tracer("engine")

    yield _Spans
    otel_flashinfer.uninstrument()
    exporter.clear()
