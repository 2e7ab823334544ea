"""Where a traced eager call's whole cost sits, by thread: the issue's BatchDecode
``run()`` in alternating blocks, untraced (the wrapper's method one level down) and
traced at ``level``, in one process, each thread's CPU a call (every span flushed at
the end of each traced block).  ``bench_whole_cost.py`` gives the totals; this splits
them, so that the host's own drift between processes does not hide which thread grew.

    python3 benchmarks/probes/call_cpu.py 1 3000 4

(on the device, from the repository root, after ``. .ci/gpu-env.sh``).  Spans go to the
default JSONL file unless ``OTEL_TRACES_EXPORTER`` says otherwise.  ``PROBE_HTTP_DIRECT=0``
keeps OTLP/HTTP on the requests session (``http_direct``'s baseline).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def _block(fn: Any, args: tuple, calls: int, flush: Any) -> tuple[float, dict[str, float]]:
    """(caller wall us a call, each thread's CPU us a call) over ``calls`` calls and
    ``flush``."""
    import torch
    from bench_graph_step import _threads_added, _threads_cpu

    before = _threads_cpu()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    wall = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    flush()
    return wall, _threads_added(before, calls)


def main(level: int, calls: int, pairs: int) -> None:
    from bench_whole_cost import _wait_for_kernels
    from gpu_decode import make_decode

    import otel_flashinfer
    from otel_flashinfer import health

    if os.environ.get("PROBE_HTTP_DIRECT") == "0":  # the session's own path, to compare
        from otel_flashinfer import http_direct

        http_direct.direct_settings = lambda *_: (None, "probe")
    otel_flashinfer.instrument(level=level)
    _wait_for_kernels(level)  # level 3 and up: not the fallback while the pool builds
    step = make_decode()
    traced = step.wrapper.run
    plain = type(step.wrapper).run.__wrapped__.__get__(step.wrapper)
    args = (step.q, step.kv_cache)
    for _ in range(300):
        traced(*args)
    otel_flashinfer.flush(60)
    time.sleep(0.2)
    walls: dict[str, list[float]] = {"plain": [], "traced": []}
    threads: dict[str, dict[str, list[float]]] = {"plain": {}, "traced": {}}
    for _ in range(pairs):
        for kind, fn, flush in (("plain", plain, lambda: True),
                                ("traced", traced, lambda: otel_flashinfer.flush(60))):
            wall, by_thread = _block(fn, args, calls, flush)
            walls[kind].append(wall)
            for name, us in by_thread.items():
                threads[kind].setdefault(name, []).append(us)
    print(f"level {level}, {pairs} pairs of {calls} calls; medians, us a call")
    print(f"  caller wall: plain {statistics.median(walls['plain']):.2f}, traced "
          f"{statistics.median(walls['traced']):.2f}")
    names = sorted(set(threads["plain"]) | set(threads["traced"]),
                   key=lambda n: -statistics.median(threads["traced"].get(n, [0.0])))
    total = {"plain": 0.0, "traced": 0.0}
    for name in names:
        row = {k: statistics.median(threads[k].get(name, [0.0]) + [0.0] * (
            pairs - len(threads[k].get(name, [])))) for k in ("plain", "traced")}
        total = {k: total[k] + row[k] for k in total}
        if max(row.values()) >= 0.05:
            print(f"  {name:<28} plain {row['plain']:7.2f}  traced {row['traced']:7.2f}  "
                  f"added {row['traced'] - row['plain']:+7.2f}")
    print(f"  all threads: plain {total['plain']:.2f}, traced {total['traced']:.2f}, added "
          f"{total['traced'] - total['plain']:+.2f}")
    from otel_flashinfer import runtime

    native = runtime.current().pipeline._native  # noqa: SLF001
    for senders in (native.senders.values() if native is not None else ()):
        for sender in senders:
            if hasattr(sender, "transport"):
                print(f"  OTLP/HTTP sender: {sender.transport} ({sender.direct_reason})")
    counters = health.counters()
    print("  counters:", {k: v for k, v in counters.items()
                          if k.startswith(("spans", "path")) and v})


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
