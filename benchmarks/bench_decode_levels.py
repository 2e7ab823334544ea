"""BatchDecode (batch 8, kv 1024, 32 q / 8 kv heads, d 128, fp16) on the GPU at each of
our levels, side by side in one run.

Prints, per level: host time per eager ``run()`` call (CPU time of the calling thread,
and wall time), its difference to level 0, and for a decode step captured in a CUDA
graph the GPU time of one replay and the wall time per replay with replay spans on.
Targets: GPU timing adds <= 3 us per call (issue 6); level 5 eager <= +25 us and graph
replay <= 2x of level 0 (issue 9); level 10 eager <= +2 ms (issue 10).

    python benchmarks/bench_decode_levels.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import otel_flashinfer
from otel_flashinfer import gpu_timing, runtime
from otel_flashinfer.stats import kernel as stats_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_decode import busy_gpu, make_decode  # noqa: E402


class _Discard(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _worker_cpu() -> float:
    rt = runtime.current()
    return rt.pipeline.worker_cpu_s if rt is not None else 0.0


def host_cost(fn, calls: int) -> tuple[float, float, float]:  # noqa: ANN001
    """(CPU us of the calling thread per call, CPU us of our background worker per
    call, wall us per call), medians of 5 runs.  Caller + worker is what the process
    pays in Python per call (both hold the GIL)."""
    cpu, worker, wall = [], [], []
    for _ in range(5):
        torch.cuda.synchronize()
        w_cpu = _worker_cpu()
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        cpu.append((time.thread_time() - c0) / calls * 1e6)
        wall.append((time.perf_counter() - w0) / calls * 1e6)
        torch.cuda.synchronize()
        otel_flashinfer.flush(60)
        worker.append((_worker_cpu() - w_cpu) / calls * 1e6)
    return statistics.median(cpu), statistics.median(worker), statistics.median(wall)


def replay_cost(graph: torch.cuda.CUDAGraph, replays: int) -> tuple[float, float]:
    """(GPU us of one replay on a busy stream, wall us per replay in a loop)."""
    gpu = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        busy_gpu(1.0)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3)
    torch.cuda.synchronize()
    w0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - w0) / replays * 1e6
    otel_flashinfer.flush(60)
    return statistics.median(gpu), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--replays", type=int, default=2000)
    args = parser.parse_args()

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=1 << 16))
    trace.set_tracer_provider(provider)
    store = tempfile.mkdtemp(prefix="bench_blobs_")
    assert gpu_timing.wait_ready(600)
    stats_kernel.get(wait=True, timeout=600)

    variants = [
        ("level 0", dict(level=0)),
        ("level 1", dict(level=1)),
        ("level 3, no GPU timing", dict(level=3, gpu_timing=False)),
        ("level 3", dict(level=3)),
        ("level 5", dict(level=5)),
        ("level 10", dict(level=10, blob_url=store, blob_max_count=10**6, blob_max_gb=1000)),
    ]
    rows = []
    for name, settings in variants:
        otel_flashinfer.uninstrument()
        otel_flashinfer.instrument(journal_dir="", **settings)
        step = make_decode()
        graph_step = make_decode(use_cuda_graph=True)
        for _ in range(20):
            step.run()
            graph_step.run()
        torch.cuda.synchronize()
        otel_flashinfer.flush(60)
        calls = args.calls if settings["level"] < 10 else max(50, args.calls // 20)
        cpu, worker, wall = host_cost(step.run, calls)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_step.run()
        gpu_replay, wall_replay = replay_cost(graph, args.replays if settings["level"] < 10
                                              else 50)
        rows.append((name, cpu, worker, wall, gpu_replay, wall_replay))
        del graph
    otel_flashinfer.uninstrument()
    base = rows[0]
    print(f"{'variant':24} {'caller us':>10} {'+us':>7} {'worker us':>10} {'wall us':>8} "
          f"{'replay GPU us':>14} {'x':>6} {'replay wall us':>15} {'x':>6}")
    for name, cpu, worker, wall, gpu_replay, wall_replay in rows:
        print(f"{name:24} {cpu:10.1f} {cpu - base[1]:7.1f} {worker:10.1f} {wall:8.1f} "
              f"{gpu_replay:14.1f} {gpu_replay / base[4]:6.2f} {wall_replay:15.1f} "
              f"{wall_replay / base[5]:6.2f}")
    timing = rows[3][1] - rows[2][1]
    print(f"GPU timing adds {timing:.1f} us of caller CPU per call (level 3 with vs without)")


if __name__ == "__main__":
    main()
