"""Probe: what an untraced level-5 replay of the issue's 32-layer decode step costs the
GPU, by how it is replayed, against the same step captured without instrumentation.

One process, one step (``bench_graph_step``'s: 32 x rmsnorm + BatchDecode run), two
graphs of it: level 0 (plain torch, kept to read its edges) and level 5 under
``REPLAY_EVERY=auto``.  GPU time a replay (CUDA events around N back-to-back replays,
rounds alternating) of:
  level0     the uninstrumented graph
  lean       level 5's copy without statistics nodes (``stats.lean_graph``)
  lean_v2    the same copy made as in the eleventh session: the nodes zeroing the
             statistics rows kept (two serial nodes ahead of the first call)
  lean_v1    the same copy made as in the tenth session (``join_branch=True``): the
             dependencies of our launches on the branch joined to their dependents,
             which leaves edges beside the application's PDL chain
             (csrc/lean_rules.h; tests/test_lean_rules.py shows them)
  off        torch's level-5 graph, word closed, statistics nodes switched off
  closed     torch's level-5 graph, word closed, nodes on (the gate word alone)
  traced     torch's level-5 graph, word open: the statistics run
and each graph's (nodes, edges, programmatic edges) (``graph_edge_counts``).  Run on the
device from the repository root::

    . .ci/gpu-env.sh; python3 benchmarks/probes/lean_timing.py 500 3

It first checks that the copy computes the uninstrumented graph's outputs bit for bit.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

os.environ["OTEL_FLASHINFER_REPLAY_EVERY"] = "auto"
os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402


def gpu_us(fn, n: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def main() -> int:
    import flashinfer
    from bench_graph_step import LAYERS
    from gpu_decode import capture_graph, make_decode

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    step = make_decode(use_cuda_graph=True)
    caches = [torch.randn_like(step.kv_cache) for _ in range(LAYERS)]
    hidden = torch.randn(8, 4096, dtype=torch.float16, device="cuda")
    weight = torch.ones(4096, dtype=torch.float16, device="cuda")
    print("decode run:", inspect.signature(step.wrapper.run))

    def forward() -> list:
        outs = []
        for cache in caches:
            flashinfer.norm.rmsnorm(hidden, weight)
            outs.append(step.wrapper.run(step.q, cache))
        return outs

    g0, outs0 = capture_graph(forward, keep=True)
    g0.instantiate()
    import otel_flashinfer
    from otel_flashinfer import graphs
    from otel_flashinfer.stats import kernel

    otel_flashinfer.instrument(level=5, journal_dir="")
    module = kernel.get(wait=True, timeout=600)
    g5, outs5 = capture_graph(forward)  # kept for us: level 5 with replays sampled
    capture5 = graphs._graphs[g5]  # noqa: SLF001
    lean = capture5.lean
    (rows,) = capture5.gates
    original = graphs._originals["replay"]  # noqa: SLF001
    print("level 0 graph (nodes, edges, programmatic):", module.graph_edge_counts(
        g0.raw_cuda_graph()))
    print("level 5 graph:", module.graph_edge_counts(g5.raw_cuda_graph()),
          "statistics nodes", module.gate_nodes(rows._gate.data_ptr()))  # noqa: SLF001
    if lean is None:
        print("no copy was made (counters:", otel_flashinfer.counters(), ")")
        return 1
    print("lean copy:", lean.shape, "removed", lean.removed)
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    made = time.perf_counter()
    v1, _, *shape_v1 = module.lean_graph_make(int(g5.raw_cuda_graph()),
                                              [rows._gate.data_ptr()], True)  # noqa: SLF001
    made = time.perf_counter() - made
    torch.cuda.synchronize()
    print("lean copy, joined around the branch:", tuple(shape_v1))
    v2, _, *shape_v2 = module.lean_graph_make(int(g5.raw_cuda_graph()),
                                              [rows._gate.data_ptr()])  # noqa: SLF001
    print("lean copy, zeroing nodes kept:", tuple(shape_v2), "zeroing nodes left out:",
          len(lean.zeroing))
    print(f"making a copy: {made * 1e3:.2f} ms of host time, "
          f"{(free0 - torch.cuda.mem_get_info()[0]) / 2**20:.2f} MiB of device memory")
    device = torch.cuda.current_device()

    def closed(nodes_on: bool):
        def replay() -> None:
            original(g5)
        capture5.open_gates(False)
        if nodes_on and rows._switch is not None:  # noqa: SLF001
            rows._switch.set(True)  # noqa: SLF001
        return replay

    variants = {
        "level0": lambda: g0.replay,
        "lean": lambda: (lambda: module.lean_graph_launch(lean.exec, device)),
        "lean_v2": lambda: (lambda: module.lean_graph_launch(v2, device)),
        "lean_v1": lambda: (lambda: module.lean_graph_launch(v1, device)),
        "off": lambda: closed(False),
        "closed": lambda: closed(True),
        "traced": lambda: (capture5.open_gates(True), lambda: original(g5))[1],
    }
    for name, exec_ in (("lean", lean.exec), ("lean_v2", v2), ("lean_v1", v1)):
        for out in outs5:
            out.zero_()
        g0.replay()
        module.lean_graph_launch(exec_, device)
        torch.cuda.synchronize()
        print(f"{name}: the 32 outputs equal the uninstrumented graph's, bit for bit:",
              all(torch.equal(a, b) for a, b in zip(outs0, outs5, strict=True)))
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, make in variants.items():
            results[name].append(gpu_us(make(), n))
    base = min(results["level0"])
    for name, got in results.items():
        if got:
            print(f"{name:8s} " + " ".join(f"{v:8.1f}" for v in got)
                  + f"  us a replay; best {min(got):.1f} = {min(got) / base - 1:+.1%} of level 0")
    module.lean_graph_destroy(v1)
    module.lean_graph_destroy(v2)
    otel_flashinfer.uninstrument()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
