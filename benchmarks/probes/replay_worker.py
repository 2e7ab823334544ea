"""Where the background's time goes on traced replays of the issue's decode step.

On an H100 (eighteenth session) every-replay tracing cost the pipeline thread 28 µs a
replay at level 1 and 347 µs at level 3, where the CPU box's stand-in costs 52 µs: this
says which path the replays took (the encoder's stats: templated children against all)
and samples the worker's Python stack every millisecond (a sampler thread: it perturbs
the run, so no timing here is a benchmark's).

    . .ci/gpu-env.sh; python3 benchmarks/probes/replay_worker.py 3 300
"""

from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _sample(name: str, stop: threading.Event, out: collections.Counter) -> None:
    ident = None
    while not stop.wait(0.001):
        if ident is None:
            ident = next((t.ident for t in threading.enumerate() if t.name == name), None)
            continue
        frame = sys._current_frames().get(ident)  # noqa: SLF001 - a probe
        stack = []
        while frame is not None and len(stack) < 4:
            code = frame.f_code
            stack.append(f"{Path(code.co_filename).name}:{frame.f_lineno}:{code.co_name}")
            frame = frame.f_back
        out[" < ".join(stack)] += 1


def main() -> int:
    level = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    replays = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    import torch
    from bench_graph_step import decode_step_graph

    import otel_flashinfer
    from otel_flashinfer import gpu_timing, health, runtime
    from otel_flashinfer import pipeline as pipeline_module

    seen: list[str] = []
    consider = pipeline_module.Pipeline._consider  # noqa: SLF001 - a probe

    def spy(self, record, now):  # noqa: ANN001, ANN202
        """Why the encoder left a replay to Python: what it carries on arrival."""
        if type(record) is pipeline_module.ReplayRecord and record.template is not None \
                and len(seen) < 4:
            seen.append(f"replay {record.index}: pending={record.pending!r} gpu={record.gpu!r} "
                        f"deadline={record.deadline} now={now} "
                        f"child_pending={type(record.child_pending).__name__} "
                        f"group={record.group!r} protos={len(record.template)} "
                        f"proto0 gpu={record.template[0].gpu!r} "
                        f"pending={record.template[0].pending!r} "
                        f"error={record.template[0].error!r}")
        return consider(self, record, now)

    pipeline_module.Pipeline._consider = spy  # noqa: SLF001
    otel_flashinfer.instrument(level=level)
    gpu_timing.wait_ready(600)
    graph = decode_step_graph()
    pipeline = runtime.current().pipeline
    native = pipeline._native  # noqa: SLF001 - a probe
    stats0 = {k: dict(e.stats()) for k, e in native.encoders.items()} if native else {}
    stacks: collections.Counter = collections.Counter()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=("otel_flashinfer-pipeline", stop, stacks))
    sampler.start()
    worker0 = pipeline.worker_cpu_s
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    otel_flashinfer.flush(300)
    stop.set()
    sampler.join()
    print(f"level {level}: worker {(pipeline.worker_cpu_s - worker0) / replays * 1e6:.1f} "
          "us a replay (sampled, so perturbed)")
    for key, encoder in (native.encoders.items() if native else ()):
        now = encoder.stats()
        print(f"encoder {key}:", {k: v - stats0.get(key, {}).get(k, 0) for k, v in now.items()})
    print("counters:", health.counters())
    for line in seen:
        print(line)
    total = sum(stacks.values()) or 1
    for stack, n in stacks.most_common(25):
        print(f"{100 * n / total:5.1f}%  {stack}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
