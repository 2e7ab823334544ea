"""Replay cost per call against running the same call directly, side by side.

Records N calls of a traced function at level 10 into a local store, pulls the trace
into a bundle, then times ``replay`` over the bundle (load, verify, rebuild, run,
compare bit for bit) against the same N calls made directly.

    python benchmarks/bench_replay.py [--calls 50] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import torch
from opentelemetry import trace

import otel_flashinfer
from otel_flashinfer.replay.pull import pull
from otel_flashinfer.replay.runner import replay


def matmul_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.size
    inputs = [(torch.randn(n, n, device=device), torch.randn(n, n, device=device),
               torch.randn(n, device=device)) for _ in range(args.calls)]

    start = time.perf_counter()
    for a, b, bias in inputs:
        matmul_bias(a, b, bias)
    if device == "cuda":
        torch.cuda.synchronize()
    direct = (time.perf_counter() - start) / args.calls

    with tempfile.TemporaryDirectory() as tmp:
        otel_flashinfer.instrument(level=10, journal_dir="", blob_url=f"{tmp}/store",
                                   traces_file=f"{tmp}/t.jsonl")
        traced = otel_flashinfer.traced(matmul_bias, name="matmul_bias")
        with trace.get_tracer("bench").start_as_current_span("step") as step:
            for a, b, bias in inputs:
                traced(a, b, bias)
        assert otel_flashinfer.flush(120)
        otel_flashinfer.uninstrument()
        trace_id = format(step.get_span_context().trace_id, "032x")
        start = time.perf_counter()
        pull(trace_id, f"{tmp}/store", f"{tmp}/bundle")
        pulled = time.perf_counter() - start
        start = time.perf_counter()
        report = replay(f"{tmp}/bundle", device=device, allow_modules=("__main__",),
                        out=io.StringIO())
        replayed = (time.perf_counter() - start) / args.calls
    print(f"{args.calls} calls of addmm({n}x{n}) on {device}: {report.passed} passed, "
          f"{report.failed} failed")
    print(f"direct call        {direct * 1e3:9.3f} ms/call")
    print(f"replay (bit-exact) {replayed * 1e3:9.3f} ms/call   ratio {replayed / direct:6.1f}x")
    print(f"pull (verify + bundle) {pulled / args.calls * 1e3:9.3f} ms/call")


if __name__ == "__main__":
    main()
