"""Instrumentation must never break the program it observes.

A receiver that is down from the start, one that hangs (accepts, never answers) and
a real one (Phoenix) killed in the middle of a run: the traced program keeps its pace,
``flush`` gives up on time and says so, memory stays flat with tiny queues, drops are
counted and logged once, and the process exits promptly.  Failures inside our own
code are counted and logged once while the user's call goes on; the user's own
exceptions reach the user as the very same object with the same traceback.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from servers import (
    Blackhole,
    PhoenixServer,
    child_env,
    free_port,
    last_json_line,
    phoenix_installed,
    run_python,
)

import otel_flashinfer
from otel_flashinfer import describe, health

#: Queues small enough that a dead receiver overflows them within a few hundred calls.
TINY_QUEUES = {
    "OTEL_FLASHINFER_QUEUE_SIZE": "64",
    "OTEL_BSP_MAX_QUEUE_SIZE": "64",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
    "OTEL_BSP_SCHEDULE_DELAY": "50",
}
CALLS = 5000
MEASURED_CALLS = 8000
#: Unbounded buffering would hold every span (kilobytes each): MEASURED_CALLS of them
#: are tens of MB; bounded queues hold a few hundred.
MAX_GROWTH_BYTES = 3 * 1024 * 1024

#: The traced program.  argv[1] == "midrun": first a phase the receiver sees (flushed),
#: then it waits for a line on stdin (the receiver is killed meanwhile) before the
#: measured phase.  Reports one JSON line; exits without help from the test.
DRIVER = r'''
import json, logging, sys, time, tracemalloc
import torch
import otel_flashinfer
from otel_flashinfer import health
from opentelemetry import trace

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("otel_flashinfer").addHandler(Keep())

otel_flashinfer.instrument(level=3, journal_dir="")

@otel_flashinfer.traced
def step_kernel(q, kv, scale=0.125):
    return q

q, kv = torch.ones(4, 8), torch.zeros(2, 16, 8)
report = {}
if sys.argv[1] == "midrun":
    with trace.get_tracer("engine").start_as_current_span("engine.step") as step:
        for _ in range(50):
            step_kernel(q, kv)
    report["phase1_flushed"] = otel_flashinfer.flush(timeout_s=30)
    report["trace_id"] = format(step.get_span_context().trace_id, "032x")
    print(json.dumps(report), flush=True)
    sys.stdin.readline()

t0 = time.perf_counter()
for _ in range(int(sys.argv[2])):
    assert step_kernel(q, kv) is q
report["calls_s"] = time.perf_counter() - t0

tracemalloc.start()
for _ in range(3000):
    step_kernel(q, kv)
before = tracemalloc.get_traced_memory()[0]
for _ in range(int(sys.argv[3])):
    step_kernel(q, kv)
report["growth_bytes"] = tracemalloc.get_traced_memory()[0] - before
tracemalloc.stop()

t0 = time.perf_counter()
report["flushed"] = otel_flashinfer.flush(timeout_s=2)
report["flush_s"] = time.perf_counter() - t0
report["counters"] = health.counters()
report["log_lines"] = lines
report["end"] = time.time()
print(json.dumps(report), flush=True)
'''


def _check_unharmed(report: dict[str, Any], exited_at: float) -> None:
    """The shared verdict on a run whose receiver is gone."""
    # Pace: a blocked caller would take the exporter's timeout (seconds) per batch.
    assert report["calls_s"] < 10.0, report
    assert report["growth_bytes"] < MAX_GROWTH_BYTES, report
    # flush gives up on time and reports that not everything made it.
    assert report["flushed"] is False, report
    assert report["flush_s"] < 5.0, report
    # Drops are counted, and our log says so once, however many there were.
    counters = report["counters"]
    assert counters.get("spans_dropped", 0) > 0, counters
    dropped_logs = [m for m in report["log_lines"] if "spans_dropped" in m]
    assert len(dropped_logs) == 1, report["log_lines"]
    assert len(report["log_lines"]) <= 5, report["log_lines"]  # one per kind, no flood
    # Interpreter exit is not held hostage by the exporter's retries either.
    assert exited_at - report["end"] < 10.0, exited_at - report["end"]


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.mark.parametrize("protocol,receiver", [
    ("grpc", "closed"),
    ("http/protobuf", "blackhole"),
])
def test_receiver_down_from_the_start(driver: Path, tmp_path: Path, protocol: str,
                                      receiver: str) -> None:
    """Nothing listens (connection refused), or something listens and never answers."""
    with Blackhole() as hole:
        port = hole.port if receiver == "blackhole" else free_port()
        env = child_env({
            **TINY_QUEUES,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": "reliability",
        })
        result = run_python(driver, env, tmp_path, timeout_s=120,
                            args=("down", str(CALLS), str(MEASURED_CALLS)))
        exited_at = time.time()
    assert result.returncode == 0, result.stderr[-3000:]
    _check_unharmed(last_json_line(result.stdout), exited_at)


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory):
    """Started without waiting: it boots while the tests above run."""
    if not phoenix_installed():
        pytest.skip("needs arize-phoenix (test extra)")
    server = PhoenixServer(tmp_path_factory.mktemp("phoenix")).start(wait=False)
    yield server
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _boot_phoenix_early(request: pytest.FixtureRequest) -> None:
    if phoenix_installed():
        request.getfixturevalue("phoenix")


@pytest.mark.server
def test_receiver_killed_mid_run(phoenix: PhoenixServer, driver: Path, tmp_path: Path) -> None:
    phoenix.wait_ready()
    project = "reliability-midrun"
    env = child_env({
        **TINY_QUEUES,
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.grpc_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}",
    })
    proc = subprocess.Popen(
        [sys.executable, str(driver), "midrun", str(CALLS), str(MEASURED_CALLS)],
        env=env, cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first.startswith("{"), first + (proc.stderr.read() if proc.poll() else "")
        phase1 = last_json_line(first)
        assert phase1["phase1_flushed"] is True
        # The receiver really had the first phase: 50 calls under one engine step.
        spans = phoenix.wait_spans(project, 51, phase1["trace_id"])
        assert len(spans) == 51
        assert sum(s["name"] == "step_kernel" for s in spans.values()) == 50

        phoenix.kill()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
        exited_at = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    _check_unharmed(last_json_line(out), exited_at)


# ---- in-process: our failures vs the user's ------------------------------------------


@pytest.fixture
def live(spans: Any) -> Any:
    """Level 3 in this process through the session's in-memory provider (conftest's
    ``spans``: counters and logged-once memory reset, uninstrumented afterwards)."""
    otel_flashinfer.instrument(level=3, journal_dir="")
    return spans


def _our_warnings(caplog: pytest.LogCaptureFixture, kind: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "otel_flashinfer" and kind in r.getMessage()]


def test_internal_error_is_counted_logged_once_and_the_call_goes_on(
        live: Any, wrapper_path: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    @otel_flashinfer.traced
    def user_fn(x: int) -> int:
        calls.append(x)
        return x + 10

    @otel_flashinfer.traced
    def with_default(x: int, bias: int = 5) -> int:
        return x + bias

    class BrokenSpan(trace.NonRecordingSpan):
        def get_span_context(self) -> trace.SpanContext:
            raise RuntimeError("the current span is broken")

    def broken(value: object) -> object:
        raise RuntimeError("describe is broken")

    caplog.set_level(logging.WARNING, logger="otel_flashinfer")
    broken_span = BrokenSpan(trace.INVALID_SPAN_CONTEXT)
    token = otel_context.attach(trace.set_span_in_context(broken_span))
    try:
        results = [user_fn(i) for i in range(40)]
    finally:
        otel_context.detach(token)
    assert results == [i + 10 for i in range(40)]
    assert calls == list(range(40))  # each call ran exactly once
    assert health.counters().get("wrapper_errors", 0) == 40  # every failing call counted
    monkeypatch.setattr(describe, "snapshot", broken)
    # Defaults are described when the wrapper is built: that failure leaves the
    # function untraced (counted once), never broken.
    assert [with_default(i) for i in range(10)] == [i + 5 for i in range(10)]
    assert health.counters().get("wrapper_errors", 0) >= 41
    logged = _our_warnings(caplog, "wrapper_errors")
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "the current span is broken" in str(logged[0].exc_info[1])


def test_internal_error_in_the_background_is_counted(
        live: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Attribute building runs on the worker thread; its failure costs the span's
    argument attributes, never the call, the span or the worker."""

    @otel_flashinfer.traced(name="user_fn")
    def user_fn(x: int) -> int:
        return 2 * x

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("attribute builder is broken")

    monkeypatch.setattr(describe, "put_attributes", broken)
    caplog.set_level(logging.WARNING, logger="otel_flashinfer")
    assert [user_fn(i) for i in range(25)] == [2 * i for i in range(25)]
    assert otel_flashinfer.flush(timeout_s=10) is True
    assert health.counters().get("describe_errors", 0) == 25
    assert len(_our_warnings(caplog, "describe_errors")) == 1
    exported = live.by_name("user_fn")
    assert len(exported) == 25
    assert all(s.attributes["flashinfer.api"] == "user_fn" for s in exported)
    assert not any(k.startswith("flashinfer.arg.") for s in exported for k in s.attributes)
    monkeypatch.undo()
    assert user_fn(4) == 8 and otel_flashinfer.flush(timeout_s=10) is True  # worker alive


class EngineError(Exception):
    """A user exception type of our own, so nothing else could produce it."""


def _raise_engine_error(err: BaseException) -> None:
    raise err


def _frames(exc: BaseException) -> list[tuple[str, str]]:
    return [(f.name, f.line or "") for f in traceback.extract_tb(exc.__traceback__)]


@pytest.mark.parametrize("broken_instrumentation", [False, True])
@pytest.mark.parametrize("sampled", [True, False])
def test_user_exception_passes_through_unchanged(
        live: Any, monkeypatch: pytest.MonkeyPatch, sampled: bool,
        broken_instrumentation: bool) -> None:
    """Same object, same frames (plus ours), no chained context of ours, one call,
    whether the span is recorded, sampled out, or our own code is failing."""
    calls: list[int] = []
    cause = KeyError("page 7")

    def body(x: int) -> None:
        calls.append(x)
        try:
            raise cause
        except KeyError as inner:
            raise EngineError("decode failed") from inner

    traced_body = otel_flashinfer.traced(body, name="body")
    if broken_instrumentation:
        monkeypatch.setattr(describe, "snapshot", lambda v: 1 / 0)

    def run(fn: Any) -> EngineError:
        try:
            fn(1)
        except EngineError as exc:
            return exc
        raise AssertionError("no exception")

    plain = run(body)
    calls.clear()
    if sampled:
        traced = run(traced_body)
    else:
        from opentelemetry import context, trace

        unsampled = trace.NonRecordingSpan(trace.SpanContext(
            trace_id=1, span_id=2, is_remote=False, trace_flags=trace.TraceFlags(0)))
        token = context.attach(trace.set_span_in_context(unsampled))
        try:
            traced = run(traced_body)
        finally:
            context.detach(token)

    assert calls == [1]
    assert type(traced) is EngineError and traced.args == ("decode failed",)
    assert traced.__cause__ is cause and traced.__suppress_context__
    assert traced.__context__ is cause  # nothing of ours chained in between
    assert cause.__context__ is None
    # The user's frames are all there, in order, ending where the user raised.
    ours = _frames(traced)
    theirs = _frames(plain)
    assert ours[-1] == theirs[-1] == ("body", 'raise EngineError("decode failed") from inner')
    it = iter(ours)
    assert all(frame in it for frame in theirs), (ours, theirs)


def test_user_exception_identity_and_base_exceptions(live: Any) -> None:
    """The very object raised comes back, including BaseExceptions such as Ctrl-C."""
    for err in (EngineError("x"), KeyboardInterrupt(), SystemExit(3)):
        traced = otel_flashinfer.traced(_raise_engine_error, name="raiser")
        with pytest.raises(BaseException) as info:
            traced(err)
        assert info.value is err
        assert _frames(info.value)[-1][0] == "_raise_engine_error"
    assert otel_flashinfer.flush(timeout_s=10) is True
