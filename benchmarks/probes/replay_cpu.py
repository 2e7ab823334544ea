"""Where ``REPLAY_EVERY=auto``'s uncharged cost sits on the replaying thread: each
``graph.replay()``'s CPU (the thread's clock) on the issue's 32-layer decode step, split
into the replays that were traced and those that were not, and the untraced ones that
began within 5 ms of a worker drain against the rest.  Level 0 gives the baseline.

    OTEL_FLASHINFER_REPLAY_EVERY=auto python3 benchmarks/probes/replay_cpu.py 0 2000
    OTEL_FLASHINFER_REPLAY_EVERY=auto python3 benchmarks/probes/replay_cpu.py 1 2000

(on the device, from the repository root, after ``. .ci/gpu-env.sh``).  Each replay is
waited for, as ``bench_graph_step.py --sync`` does.  The seventh session's figures
(README) came from its uncommitted original, which this copy measures the same way; this
copy ran on an H100 in the fourteenth session (README).
"""

from __future__ import annotations

import bisect
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _summary(values: list[float], replays: int) -> str:
    """Mean, percentiles and the sum over all replays, in us."""
    if not values:
        return "none"
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1e6

    return (f"n={len(values)} mean {statistics.fmean(values) * 1e6:.2f} p50 {q(.5):.2f} "
            f"p90 {q(.9):.2f} p99 {q(.99):.2f} max {values[-1] * 1e6:.1f} "
            f"sum/replays {sum(values) / replays * 1e6:.2f}")


def main(level: int, replays: int) -> None:
    import torch
    from bench_graph_step import _busiest, _threads_added, _threads_cpu, decode_step_graph

    import otel_flashinfer
    from otel_flashinfer import gpu_timing, graphs, runtime

    if level:
        otel_flashinfer.instrument(level=level)
        gpu_timing.wait_ready(600)
    graph = decode_step_graph()
    sampler = graphs._graphs[graph].sampler if level else None  # noqa: SLF001
    drains: list[float] = []
    if level:
        pipeline = runtime.current().pipeline
        drain = pipeline._drain  # noqa: SLF001

        def counted(*args: Any) -> None:
            drains.append(time.perf_counter())
            drain(*args)

        pipeline._drain = counted  # noqa: SLF001 - the worker looks it up each pass
    stream = torch.cuda.current_stream()
    charged0 = sampler.spent_s if sampler is not None else 0.0  # the warm-up's left out
    rows: list[tuple[float, bool, float]] = []  # (CPU s, traced, start)
    threads0 = _threads_cpu()
    for _ in range(replays):
        measured = sampler.measured if sampler is not None else 0
        start, cpu = time.perf_counter(), time.thread_time()
        graph.replay()
        spent = time.thread_time() - cpu
        stream.synchronize()
        rows.append((spent, sampler is not None and sampler.measured != measured, start))
    threads = _busiest(_threads_added(threads0, replays))
    untraced = [r for r in rows if not r[1]]
    near, far = [], []
    for spent, _, start in untraced:
        k = bisect.bisect_right(drains, start) - 1
        (near if k >= 0 and start - drains[k] < 0.005 else far).append(spent)
    print(f"level {level}, {replays} replays; by thread, us a replay: {threads}")
    print("  untraced:", _summary([r[0] for r in untraced], replays))
    print("  traced:", _summary([r[0] for r in rows if r[1]], replays))
    print(f"  drains {len(drains)}; untraced within 5 ms after a drain began:",
          _summary(near, replays))
    print("  untraced otherwise:", _summary(far, replays))
    if sampler is not None:
        print(f"  auto charged {(sampler.spent_s - charged0) / replays * 1e6:.2f} us a "
              "replay; caller "
              f"estimate {sampler.caller.value * 1e6:.1f} us, {sampler.spans} spans at "
              f"{sampler.per_span_s * 1e6:.2f} us, asked untraced {sampler.asked_untraced}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
