"""A real FlashInfer BatchDecode setup shared by the GPU tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Decode:
    wrapper: Any
    q: torch.Tensor
    kv_cache: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor
    plan_args: tuple

    def run(self) -> torch.Tensor:
        return self.wrapper.run(self.q, self.kv_cache)


def make_decode(batch: int = 8, kv_len: int = 1024, page_size: int = 16, qo_heads: int = 32,
                kv_heads: int = 8, head_dim: int = 128, dtype: torch.dtype = torch.float16,
                use_cuda_graph: bool = False, extra_pages: int = 0, seed: int = 0) -> Decode:
    """The issue's reference step: batch 8, kv 1024, 32 q / 8 kv heads, d 128, fp16."""
    import flashinfer

    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages_per_seq = (kv_len + page_size - 1) // page_size
    num_pages = batch * pages_per_seq + extra_pages
    kv_cache = torch.randn(num_pages, 2, page_size, kv_heads, head_dim, dtype=dtype,
                           device="cuda", generator=gen)
    indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages_per_seq
    indices = torch.arange(batch * pages_per_seq, dtype=torch.int32, device="cuda")
    last = kv_len - (pages_per_seq - 1) * page_size
    last_page_len = torch.full((batch,), last, dtype=torch.int32, device="cuda")
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    kwargs: dict[str, Any] = {}
    if use_cuda_graph:
        kwargs = dict(use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
                      paged_kv_indices_buffer=indices.clone(),
                      paged_kv_last_page_len_buffer=last_page_len.clone())
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", **kwargs)
    plan_args = (indptr, indices, last_page_len, qo_heads, kv_heads, head_dim, page_size)
    wrapper.plan(*plan_args, data_type=dtype)
    q = torch.randn(batch, qo_heads, head_dim, dtype=dtype, device="cuda", generator=gen)
    return Decode(wrapper, q, kv_cache, indptr, indices, last_page_len, plan_args)


def capture_graph(fn: Any, generators: tuple = (), keep: bool = False
                  ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, fn's output inside it): fn warmed up once on a side stream (JIT builds,
    workspaces), then captured, as torch's docs ask.  ``generators``: registered with
    the graph first, where torch asks for it (``register_generator_state``); ``keep``:
    torch keeps the captured cudaGraph_t (``raw_cuda_graph``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph(keep_graph=True) if keep else torch.cuda.CUDAGraph()
    register = getattr(graph, "register_generator_state", None)
    for generator in generators if register is not None else ():
        register(generator)
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def busy_gpu(ms: float = 2.0) -> None:
    """Queue ~ms of GPU sleep so later launches and events sit on a busy stream: the
    timeline between two events then holds only GPU work, not host launch gaps."""
    torch.cuda._sleep(int(ms * 1.4e6))  # ~1.4 GHz clock cycles per ms (rough)


def hand_time(fn: Any) -> tuple[Any, float]:
    """(result, GPU ms) with torch.cuda.Event around ``fn`` on a busy stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    busy_gpu()
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end)


def replay_with_nan(graph: Any, step: Decode, replays: int, at: int) -> None:
    """Replays 1..``replays`` of ``graph``; only replay ``at`` sees a NaN in ``step.q``."""
    clean = step.q.clone()
    for replay in range(1, replays + 1):
        if replay == at:
            step.q[3, 5, 7] = float("nan")
        graph.replay()
        if replay == at:
            step.q.copy_(clean)
