"""Paired: what an untraced replay costs the replaying thread under
``REPLAY_EVERY=auto``, against torch's own replay of the same graph in the same
process.  ``replay_cpu.py`` compares level 0 and level 1 in two processes, and the
lent hosts' spread between processes (a bare loop from 27 to 50 us a call) is larger
than what it looks for.  Here the 32-layer decode step is captured once, traced, and
blocks of replays alternate between torch's replay (our C gate set aside on the class)
and ours; each ``replay()`` is timed with the thread's clock and waited for, as
``bench_graph_step.py --sync`` does.  An "ours" block ends with a flush, counted in it,
and starts a new credit window (the eighth session's figures in the README came from a
first version without that, whose "ours" blocks also spent credit earned by the torch
blocks' time: +1.52% at level 3, where each traced replay's cost was charged right).

    OTEL_FLASHINFER_REPLAY_EVERY=auto python3 benchmarks/probes/replay_paired.py 1 6 400

(level, blocks of each kind, replays a block; on the device, from the repository root,
after ``. .ci/gpu-env.sh``).  "work" is the process's CPU less the replaying thread's
outside ``replay()`` (its wait for the GPU spins), per replay, as in the benchmark.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6 if values else float("nan")


def main(level: int, blocks: int, per_block: int) -> None:
    import torch
    from bench_graph_step import _cpu_s, decode_step_graph

    import otel_flashinfer
    from otel_flashinfer import gpu_timing, graphs

    otel_flashinfer.instrument(level=level)
    gpu_timing.wait_ready(600)
    graph = decode_step_graph()
    cls = type(graph)
    ours = cls.__dict__["replay"]
    torch_replay = getattr(ours, "original", None)
    if torch_replay is None:
        sys.exit("no C replay gate here: nothing to pair against")
    sampler = graphs._graphs[graph].sampler  # noqa: SLF001
    stream = torch.cuda.current_stream()
    for _ in range(50):  # warm: templates, the first traced replays
        graph.replay()
        stream.synchronize()
    otel_flashinfer.flush(60)
    runs: dict[str, dict[str, list[float]]] = {
        kind: {"untraced": [], "traced": [], "work": [], "wall": []}
        for kind in ("torch", "ours")}
    for _ in range(blocks):
        for kind in ("torch", "ours"):
            cls.replay = torch_replay if kind == "torch" else ours
            run = runs[kind]
            measured0, credit0, asked0 = (sampler.measured, sampler.credit_s,
                                          sampler.asked_untraced)
            if kind == "ours":
                # ``auto`` earns credit by time: without this, the torch block's time
                # would buy this block up to four traced replays (its burst) more
                sampler.last_s = None
            cpu0, t0, main0, inside = _cpu_s(), time.perf_counter(), time.thread_time(), 0.0
            for _ in range(per_block):
                measured = sampler.measured
                c = time.thread_time()
                graph.replay()
                spent = time.thread_time() - c
                inside += spent
                stream.synchronize()
                traced = kind == "ours" and sampler.measured != measured
                run["traced" if traced else "untraced"].append(spent)
            if kind == "ours":
                otel_flashinfer.flush(60)
                print(f"  ours block: traced {sampler.measured - measured0}, credit "
                      f"{credit0 * 1e6:.0f} -> {sampler.credit_s * 1e6:.0f} us, estimate "
                      f"{sampler.estimate() * 1e6:.0f} us, gpu {sampler.gpu_s * 1e6:.0f} "
                      f"us, asked {sampler.asked_untraced - asked0}, per span "
                      f"{sampler.per_span_s * 1e6:.2f} us")
            waiting = time.thread_time() - main0 - inside
            run["work"].append((_cpu_s() - cpu0 - waiting) / per_block)
            run["wall"].append((time.perf_counter() - t0) / per_block)
    cls.replay = ours
    print(f"level {level}, {blocks} blocks of {per_block} replays each way, one process")
    for kind, run in runs.items():
        untraced, traced = run["untraced"], run["traced"]
        print(f"  {kind:5}: untraced replay() n={len(untraced)} p50 {_p(untraced, .5):.2f} "
              f"mean {statistics.fmean(untraced) * 1e6:.2f} p90 {_p(untraced, .9):.2f} us; "
              f"traced n={len(traced)} mean "
              f"{statistics.fmean(traced) * 1e6 if traced else 0.0:.1f} us; work a replay "
              f"(median of blocks) {statistics.median(run['work']) * 1e6:.2f} us; wall "
              f"{statistics.median(run['wall']) * 1e6:.1f} us")
    work = [o - t for o, t in zip(runs["ours"]["work"], runs["torch"]["work"], strict=True)]
    wall0 = statistics.median(runs["torch"]["wall"])
    print(f"  ours - torch, work a replay by block pair (us): "
          f"{', '.join(f'{w * 1e6:+.2f}' for w in work)}; median "
          f"{statistics.median(work) * 1e6:+.2f} us = "
          f"{statistics.median(work) / wall0 * 100:+.2f}% of torch's wall a replay")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
