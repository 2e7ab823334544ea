"""A small engine loop traced end to end: FlashInfer decode + rmsnorm on a GPU, the
same shapes through plain torch ops on a CPU.

    python examples/engine_step.py            # level from OTEL_FLASHINFER_LEVEL, else 5
    otel-flashinfer show                      # the span tree it wrote

With no collector configured the spans go to ./flashinfer_traces.jsonl; set
OTEL_EXPORTER_OTLP_ENDPOINT to send them to Jaeger/Tempo instead.
"""

from __future__ import annotations

import os

import torch
from opentelemetry import trace

import otel_flashinfer

BATCH, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, PAGE, KV_LEN = 4, 8, 2, 64, 512, 16, 64


@otel_flashinfer.traced(name="torch_decode_attention")
def cpu_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Reference decode attention (what FlashInfer's kernel computes), for CPU runs."""
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q, k) * sm_scale
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v)


@otel_flashinfer.traced(name="torch_rmsnorm")
def cpu_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def main() -> None:
    # OTEL_FLASHINFER_LEVEL when set (instrument() refuses a bad value by name), else 5.
    level = otel_flashinfer.instrument(
        level=None if os.environ.get("OTEL_FLASHINFER_LEVEL") else 5).level
    tracer = trace.get_tracer("example.engine")
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    x = torch.randn(BATCH, HIDDEN, device=device)
    weight = torch.ones(HIDDEN, device=device)
    if gpu:
        import flashinfer

        pages = KV_LEN // PAGE
        kv = torch.randn(BATCH * pages, 2, PAGE, KV_HEADS, HEAD_DIM, dtype=torch.float16,
                         device=device)
        indptr = torch.arange(BATCH + 1, dtype=torch.int32, device=device) * pages
        indices = torch.arange(BATCH * pages, dtype=torch.int32, device=device)
        last = torch.full((BATCH,), PAGE, dtype=torch.int32, device=device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(32 << 20, dtype=torch.uint8, device=device), "NHD")
        wrapper.plan(indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, PAGE,
                     data_type=torch.float16)
    else:
        k = torch.randn(BATCH, KV_LEN, KV_HEADS, HEAD_DIM)
        v = torch.randn(BATCH, KV_LEN, KV_HEADS, HEAD_DIM)
    for step in range(3):
        with tracer.start_as_current_span("engine.step", attributes={"step": step}):
            for layer in range(2):
                with tracer.start_as_current_span("layer", attributes={"layer": layer}):
                    if gpu:
                        h = flashinfer.norm.rmsnorm(x.half(), weight.half())
                        q = h[:, : HEADS * HEAD_DIM].reshape(BATCH, HEADS, HEAD_DIM).contiguous()
                        wrapper.run(q, kv)
                    else:
                        h = cpu_rmsnorm(x, weight)
                        q = h[:, : HEADS * HEAD_DIM].reshape(BATCH, HEADS, HEAD_DIM)
                        cpu_decode(q, k, v, HEAD_DIM**-0.5)
    ok = otel_flashinfer.flush()
    # flush() says whether everything was handed on in time; what a receiver refused or
    # never took is counted in counters(), not in flush()'s answer.
    dropped = otel_flashinfer.counters().get("spans_dropped", 0)
    target = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
              or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
              or os.environ.get("OTEL_FLASHINFER_TRACES_FILE", "./flashinfer_traces.jsonl"))
    sent = "sent" if ok and not dropped else f"NOT all sent ({dropped} dropped)"
    print(f"traced 3 steps on {device} at level {level}; spans {sent} to {target}")


if __name__ == "__main__":
    main()
