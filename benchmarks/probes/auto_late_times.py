"""What a sparsely traced replay costs the background when its GPU time comes late.

Back to back the host runs hundreds of replays ahead of the GPU, so under
``REPLAY_EVERY=auto`` a traced replay's GPU time comes in hundreds of ms after its
record (on an H100 the pipeline thread took 463 us per traced level-3 replay there,
against 41.8 with every replay traced).  CPU stand-in: the 64-call decode step of
``bench_graph_step.py`` at level 3 under ``auto``, each replay 722 us of sleep, and the
event pool's C API stood in so that each traced replay's time comes in ``DELAY_MS``
after the encoder first asks.  Prints replays traced, the pipeline thread's CPU per
traced replay, its passes (drains) and the background's price per span.  A probe, not
a benchmark: compare commits by running it on each, alternated, on a quiet machine.
It writes the default trace file and journal in the current folder: run it from a
scratch one.

    python3 /path/to/benchmarks/probes/auto_late_times.py 300 3000    # DELAY_MS REPLAYS
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def main(delay_s: float, replays: int) -> dict[str, Any]:
    import bench_graph_step as bench
    import torch

    graph_type = bench.stand_in_graph_type(0.000722)  # the GPU's time, as wall
    torch.cuda.CUDAGraph = graph_type  # type: ignore[misc] - before instrument() patches it
    os.environ["OTEL_FLASHINFER_REPLAY_EVERY"] = "auto"
    import otel_flashinfer
    from otel_flashinfer import graphs, pipeline, runtime

    otel_flashinfer.instrument(level=3)
    first: dict[int, float] = {}

    def resolve(start: int, end: int) -> int:  # in ``delay_s`` after the first ask
        t = first.setdefault(start, time.monotonic())
        return 5_000 if time.monotonic() - t >= delay_s else -(1 << 40)

    runtime.current().gpu_timer = bench._stand_in_late_gpu_times(resolve)  # noqa: SLF001
    drains = [0]
    drain = pipeline.Pipeline._drain  # noqa: SLF001

    def counted(self: Any, cpu: Any = None) -> None:
        drains[0] += 1
        drain(self, cpu)

    pipeline.Pipeline._drain = counted  # noqa: SLF001
    graph = bench.capture_stand_in_step(graph_type)
    for _ in range(50):
        graph.replay()
    otel_flashinfer.flush(60)
    pipe = runtime.current().pipeline
    sampler = graphs._graphs[graph].sampler  # noqa: SLF001
    threads0, traced0, drains0 = bench._threads_cpu(), sampler.measured, drains[0]  # noqa: SLF001
    for _ in range(replays):
        graph.replay()
    otel_flashinfer.flush(60)
    threads = bench._threads_added(threads0, replays)  # noqa: SLF001
    traced = max(sampler.measured - traced0, 1)
    return {"delay_ms": delay_s * 1e3, "replays": replays, "traced": traced,
            "pipeline_us_per_traced_replay":
                round(threads.get("otel_flashinfer-pipeline", 0.0) * replays / traced, 1),
            "passes": drains[0] - drains0,
            "price_us_per_span": round(pipe.replay_cost_per_span_s * 1e6, 2),
            "threads_us_per_replay": {k: round(v, 2) for k, v in threads.items()}}


if __name__ == "__main__":
    delay_ms = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    print(json.dumps(main(delay_ms / 1e3, count)))
