"""Level 5 on the benchmark decode with one build of the statistics extension: the
graph-timed paged read, the real call's two launches (profiler), the caller's time over
3,000 calls and, with ``stats_hooks_clocks.patch`` applied, the C++ hooks' time by phase.
Last, the paged read is checked against the dense one, also with a NaN and an Inf planted.

``TAG [-DFLAG ...]``: the flags go to the extension's build (its own cache folder per
tag); ``--build-only`` builds and exits, so several variants can build at once. With
``stats_kernel_variants.patch`` applied, ``-DOTEL_FI_PAGED_CONTIG`` gives each warp a
contiguous run of work units and ``-DOTEL_FI_NO_SYS_FENCE`` drops the publishing
block's system fences. Run from the repository root on the device::

    git apply benchmarks/probes/stats_kernel_variants.patch \
      benchmarks/probes/stats_hooks_clocks.patch
    for v in old "new -DOTEL_FI_PAGED_CONTIG -DOTEL_FI_NO_SYS_FENCE"; do
      python3 benchmarks/probes/level5_variants.py $v --build-only & done; wait
    python3 benchmarks/probes/level5_variants.py old
    python3 benchmarks/probes/level5_variants.py new -DOTEL_FI_PAGED_CONTIG -DOTEL_FI_NO_SYS_FENCE
"""

from __future__ import annotations

import json
import os
import sys
import time

TAG, FLAGS = sys.argv[1], [f for f in sys.argv[2:] if f.startswith("-D")]
os.environ["OTEL_FLASHINFER_CACHE_DIR"] = f"/tmp/l5k_{TAG}"
sys.path[:0] = ["tests", "benchmarks"]

import torch  # noqa: E402
from stats_kernel_variants import graph_us, launches_us  # noqa: E402 - this folder
from torch.utils import cpp_extension  # noqa: E402

PHASES = ["b.plan_inputs", "b.metas+view+acquire", "b.guard+stream", "b.launch",
          "b.info+setattr", "a.plan_outputs+getattr", "a.slot_event", "a.guard+stream",
          "a.launch", "a.event_record", "a.setattr+pending", "a.add_pending"]


def _with_flags(load):
    def wrapped(*args, **kwargs):
        kwargs["extra_cflags"] = [*kwargs.get("extra_cflags", []), *FLAGS]
        kwargs["extra_cuda_cflags"] = [*kwargs.get("extra_cuda_cflags", []), *FLAGS]
        return load(*args, **kwargs)
    return wrapped


def main() -> None:
    cpp_extension.load = _with_flags(cpp_extension.load)
    from otel_flashinfer.stats import kernel

    t = time.time()
    mod = kernel.get(wait=True, timeout=400)
    if "--build-only" in sys.argv:
        print(TAG, "built", mod is not None, round(time.time() - t), "s")
        return
    from bench_whole_cost import _wait_for_kernels
    from gpu_decode import make_decode
    from torch.profiler import ProfilerActivity, profile

    import otel_flashinfer
    from otel_flashinfer.stats.layout import ROW_WORDS

    step = make_decode()
    q, kv = step.q, step.kv_cache
    idx, ptr, lpl = step.indices, step.indptr, step.last_page_len
    res: dict = {"tag": TAG, "flags": FLAGS}
    out = torch.zeros((8, ROW_WORDS), dtype=torch.int64, device="cuda")
    res["graph paged+lpl us"] = graph_us(
        lambda: mod.stats_into(out, [kv], [0], [1], [idx], [ptr], [8], False, [lpl], [3]))
    res["graph dense us"] = graph_us(
        lambda: mod.stats_into(out, [kv], [0], [1], [None], [None], [0], False))
    otel_flashinfer.instrument(level=5)
    _wait_for_kernels(5)

    def call() -> None:
        step.wrapper.run(q, kv)

    for _ in range(500):
        call()
    torch.cuda.synchronize()
    calls = 200
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    gpu = [ev for ev in prof.events() if ev.device_type != torch.autograd.DeviceType.CPU]
    decode = [ev.device_time_total for ev in gpu if "BatchDecode" in ev.name]
    res["stats launches/call"] = sum("tensor_stats" in ev.name for ev in gpu) / calls
    res["inputs launch us"], res["outputs launch us"] = launches_us(gpu)
    res["decode kernel us"] = round(sum(decode) / max(1, len(decode)), 2)
    otel_flashinfer.flush(60)
    clocks = getattr(mod, "hook_clocks", None)
    if clocks is not None:
        clocks()
    for rnd in range(2):
        n = 3000
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            call()
        t1, c1 = time.perf_counter(), time.thread_time()
        torch.cuda.synchronize()
        res[f"caller wall/cpu us {rnd}"] = (round((t1 - t0) / n * 1e6, 2),
                                            round((c1 - c0) / n * 1e6, 2))
        if clocks is not None:
            c = clocks()
            done = c[15] or 1
            res[f"hooks us {rnd}"] = {p: round(c[i] / done / 1e3, 2) for i, p in enumerate(PHASES)}
        otel_flashinfer.flush(60)

    def rows_agree():
        o = torch.zeros((2, ROW_WORDS), dtype=torch.int64, device="cuda")
        mod.stats_into(o, [kv], [0], [1], [idx], [ptr], [8], False, [lpl], [3])
        mod.stats_into(o, [kv], [1], [1], [None], [None], [0], False)
        r = o.cpu().tolist()
        return r[0] == r[1] or r

    # every page is referenced and the last pages are full: the two reads see the same
    res["paged == dense"] = rows_agree()
    kv[3, 0, 5, 2, 7] = float("nan")
    kv[100, 1, 15, 7, 127] = float("inf")
    res["paged == dense, NaN and Inf planted"] = rows_agree()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
