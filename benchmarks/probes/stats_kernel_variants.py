"""Statistics-kernel variants on the benchmark decode's paged KV cache: GPU time per
launch inside a CUDA graph (20 launches a replay, median of 7), then the real level-5
call's two launches under the profiler.

Needs ``stats_kernel_variants.patch`` applied (its macros pick the variants); each
argument ``UNROLL:BLOCKS`` builds one (kUnroll loads in flight, kStatsMinBlocksPerSm).
Run from the repository root on the device::

    git apply benchmarks/probes/stats_kernel_variants.patch
    python3 benchmarks/probes/stats_kernel_variants.py 4:3 8:3 8:4 4:6 2:8
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path[:0] = ["tests", "benchmarks"]

import torch  # noqa: E402
from bench_stats_kernel import graph_time_us  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

from otel_flashinfer.stats.kernel import SOURCES, source_dir  # noqa: E402
from otel_flashinfer.stats.layout import ROW_WORDS  # noqa: E402


def build(variant: list[str]):
    unroll, blocks = variant
    folder = f"/tmp/kexp_{unroll}_{blocks}"
    os.makedirs(folder, exist_ok=True)
    t = time.time()
    src = source_dir()
    module = cpp_extension.load(
        name=f"kexp_{unroll}_{blocks}", sources=[str(src / n) for n in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", f"-DOTEL_FI_STATS_MIN_BLOCKS={blocks}"],
        extra_cuda_cflags=["-O3", "-std=c++17", f"-DOTEL_FI_STATS_UNROLL={unroll}",
                           f"-DOTEL_FI_STATS_MIN_BLOCKS={blocks}"],
        build_directory=folder, verbose=False)
    print("built", variant, round(time.time() - t), "s", flush=True)
    return module


def launches_us(gpu_events: list) -> tuple[float, float]:
    """The mean GPU time of a level-5 call's inputs and outputs launches (they alternate)."""
    stats = [ev.device_time_total for ev in gpu_events if "tensor_stats" in ev.name]
    inputs, outputs = stats[0::2], stats[1::2]
    return (round(sum(inputs) / max(1, len(inputs)), 2),
            round(sum(outputs) / max(1, len(outputs)), 2))


def graph_us(fn) -> float:
    """GPU time per call of 20 calls captured in one graph (``bench_stats_kernel``)."""
    return round(graph_time_us(fn, 20), 2)


def main() -> None:
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    variants = [v.split(":") for v in sys.argv[1:]] or [["4", "3"]]
    with ThreadPoolExecutor(len(variants)) as pool:
        modules = list(pool.map(build, variants))
    from gpu_decode import make_decode

    step = make_decode()
    kv, q = step.kv_cache, step.q
    out = torch.zeros((8, ROW_WORDS), dtype=torch.int64, device="cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "kv_MB": kv.numel() * 2 / 1e6}
    res["torch.sum(kv)"] = graph_us(lambda: torch.sum(kv))
    res["decode run"] = graph_us(lambda: step.wrapper.run(q, kv))
    idx, ptr, lpl = step.indices, step.indptr, step.last_page_len
    for (unroll, blocks), m in zip(variants, modules, strict=True):
        cases = {
            "paged+lpl": lambda m=m: m.stats_into(out, [kv], [0], [1], [idx], [ptr], [8], False,
                                                  [lpl], [3]),
            "paged": lambda m=m: m.stats_into(out, [kv], [0], [1], [idx], [ptr], [8], False),
            "dense": lambda m=m: m.stats_into(out, [kv], [0], [1], [None], [None], [0], False),
            "q only": lambda m=m: m.stats_into(out, [q], [0], [1], [None], [None], [0], False),
            "inputs of a call": lambda m=m: m.stats_into(
                out, [q, kv, idx, ptr, lpl], [0, 1, 2, 3, 4], [1] * 5,
                [None, idx, None, None, None], [None, ptr, None, None, None], [0, 8, 0, 0, 0],
                False, [None, lpl, None, None, None], [0, 3, 0, 0, 0]),
        }
        res[f"unroll{unroll}_blocks{blocks}"] = {k: graph_us(fn) for k, fn in cases.items()}
    print(json.dumps(res, indent=1))
    # The real level-5 call (the default build): its kernels' GPU time.
    from bench_whole_cost import _wait_for_kernels
    from torch.profiler import ProfilerActivity, profile

    import otel_flashinfer

    otel_flashinfer.instrument(level=5)
    _wait_for_kernels(5)
    for _ in range(300):
        step.wrapper.run(q, kv)
    torch.cuda.synchronize()
    calls = 200
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step.wrapper.run(q, kv)
        torch.cuda.synchronize()
    gpu = [ev for ev in prof.events() if ev.device_type != torch.autograd.DeviceType.CPU]
    agg: dict = collections.defaultdict(lambda: [0, 0.0])
    for ev in gpu:
        agg[ev.name[:70]][0] += 1
        agg[ev.name[:70]][1] += ev.device_time_total
    print(json.dumps({k: (round(c / calls, 2), round(t / calls, 2))
                      for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])}, indent=1))
    print("inputs and outputs launches, us:", launches_us(gpu))


if __name__ == "__main__":
    main()
