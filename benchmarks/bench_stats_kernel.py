"""Statistics kernel throughput vs torch.sum, side by side, plus the paged-cache case.

Run on the GPU:  PYTHONPATH=$PWD python3 benchmarks/bench_stats_kernel.py
Targets (issue 9): >= 85% of torch.sum's bandwidth at >= 16 MB, <= 6 us at <= 64 KB,
and a 4 GB paged cache of which the call reads 8 MB costs about what 8 MB costs.
"""

from __future__ import annotations

import statistics
import time

import torch

from otel_flashinfer.stats import kernel
from otel_flashinfer.stats.layout import ROW_WORDS
from otel_flashinfer.stats.recorder import PagedSpec, StatsRecorder


def gpu_time_us(fn, iters: int) -> float:
    """Median over 5 runs of the per-iteration GPU time of ``iters`` back-to-back calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(times)


def graph_time_us(fn, iters: int) -> float:
    """GPU time per call with launch overhead removed (``iters`` calls in one graph)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return gpu_time_us(graph.replay, 3) / iters


def host_us(fn, iters: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return dt


def main() -> None:
    ext = kernel.get(wait=True, timeout=600)
    assert ext is not None, "kernel did not build"
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}")
    out = torch.empty((1, ROW_WORDS), dtype=torch.int64, device="cuda")
    print(f"{'size':>8} {'dtype':>9} | {'torch.sum us':>12} {'GB/s':>7} | "
          f"{'stats us':>9} {'GB/s':>7} | {'stats/sum bw':>12} | {'graph us':>8}")
    for label, nbytes in [("4KB", 4 << 10), ("64KB", 64 << 10), ("1MB", 1 << 20),
                          ("16MB", 16 << 20), ("256MB", 256 << 20)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(nbytes // torch.tensor([], dtype=dtype).element_size(),
                            device="cuda").to(dtype)
            iters = 200 if nbytes <= 16 << 20 else 20

            def stats(x=x):
                ext.stats_into(out, [x], [0], [1], [None], [None], [0], True)

            def tsum(x=x):
                torch.sum(x)

            ts = gpu_time_us(tsum, iters)
            ss = gpu_time_us(stats, iters)
            gs = graph_time_us(stats, 50) if nbytes <= 1 << 20 else ss
            print(f"{label:>8} {str(dtype)[6:]:>9} | {ts:12.2f} {nbytes / ts / 1e3:7.0f} | "
                  f"{ss:9.2f} {nbytes / ss / 1e3:7.0f} | {ts / ss * 100:11.0f}% | {gs:8.2f}")
            del x
    # paged: a 4 GB fp16 cache [pages, 16, 8, 128] (32 KB pages), the call reads 8 MB
    page_elems = 16 * 8 * 128
    pages = (4 << 30) // (page_elems * 2)
    cache = torch.empty((pages, 16, 8, 128), dtype=torch.float16, device="cuda").normal_()
    ref_pages = (8 << 20) // (page_elems * 2)
    indices = torch.randperm(pages, device="cuda")[:ref_pages].to(torch.int32)
    indptr = torch.linspace(0, ref_pages, 9, device="cuda").to(torch.int32)
    flat8 = torch.randn((8 << 20) // 2, device="cuda").half()

    def paged():
        ext.stats_into(out, [cache], [0], [1], [indices], [indptr], [8], True)

    def dense8():
        ext.stats_into(out, [flat8], [0], [1], [None], [None], [0], True)

    def full4g():
        ext.stats_into(out, [cache], [0], [1], [None], [None], [0], True)

    tp, td, tf = gpu_time_us(paged, 50), gpu_time_us(dense8, 50), gpu_time_us(full4g, 3)
    print(f"paged 4GB cache, 8MB referenced: {tp:.1f} us | dense 8MB: {td:.1f} us | "
          f"whole 4GB: {tf:.1f} us")
    rec = StatsRecorder()
    small = torch.randn(8, 32, 128, device="cuda").half()
    spec = PagedSpec("kv", cache, indices, indptr, 8)

    def eager_call():
        p = rec.record([("q", small), spec])
        rec._rings[0].release(p.slot)  # benchmark only: recycle the slot at once

    eager_call()
    ring = rec._rings[torch.cuda.current_device()]
    ptr, event = ring.host_ptr(0), ring.native_event(0, ext)

    def raw_call():
        ext.stats_eager([small, cache], [0, 1], [1, 1], [None, indices], [None, indptr], [0, 8],
                        2, ptr, event)

    torch_sum_host = host_us(lambda: torch.sum(small))
    print(f"host cost per call: recorder (q + paged kv) {host_us(eager_call):.1f} us, "
          f"C++ entry alone {host_us(raw_call):.1f} us, "
          f"one torch.sum launch {torch_sum_host:.1f} us")


if __name__ == "__main__":
    main()
