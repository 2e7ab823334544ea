"""BatchDecode (batch 8, kv 1024, 32 q / 8 kv heads, d 128, fp16) on the GPU at each of
our levels, side by side in one run.

Prints, per level: host time per eager ``run()`` call (CPU time of the calling thread),
its difference to level 0 (median over interleaved rounds, and best round against best
round), and for a decode step captured in a CUDA
graph the GPU time of one replay and the wall time per replay with replay spans on.
Targets: GPU timing adds <= 3 us per call (issue 6); level 5 eager <= +25 us and graph
replay <= 2x of level 0 (issue 9); level 10 eager <= +2 ms (issue 10).

    python benchmarks/bench_decode_levels.py [--calls 200] [--rounds 15]
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
from otel_flashinfer.stats import hooks as stats_hooks
from otel_flashinfer.stats import kernel as stats_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_decode import busy_gpu, make_decode  # noqa: E402


class _Discard(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _worker_cpu() -> float:
    rt = runtime.current()
    return rt.pipeline.worker_cpu_s if rt is not None else 0.0


def host_costs(variants: list[tuple[str, dict]], calls: int, rounds: int
               ) -> dict[str, tuple[float, float, float, float]]:
    """Per variant: (median caller CPU us per call, median of its per-round difference
    to level 0, best-round caller CPU us, median worker CPU us per call).

    The lent hosts are shared and their speed drifts by tens of percent within a
    minute, so the variants are interleaved: each round times one block of every
    variant, one after another, and a variant's added cost is the median over rounds
    of its difference to level 0 in the same round.  Caller CPU is the calling
    thread's ``thread_time``; the worker's CPU is what our background thread spent on
    the block's spans (both hold the GIL)."""
    steps: dict[str, object] = {}
    caller: dict[str, list[float]] = {name: [] for name, _ in variants}
    worker: dict[str, list[float]] = {name: [] for name, _ in variants}
    for round_ in range(rounds):
        for name, settings in variants:
            if settings["level"] >= 10 and round_:
                continue  # one block: each instrument() starts a new blob recorder
            otel_flashinfer.uninstrument()
            _instrument(settings)
            step = steps.get(name)
            if step is None:
                step = steps[name] = make_decode()
            n = calls if settings["level"] < 10 else 100
            for _ in range(10 if settings["level"] < 10 else 30):
                step.run()
            time.sleep(0.02)  # background set-up of a fresh runtime (statistics ring)
            for _ in range(10):
                step.run()
            torch.cuda.synchronize()
            otel_flashinfer.flush(60)
            w_cpu = _worker_cpu()
            c0 = time.thread_time()
            for _ in range(n):
                step.run()
            caller[name].append((time.thread_time() - c0) / n * 1e6)
            torch.cuda.synchronize()
            otel_flashinfer.flush(60)
            worker[name].append((_worker_cpu() - w_cpu) / n * 1e6)
    otel_flashinfer.uninstrument()
    base = caller[variants[0][0]]
    return {name: (statistics.median(caller[name]),
                   statistics.median(c - b for c, b in zip(caller[name], base, strict=False)),
                   min(caller[name]), statistics.median(worker[name]))
            for name, _ in variants}


def _instrument(settings: dict) -> None:
    """instrument() with a variant's settings; ``python_hooks`` keeps level 5 on the
    Python statistics hooks instead of the C++ ones (csrc/stats_hooks.cpp)."""
    settings = dict(settings)
    stats_hooks.use_native = not settings.pop("python_hooks", False)
    otel_flashinfer.instrument(journal_dir="", **settings)


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
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
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
        ("level 5, Python hooks", dict(level=5, python_hooks=True)),
        ("level 5, no GPU timing", dict(level=5, gpu_timing=False)),
        ("level 5", dict(level=5)),
        ("level 10", dict(level=10, blob_url=store, blob_max_count=10**6, blob_max_gb=1000)),
    ]
    costs = host_costs(variants, args.calls, args.rounds)
    rows = []
    for name, settings in variants:
        otel_flashinfer.uninstrument()
        _instrument(settings)
        graph_step = make_decode(use_cuda_graph=True)
        for _ in range(20):
            graph_step.run()
        torch.cuda.synchronize()
        otel_flashinfer.flush(60)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_step.run()
        gpu_replay, wall_replay = replay_cost(graph, args.replays if settings["level"] < 10
                                              else 50)
        rows.append((name, *costs[name], gpu_replay, wall_replay))
        del graph
    otel_flashinfer.uninstrument()
    base = rows[0]
    print(f"{args.rounds} interleaved rounds of {args.calls} calls per variant "
          "(level 10: one block of 100 calls, in round 1)")
    print(f"{'variant':24} {'caller us':>10} {'+us':>7} {'best us':>8} {'+best':>7} "
          f"{'worker us':>10} {'replay GPU us':>14} {'x':>6} {'replay wall us':>15} {'x':>6}")
    for name, cpu, added, best, worker, gpu_replay, wall_replay in rows:
        print(f"{name:24} {cpu:10.1f} {added:7.1f} {best:8.1f} {best - base[3]:7.1f} "
              f"{worker:10.1f} {gpu_replay:14.1f} {gpu_replay / base[5]:6.2f} "
              f"{wall_replay:15.1f} {wall_replay / base[6]:6.2f}")
    timing = rows[3][2] - rows[2][2]
    print(f"GPU timing adds {timing:.1f} us of caller CPU per call (level 3 with vs without, "
          f"median paired differences)")
    by_name = {row[0]: row for row in rows}
    print(f"level 5 adds {by_name['level 5'][2]:.1f} us with the C++ statistics hooks and "
          f"{by_name['level 5, Python hooks'][2]:.1f} us with the Python ones (target <= +25)")


if __name__ == "__main__":
    main()
