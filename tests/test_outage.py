"""A receiver killed and restarted in the middle of a sustained traced loop.

The traced program (its own process, level 3, defaults on: journal and the native
path) times every call.  The receiver (tests/otlp_receiver.py: a real OTLP/HTTP and
OTLP/gRPC server that decodes every request) is killed two seconds in and comes back
on the same ports two seconds later.  No call may wait on our background work, memory
stays bounded, every span is either delivered or counted as dropped, and spans made
after the restart arrive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from servers import child_env, free_port, start_otlp_receiver, stop_pid, wait_until

DRIVER = r'''
import gc, json, sys, time, tracemalloc
import torch
import otel_flashinfer
from otel_flashinfer import health
from run_delay import excused, reader

otel_flashinfer.instrument(level=3)

@otel_flashinfer.traced
def step_kernel(q, kv, scale=0.125):
    return q

q, kv = torch.ones(8, 32, 128), torch.zeros(64, 2, 16, 8, 128)
for _ in range(2000):
    step_kernel(q, kv)
assert otel_flashinfer.flush(30)
print("warm", flush=True)
tracemalloc.start()
base = tracemalloc.get_traced_memory()[0]
peak_growth = 0
slow, worst, calls, gc_calls = [], 0.0, 0, 0
pauses = []
clock = reader()  # what the OS gave other processes (run_delay.py)
gc.callbacks.append(lambda phase, info: pauses.append(time.perf_counter()))
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    m0, t0 = clock(), time.perf_counter()
    step_kernel(q, kv)
    dt = time.perf_counter() - t0 - excused(m0, clock())  # less other processes' turns
    calls += 1
    if dt > 0.005:
        slow.append(dt)
    worst = max(worst, dt)
    if calls % 1000 == 0:
        peak_growth = max(peak_growth, tracemalloc.get_traced_memory()[0] - base)
        time.sleep(0.001)  # an engine between steps; lets the sender run
tracemalloc.stop()
flushed = otel_flashinfer.flush(60)
print(json.dumps({"calls": calls + 2000, "slow": slow, "worst": worst, "flushed": flushed,
                  "peak_growth": peak_growth, "counters": health.counters()}), flush=True)
'''


def _received(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/count", timeout=5) as r:
        data = json.loads(r.read())
    assert data["errors"] == 0, data
    return data["spans"]


def _final_count(proc: subprocess.Popen) -> int:
    """The spans a stopped receiver had decoded, from its ``final`` line: a count read
    before the kill would miss a batch delivered in between (delivered, so never counted
    as dropped either)."""
    assert proc.stdout is not None
    for line in proc.stdout.read().splitlines():
        if line.startswith("final "):
            data = json.loads(line.split(" ", 1)[1])
            assert data["errors"] == 0, data
            return data["spans"]
    raise AssertionError("the receiver said no final count")


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_killed_and_restarted_mid_loop(tmp_path: Path, protocol: str) -> None:
    http_port, grpc_port = free_port(), free_port()
    port = grpc_port if protocol == "grpc" else http_port
    receiver = start_otlp_receiver(http_port, grpc_port)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = child_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        # While the sender is stuck, records wait unencoded until the queue is half full
        # (by design: encoding them only for the outbox to drop them is waste), so the
        # memory an outage holds is set by this size, not by the loop's speed (with the
        # default 65,536, 9 to 11 MB on a fast box, under 8 on a slow one).
        "OTEL_FLASHINFER_QUEUE_SIZE": "8192",
    })
    proc = subprocess.Popen([sys.executable, str(driver), "8"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    received_before = 0
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "warm", proc.stderr.read() if proc.poll() else ""
        time.sleep(2)
        assert _received(http_port) > 0
        stop_pid(receiver.pid)  # the receiver dies mid-loop
        received_before = _final_count(receiver)  # what it had when it died
        time.sleep(2)
        receiver = start_otlp_receiver(http_port, grpc_port)  # and comes back on its ports
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    counters = report["counters"]
    try:
        # Spans made after the restart reach the new receiver.
        wait_until(lambda: _received(http_port) > 0, 20)
        after = _received(http_port)
    finally:
        stop_pid(receiver.pid)
    # No call waits on an export: a blocked caller would wait out the exporter's
    # timeout and backoff (seconds).  Calls over 5 ms are hand-offs of the GIL (the
    # OTLP/HTTP client's Python holds it for up to CPython's 5 ms switch interval, about
    # once per batch of spans): seen at 0.1% of calls on a busy 2-core box, never a wait
    # on our queues.  The time the OS gave the cores to other processes (the receiver's
    # start-up), beyond what our own threads ran meanwhile, is taken off each call
    # (``run_delay.py``).
    assert report["worst"] < 0.25, report["slow"][:20]
    assert len(report["slow"]) <= report["calls"] / 100, report["slow"][:50]
    # Bounded: the outbox caps what waits (kilobytes per span would otherwise pile up).
    assert report["peak_growth"] < 8 * 1024 * 1024, report["peak_growth"]
    # Every span is accounted for: delivered to one receiver or the other, or counted.
    dropped = counters.get("spans_dropped", 0)
    assert received_before > 0 and after > 0
    assert received_before + after + dropped >= report["calls"], (received_before, after,
                                                                  dropped, report)
    # Every span took the native path: encoded, or dropped from the record queue before
    # its turn (counted apart: a worker starved of the 2-core box's CPU while the
    # receiver restarts lets the queue fill), never the SDK's.  Counted only after a
    # flush that finished: one that timed out leaves spans to the shutdown.
    assert report["flushed"], report
    assert counters.get("spans_sdk", 0) == 0, counters
    assert (counters.get("spans_native", 0) + counters.get("spans_dropped_queue", 0)
            == report["calls"]), counters


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_our_providers_sdk_path_counts_batches_the_receiver_did_not_take(
        protocol: str, monkeypatch) -> None:  # noqa: ANN001
    """On the SDK path (``NATIVE_EXPORT=0``) our provider's BatchSpanProcessor ignores
    what the OTLP exporter returns: a batch it could not send is counted as dropped,
    and one the receiver took is not.  The native path still sees the transport."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_flashinfer import export, health
    from otel_flashinfer.provider import build_provider

    http_port, grpc_port = free_port(), free_port()
    endpoint = (f"127.0.0.1:{grpc_port}" if protocol == "grpc"
                else f"http://127.0.0.1:{http_port}")
    for name, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                        "OTEL_EXPORTER_OTLP_INSECURE": "true",
                        "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}.items():
        monkeypatch.setenv(name, value)
    receiver = start_otlp_receiver(http_port, grpc_port)
    provider: TracerProvider = build_provider("unused.jsonl")
    try:
        tracer = provider.get_tracer("otel_flashinfer")
        chosen = export.plan(provider, tracer)
        assert chosen.fast, chosen.reason  # the wrapper hides nothing from the native path
        assert [type(s).__name__ for s in chosen.senders] == [
            "GrpcSender" if protocol == "grpc" else "HttpSender"]
        before = health.counters().get("spans_dropped", 0)
        for i in range(10):
            tracer.start_span(f"up{i}").end()
        assert provider.force_flush(10_000)
        assert _received(http_port) == 10
        assert health.counters().get("spans_dropped", 0) == before
        stop_pid(receiver.pid)
        receiver.wait(10)
        for i in range(7):
            tracer.start_span(f"down{i}").end()
        provider.force_flush(10_000)
        assert health.counters().get("spans_dropped", 0) == before + 7
    finally:
        provider.shutdown()
        if receiver.poll() is None:
            stop_pid(receiver.pid)


EXIT_DRIVER = r'''
import atexit, json, sys, time

def last():
    # Registered first, so it runs last: after our exit flush gave up.  Another
    # handler may keep the process alive a while: the batch still being sent fails
    # meanwhile, and must not be counted a second time.
    time.sleep(float(sys.argv[1]))
    print(json.dumps(__import__("otel_flashinfer.health").health.counters()), flush=True)

atexit.register(last)
import otel_flashinfer

otel_flashinfer.instrument(level=1)

@otel_flashinfer.traced
def step_kernel(x):
    return x

for i in range(50):
    step_kernel(i)
# Handed to our provider's BatchSpanProcessor (whose export then hangs: the flush's
# wait for the provider runs out, which is not what this looks at).
otel_flashinfer.flush(1)
print("handed", flush=True)
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("linger_s", [0, 4])
def test_spans_our_provider_still_held_when_the_exits_time_ran_out_are_counted(
        tmp_path: Path, linger_s: int) -> None:
    """A receiver that takes the connection and never answers: our provider's shutdown
    at exit runs out of its 5 s, and the spans still queued in its BatchSpanProcessor
    or in the batch being sent were lost without a count (SDK path: NATIVE_EXPORT=0)."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes connections; nobody reads or answers
    try:
        env = child_env({
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{hole.getsockname()[1]}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "60" if not linger_s else "8",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_FLASHINFER_NATIVE_EXPORT": "0", "OTEL_FLASHINFER_JOURNAL_DIR": ""})
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", EXIT_DRIVER, str(linger_s)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=90)
        took = time.monotonic() - t0
    finally:
        hole.close()
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "handed"
    counters = json.loads(lines[-1])
    assert counters.get("spans_dropped") == 50, (counters, out.stderr[-1500:])
    assert took < 30 + linger_s  # the exit waited its budget, not the exporter's timeout


@pytest.mark.parametrize("fails_by", ["result", "raising"])
def test_a_batch_written_off_by_the_exit_mid_export_is_counted_once(fails_by: str) -> None:
    """The exit's ``write_off`` can land anywhere in a failing export.  With the batch's
    'sending' cleared and 'written off' checked under two holds of the lock, a failure
    counted nothing (write-off between them, a FAILURE result) or twice (a raise)."""
    import threading

    from opentelemetry.sdk.trace.export import SpanExportResult

    from otel_flashinfer import health
    from otel_flashinfer.provider import CountedExporter

    class Down:
        def export(self, spans: Any) -> SpanExportResult:
            if fails_by == "raising":
                raise ConnectionError("receiver down")
            return SpanExportResult.FAILURE

    exporter = CountedExporter(Down())
    exit_counted: list[int] = []

    class ExitLandsAfterTheSecondRelease:
        """The lock, with the exit's write-off run right after its second release."""

        def __init__(self) -> None:
            self.inner, self.releases = threading.Lock(), 0

        def __enter__(self) -> None:
            self.inner.acquire()

        def __exit__(self, *exc: Any) -> None:
            self.inner.release()
            self.releases += 1
            if self.releases == 2:
                exit_counted.append(exporter.write_off())

    exporter._lock = ExitLandsAfterTheSecondRelease()  # noqa: SLF001
    health.reset()
    try:
        exporter.export([object()] * 50)
    except ConnectionError:
        pass
    assert exit_counted, "the write-off did not run"
    assert exit_counted[0] + health.counters().get("spans_dropped", 0) == 50
    health.reset()


def test_a_child_forked_while_our_exporter_sends_can_send_too() -> None:
    """The exporter's lock, held by the parent's sender at the fork, was the child's
    forever: its first export hung."""
    import os
    import signal

    from opentelemetry.sdk.trace.export import SpanExportResult

    from otel_flashinfer.provider import CountedExporter

    class Up:
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    exporter = CountedExporter(Up())
    with exporter._lock:  # noqa: SLF001 - as a send in flight holds it
        pid = os.fork()
        if pid == 0:
            signal.alarm(5)  # a hang ends the child with SIGALRM
            ok = exporter.export([object()]) is SpanExportResult.SUCCESS
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
