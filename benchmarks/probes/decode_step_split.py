"""Is the captured decode step at level 5 bound by the host or by the GPU?

Issue 17's captured decode step (one BatchDecode ``run()`` in a CUDA graph, replayed
back to back, default exporter) must stay within 2x of level 0.  This probe splits a
replay into what each side costs, in one process per level:

- wall: back-to-back replays, as ``bench_whole_cost.py`` times them;
- host: the replaying thread's CPU a ``replay()`` (its clock);
- GPU: the same replays queued behind a spin kernel, so that the host is far ahead
  and the GPU runs them with no gap; timed by two CUDA events around them.
- each kernel's GPU time a replay under ``torch.profiler`` (CUPTI), by name, and the
  last three replays' GPU timeline (what runs when, and the gaps between).

    python3 benchmarks/probes/decode_step_split.py 0 1000
    python3 benchmarks/probes/decode_step_split.py 5 1000

(on the device, from the repository root, after ``. .ci/gpu-env.sh``).  Prints one JSON
line.  The GPU figure holds while the host enqueues the block within the spin (it says
``gpu_ahead``: the spin was still running when the last replay was queued).
``PROBE_SNAPSHOT=memcpy`` copies each replay's statistics rows by the copy engine, as
before ``graph_rows.SNAPSHOT_KERNEL``; ``PROBE_NO_TIMER=1`` takes the replay timer's two
CUDA events away (the replay spans then have no GPU time: what the pair costs the
host); ``PROBE_HEAD_STAMP=1`` times each replay by the graph's head stamp instead,
``0`` by the pair (``graph_rows.HEAD_STAMP``); ``PROBE_PROFILE=1`` profiles the third
host-timed block (``cProfile``, which on Python 3.12 also sees the background threads).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def _gpu_block(graph: Any, replays: int) -> tuple[float, bool]:
    """GPU us a replay with the host ahead, and whether it stayed ahead."""
    import torch

    start, end, spun = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    torch.cuda._sleep(int(2e8))  # noqa: SLF001 - about 100 ms of spin at H100 clocks
    spun.record()
    start.record()
    for _ in range(replays):
        graph.replay()
    ahead = not spun.query()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays * 1e3, ahead


def _kernels(graph: Any, replays: int) -> tuple[dict[str, float], list[list[Any]]]:
    """GPU us a replay of each kernel name (CUPTI through torch.profiler), and the GPU
    timeline of the last three replays: (name, start, end) in us from the first's start,
    every activity on the device (kernels, copies, memsets) in start order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name[:60]] += event.device_time / replays
            spans.append((event.time_range.start, event.time_range.end, event.name[:40]))
    spans.sort()
    per = max(1, len(spans) // replays)
    tail = spans[-3 * per:]
    t0 = tail[0][0] if tail else 0.0
    timeline = [[name, round(a - t0, 2), round(b - t0, 2)] for a, b, name in tail]
    return dict(sorted(total.items(), key=lambda kv: -kv[1])), timeline


def main() -> None:
    level, replays = int(sys.argv[1]), int(sys.argv[2])
    import torch
    from bench_whole_cost import _wait_for_kernels
    from gpu_decode import capture_graph, make_decode

    import otel_flashinfer

    if os.environ.get("PROBE_SNAPSHOT") == "memcpy":  # the copy engine, as before
        from otel_flashinfer.stats import graph_rows

        graph_rows.SNAPSHOT_KERNEL = False
    if os.environ.get("PROBE_HEAD_STAMP") in ("0", "1"):  # the head stamp, or the pair
        from otel_flashinfer.stats import graph_rows

        graph_rows.HEAD_STAMP = os.environ["PROBE_HEAD_STAMP"] == "1"
    if level:
        otel_flashinfer.instrument(level=level)
        _wait_for_kernels(level)
        if os.environ.get("PROBE_NO_TIMER") == "1":  # what the replay's event pair costs
            from otel_flashinfer import runtime

            runtime.current().replay_timer = lambda: None
    step = make_decode(use_cuda_graph=True)
    graph, _ = capture_graph(step.run)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    otel_flashinfer.flush(60)
    out: dict[str, Any] = {"level": level, "replays": replays}
    walls, hosts, gpus, ahead = [], [], [], []
    profiler = None
    if os.environ.get("PROBE_PROFILE") == "1":  # where the replaying thread's time goes
        import cProfile

        profiler = cProfile.Profile()
    for block in range(3):
        host = 0.0
        if profiler is not None and block == 2:
            profiler.enable()
        t0 = time.perf_counter()
        for _ in range(replays):
            c0 = time.thread_time()
            graph.replay()
            host += time.thread_time() - c0
        if profiler is not None and block == 2:
            profiler.disable()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / replays * 1e6)
        hosts.append(host / replays * 1e6)
        otel_flashinfer.flush(60)
        gpu, was_ahead = _gpu_block(graph, min(replays, 500))
        gpus.append(gpu)
        ahead.append(was_ahead)
        otel_flashinfer.flush(60)
    out.update(wall_us=[round(w, 2) for w in walls], host_us=[round(h, 2) for h in hosts],
               gpu_us=[round(g, 2) for g in gpus], gpu_ahead=ahead,
               wall_median=round(statistics.median(walls), 2),
               host_median=round(statistics.median(hosts), 2),
               gpu_median=round(statistics.median(gpus), 2))
    try:
        kernels, timeline = _kernels(graph, 200)
        out["kernels_us"] = {k: round(v, 2) for k, v in kernels.items()}
        out["timeline_us"] = timeline
    except Exception as exc:  # noqa: BLE001 - the profiler is optional here
        out["kernels_error"] = repr(exc)[:200]
    otel_flashinfer.flush(60)
    if profiler is not None:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(22)
        out["profile"] = text.getvalue().splitlines()[-30:]
    from otel_flashinfer import health

    counters = health.counters()
    out["dropped"] = {k: v for k, v in counters.items() if "drop" in k and v}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
