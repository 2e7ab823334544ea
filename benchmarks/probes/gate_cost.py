"""What an untraced replay costs the replaying thread in the C gate (``csrc/hotpath.c``,
``ReplayGate``) under ``REPLAY_EVERY=auto``, against the same replay called plainly,
and what a clock read costs on this host (the gate reads CLOCK_MONOTONIC on every
armed replay; where the clock source has no vDSO that is a system call).

    python3 benchmarks/probes/gate_cost.py

Runs on any host: the graph is a stand-in whose replay does nothing, so the
difference is the gate's own.  On the device the untraced replays of the 32-layer
step measured 0.4 to 0.7 us over level 0's (``replay_cpu.py``, fourteenth session);
this probe finds the gate at 0.08 us on an H100 host and 0.06 us on the CPU box.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

N = 200_000


def _best_ns(fn: object, rounds: int = 5, before: object = None) -> float:
    best = float("inf")
    for _ in range(rounds):
        if before is not None:
            before()  # type: ignore[operator]
        t0 = time.perf_counter()
        for _ in range(N):
            fn()  # type: ignore[operator]
        best = min(best, (time.perf_counter() - t0) / N)
    return best * 1e9


def main() -> None:
    os.environ["OTEL_FLASHINFER_REPLAY_EVERY"] = "auto"
    import torch

    class StandIn:
        def capture_begin(self, *args: object, **kwargs: object) -> None:
            pass

        def capture_end(self) -> None:
            pass

        def replay(self) -> None:
            pass

    plain_replay = StandIn.replay
    torch.cuda.CUDAGraph = StandIn  # type: ignore[misc] - before instrument() patches it
    import otel_flashinfer
    from otel_flashinfer import graphs

    otel_flashinfer.instrument(level=1)
    fn = otel_flashinfer.traced(lambda x: x, name="f")
    graph = StandIn()
    graph.capture_begin()
    fn(1)
    graph.capture_end()
    for _ in range(50):
        graph.replay()
    skip = graphs._graphs[graph].skip  # noqa: SLF001

    def armed() -> None:  # every replay of the loop goes straight through the gate
        skip.count = 10**12
        skip.until = time.monotonic() + 1e6

    source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    print("clock source:", source.read_text().strip() if source.exists() else "unknown")
    print(f"time.monotonic(): {_best_ns(time.monotonic):.0f} ns a call")
    print(f"time.thread_time(): {_best_ns(time.thread_time):.0f} ns a call")
    print(f"plain replay (the function torch had): {_best_ns(lambda: plain_replay(graph)):.0f} "
          "ns a call, a lambda's call included")
    gated = _best_ns(graph.replay, before=armed)
    print(f"gated untraced replay: {gated:.0f} ns a call; the gate let "
          f"{skip.skipped:,} replays through")


if __name__ == "__main__":
    main()
