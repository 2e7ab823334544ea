"""Level-10 storage figures, side by side in one run (CPU tensors here; see README).

1. background write throughput of BlobRecorder vs ``safetensors.torch.save_file``
   of the same tensors to the same disk;
2. bytes stored for 100 decode-like steps over one paged KV cache vs unique bytes.

Usage: python benchmarks/bench_blobs.py [--dir DIR] [--mb-per-tensor 4] [--tensors 64]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import tempfile
import time

import torch
from safetensors.torch import save_file

from otel_flashinfer.blobs.capture import BlobRecorder
from otel_flashinfer.config import Settings


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if ".usage" not in d)


def identity(x):
    return x


def bench_write(base: str, n: int, mb: float) -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(int(mb * 1024 * 1024 / 2), dtype=torch.float16) for _ in range(n)]
    total = sum(t.numel() * 2 for t in tensors)
    st_dir = os.path.join(base, "st")
    os.makedirs(st_dir)
    t0 = time.perf_counter()
    for i, t in enumerate(tensors):
        save_file({"x": t}, os.path.join(st_dir, f"{i}.safetensors"))
        with open(os.path.join(st_dir, f"{i}.safetensors"), "rb+") as fh:
            os.fsync(fh.fileno())
    st_s = time.perf_counter() - t0
    rec = BlobRecorder(Settings(blob_url=os.path.join(base, "blobs"), blob_max_gb=1000),
                       staging_mb=4096, install_handlers=False)
    sig = inspect.signature(identity)
    t0 = time.perf_counter()
    caller = 0.0
    for i, t in enumerate(tensors):
        c0 = time.perf_counter()
        cap = rec.before("identity", __name__, "identity", None, 1, i + 1, None, i,
                         sig.bind(t))
        cap.after(None, None)
        caller += time.perf_counter() - c0
    assert rec.flush(600)
    ours_s = time.perf_counter() - t0
    print(f"write {n} x {mb:g} MB float16 ({total / 1e6:.0f} MB)")
    print(f"  safetensors.save_file : {total / st_s / 1e6:8.1f} MB/s")
    print(f"  BlobRecorder (bg)     : {total / ours_s / 1e6:8.1f} MB/s  "
          f"(ratio {st_s / ours_s:.2f}x; caller-thread cost {caller / n * 1e3:.2f} ms/call)")


class PagedDecode:
    """CPU stand-in with FlashInfer's plan state (only the fields the recorder reads)."""

    def plan(self, indptr, indices, last_page_len):
        self._paged_kv_indptr_buf = indptr
        self._paged_kv_indices_buf = indices
        self._paged_kv_last_page_len_buf = last_page_len

    def run(self, q, paged_kv_cache):
        return q * 2


def bench_paged(base: str, steps: int = 100) -> None:
    torch.manual_seed(0)
    pages, page_size, heads, dim, seqs = 512, 16, 8, 128, 8
    cache = torch.zeros(pages, 2, page_size, heads, dim, dtype=torch.float16)
    page_bytes = cache[0].numel() * 2
    lens = [200 + 37 * s for s in range(seqs)]
    owned = [list(range(s * 64, s * 64 + 64)) for s in range(seqs)]
    for s in range(seqs):  # fill the existing tokens
        for tok in range(lens[s]):
            cache[owned[s][tok // page_size], :, tok % page_size] = torch.randn(2, heads, dim)
    rec = BlobRecorder(Settings(blob_url=os.path.join(base, "paged"), blob_max_gb=1000),
                       staging_mb=4096, install_handlers=False)
    obj = PagedDecode()
    inst = f"{os.getpid()}:{id(obj)}"
    plan_sig, run_sig = inspect.signature(PagedDecode.plan), inspect.signature(PagedDecode.run)
    unique: set[bytes] = set()
    unique_bytes = 0
    for step in range(steps):
        for s in range(seqs):
            tok = lens[s]
            cache[owned[s][tok // page_size], :, tok % page_size] = torch.randn(2, heads, dim)
            lens[s] += 1
        counts = [(n + page_size - 1) // page_size for n in lens]
        indices = torch.tensor([p for s in range(seqs) for p in owned[s][: counts[s]]],
                               dtype=torch.int32)
        indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        last = torch.tensor([(n - 1) % page_size + 1 for n in lens], dtype=torch.int32)
        span = 2 * step + 1
        cap = rec.before("PagedDecode.plan", __name__, "PagedDecode.plan", inst, 2, span, None,
                         span, plan_sig.bind(obj, indptr, indices, last))
        obj.plan(indptr, indices, last)
        cap.after(None, None)
        q = torch.randn(seqs, heads, dim, dtype=torch.float16)
        cap = rec.before("PagedDecode.run", __name__, "PagedDecode.run", inst, 2, span + 1,
                         None, span + 1, run_sig.bind(obj, q, cache))
        out = obj.run(q, cache)
        cap.after(out, None)
        for p in sorted(set(indices.tolist())):
            b = cache[p].numpy().tobytes()
            if b not in unique:
                unique.add(b)
                unique_bytes += len(b)
        for t in (q, out, indices, indptr, last):
            b = t.numpy().tobytes()
            if b not in unique:
                unique.add(b)
                unique_bytes += len(b)
    assert rec.flush(600)
    stored = _dir_bytes(os.path.join(base, "paged", "objects"))
    manifests = _dir_bytes(os.path.join(base, "paged", "traces"))
    whole = steps * cache.numel() * 2
    print(f"paged KV: {steps} decode steps, cache {cache.numel() * 2 / 1e6:.0f} MB, "
          f"{seqs} seqs, page {page_bytes / 1e3:.0f} kB")
    print(f"  unique payload bytes  : {unique_bytes / 1e6:10.2f} MB")
    print(f"  objects stored        : {stored / 1e6:10.2f} MB  (ratio {stored / unique_bytes:.3f}x)"
          f"  + manifests {manifests / 1e6:.2f} MB")
    print(f"  whole-cache per call  : {whole / 1e6:10.2f} MB  (what hashing the whole tensor "
          f"would store if every step changed it)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--mb-per-tensor", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    base = tempfile.mkdtemp(dir=a.dir)
    try:
        bench_write(base, a.tensors, a.mb_per_tensor)
        bench_paged(base, a.steps)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
