"""GPU-time bookkeeping with a fake event pool: the worker waits for the end event,
reads the elapsed time once, marks CUDA errors, and says why a time is missing."""

from __future__ import annotations

import time

import pytest

from otel_flashinfer import gpu_timing
from otel_flashinfer.pipeline import CallRecord, Pipeline


class FakePool:
    """Stands in for csrc/event_pool.cpp: slots complete when the test says so."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.busy: set[int] = set()
        self.done: dict[int, int] = {}
        self.times: dict[int, int] = {}
        self.next = 0
        self.driver_calls = 0  # query/resolve: each one a CUDA call on the worker

    def record(self) -> int:
        for _ in range(self.capacity):
            slot, self.next = self.next, (self.next + 1) % self.capacity
            if slot not in self.busy:
                self.busy.add(slot)
                self.done[slot] = 0
                return slot
        return -1

    def query(self, slot: int) -> int:
        self.driver_calls += 1
        return self.done[slot]

    def resolve(self, start: int, end: int) -> int:
        """cudaEventElapsedTime: not ready, the stream's error, or the time."""
        self.driver_calls += 1
        if self.done[end] == 0:
            return gpu_timing.NOT_READY
        if self.done[end] < 0:
            return self.done[end]
        if end not in self.times:  # completed, but not timeable (e.g. -400 handle)
            return -400
        return self.times[end] - self.times[start]

    def release(self, slot: int) -> None:
        self.busy.discard(slot)

    def error_name(self, code: int) -> str:
        return {-700: "cudaErrorIllegalAddress"}[code]


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> FakePool:
    fake = FakePool()
    monkeypatch.setattr(gpu_timing, "_ext", fake)
    monkeypatch.setattr(gpu_timing, "_state", "ready")
    return fake


class _Tracer:
    """Collects what the pipeline would export (attributes at export time)."""

    def __init__(self) -> None:
        self.exported: list[dict] = []

    def start_span(self, name: str, **kwargs: object) -> object:
        attrs = dict(kwargs["attributes"])  # type: ignore[arg-type]
        self.exported.append(attrs)

        class _Span:
            def is_recording(self) -> bool:
                return False

        return _Span()


def record() -> CallRecord:
    return CallRecord("decode", 1, 2, None, 10, 20, {"flashinfer.api": "decode"})


def test_time_is_read_once_the_end_event_completed(pool: FakePool) -> None:
    tracer = _Tracer()
    pipeline = Pipeline(tracer, interval_s=0.01)
    rec = record()
    start = gpu_timing.timer.begin()
    rec.pending.append(gpu_timing.timer.end(start))
    pipeline.submit(rec)
    time.sleep(0.1)
    assert tracer.exported == []  # waits: no host sync, no wrong number
    pool.times.update({start: 1_000, start + 1: 26_500})
    pool.done[start] = pool.done[start + 1] = 1
    assert pipeline.flush(2)
    assert tracer.exported[0]["flashinfer.gpu.time_ns"] == 25_500
    assert pool.busy == set()  # both slots back in the pool


def test_a_call_costs_the_worker_one_driver_call(pool: FakePool) -> None:
    """ready + apply of a traced call's handle: one resolve (the driver lock is shared
    with the engine's launches), where query, query and elapsed were three."""
    tracer = _Tracer()
    pipeline = Pipeline(tracer, interval_s=60)  # drained by flush only
    pipeline.gpu_times = gpu_timing.HANDLES
    pool.capacity = 8
    recs = [record() for _ in range(3)]
    for rec in recs:
        start = gpu_timing.timer.begin()
        rec.gpu = gpu_timing.timer.end_handle(start)
        pool.times.update({start: 100 * start, rec.gpu & 0xFFFF: 100 * start + 7})
        pool.done[start] = pool.done[rec.gpu & 0xFFFF] = 1
    pool.driver_calls = 0
    for rec in recs:
        pipeline.submit(rec)
    assert pipeline.flush(2)
    assert [e["flashinfer.gpu.time_ns"] for e in tracer.exported] == [7, 7, 7]
    assert pool.driver_calls == 3
    assert pool.busy == set()


def test_cuda_error_marks_the_call_that_failed(pool: FakePool) -> None:
    tracer = _Tracer()
    pipeline = Pipeline(tracer, interval_s=0.01)
    good, bad = record(), record()
    for rec in (good, bad):
        start = gpu_timing.timer.begin()
        rec.pending.append(gpu_timing.timer.end(start))
    pool.done.update({0: 1, 1: 1, 2: 1, 3: -700})
    pool.times.update({0: 0, 1: 5})
    pipeline.submit(good)
    pipeline.submit(bad)
    assert pipeline.flush(2)
    first, second = tracer.exported
    assert first["flashinfer.gpu.time_ns"] == 5 and "flashinfer.cuda_error" not in first
    assert second["flashinfer.cuda_error"] == "cudaErrorIllegalAddress"
    assert "flashinfer.gpu.time_ns" not in second


def test_pool_full_and_timeout_say_why(pool: FakePool) -> None:
    tracer = _Tracer()
    pipeline = Pipeline(tracer, interval_s=0.01, wait_timeout_s=0.05)
    held = [gpu_timing.timer.begin() for _ in range(4)]
    assert -1 not in held
    full = record()
    full.pending.append(gpu_timing.timer.end(gpu_timing.timer.begin()))
    stuck = record()
    for slot in held[:2]:
        pool.release(slot)
    stuck.pending.append(gpu_timing.timer.end(gpu_timing.timer.begin()))
    pipeline.submit(full)
    pipeline.submit(stuck)
    assert pipeline.flush(2)
    assert tracer.exported[0]["flashinfer.gpu.time_unavailable"] == "event_pool_full"
    assert tracer.exported[1]["flashinfer.gpu.time_unavailable"] == "timeout"


def test_not_compiled_yet_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_timing, "_state", "compiling")
    pending = gpu_timing.timer.end(gpu_timing.timer.begin())
    rec = record()
    assert pending.ready()
    pending.apply(rec)
    assert rec.attributes["flashinfer.gpu.time_unavailable"] == "compiling"


def test_untimeable_and_not_ready_say_why_and_give_slots_back(pool: FakePool) -> None:
    """A completed pair that cannot be timed is ``elapsed_failed`` (not a CUDA error of
    the call); applied before its end event completed it is ``not_ready``."""
    untimed, early = record(), record()
    a = gpu_timing.timer.end(gpu_timing.timer.begin())
    b = gpu_timing.timer.end(gpu_timing.timer.begin())
    pool.done.update({a.start: 1, a.end: 1})  # no times: cudaEventElapsedTime fails
    assert a.ready()
    a.apply(untimed)
    assert untimed.attributes["flashinfer.gpu.time_unavailable"] == "elapsed_failed"
    assert "flashinfer.cuda_error" not in untimed.attributes
    assert not b.ready()
    b.apply(early)
    assert early.attributes["flashinfer.gpu.time_unavailable"] == "not_ready"
    assert pool.busy == set()
