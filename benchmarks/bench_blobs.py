"""Level-10 storage figures, side by side in one run (CPU tensors here; see README).

1. background write throughput of BlobRecorder vs ``safetensors.torch.save_file``
   of the same tensors to the same disk;
2. bytes stored for 100 decode-like steps over one paged KV cache vs unique bytes;
3. bytes stored per decode step on a large cache (``--cache-gb``, default 4) with 8
   sequences that each append one token: newly stored bytes against the changed
   pages plus q and output (the target), and against the cache size.
4. a local store landing new objects: unnamed files linked in (O_TMPFILE) against a
   temp file renamed into place, alternated in one process (the writing thread's CPU
   in ``put_object`` only, hashing excluded: a part).

Usage: python benchmarks/bench_blobs.py [--dir DIR] [--mb-per-tensor 4] [--tensors 64]
       [--steps 100] [--cache-gb 4] [--decode-steps 20] [--seq-pages 64]
       [--land-objects 2000] [--only-land]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
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


class PlannedDecode:
    """Like FlashInfer's decode wrapper: ``plan`` copies the page table into buffers
    allocated once, and ``run`` reads the cache through them."""

    def __init__(self, max_pages: int, batch: int) -> None:
        self._paged_kv_indptr_buf = torch.zeros(batch + 1, dtype=torch.int32)
        self._paged_kv_indices_buf = torch.zeros(max_pages, dtype=torch.int32)
        self._paged_kv_last_page_len_buf = torch.zeros(batch, dtype=torch.int32)

    def plan(self, indptr, indices, last_page_len):
        self._paged_kv_indptr_buf.copy_(indptr)
        self._paged_kv_indices_buf[: indices.numel()].copy_(indices)
        self._paged_kv_last_page_len_buf.copy_(last_page_len)

    def run(self, q, paged_kv_cache):
        return q * 2


def bench_decode_steps(base: str, cache_gb: float, steps: int, seq_pages: int) -> None:
    """Per decode step: payload newly stored vs (changed pages + q + output), vs cache."""
    torch.manual_seed(0)
    seqs, page_size, heads, dim = 8, 16, 8, 128
    page_bytes = 2 * page_size * heads * dim * 2
    num_pages = int(cache_gb * 1024**3) // page_bytes
    need = seqs * (seq_pages + steps // page_size + 2)
    if num_pages < need:
        raise SystemExit(f"--cache-gb {cache_gb} holds {num_pages} pages, need {need}")
    t0 = time.perf_counter()
    cache = torch.zeros(num_pages, 2, page_size, heads, dim, dtype=torch.float16)
    cache_bytes = cache.numel() * 2
    free = torch.randperm(num_pages).tolist()  # pages scattered over the whole cache
    owned = [[free.pop() for _ in range(seq_pages)] for _ in range(seqs)]
    lens = [seq_pages * page_size - 3 * s for s in range(seqs)]  # some pages nearly full
    for s in range(seqs):
        ids = torch.tensor(owned[s])
        cache.index_copy_(0, ids, torch.randn(seq_pages, 2, page_size, heads, dim).half())
    setup_s = time.perf_counter() - t0
    rec = BlobRecorder(Settings(blob_url=os.path.join(base, "decode"), blob_max_gb=1000),
                       staging_mb=4096, install_handlers=False)
    obj = PlannedDecode(num_pages, seqs)
    inst = f"{os.getpid()}:{id(obj)}"
    plan_sig = inspect.signature(PlannedDecode.plan)
    run_sig = inspect.signature(PlannedDecode.run)
    objects = os.path.join(base, "decode", "objects")
    print(f"decode steps: cache {cache_bytes / 1e9:.2f} GB ({num_pages} pages of "
          f"{page_bytes // 1024} KiB), {seqs} seqs of {seq_pages} pages, one token each per "
          f"step (setup {setup_s:.1f} s)")
    print("  step | new payload | changed pages + q + out | ratio  | plan arrays | on disk "
          "| vs cache  | caller ms | writer ms")
    totals = [0, 0]
    for step in range(steps + 1):
        changed = set()
        if step:  # step 0 records the cache as it is: every referenced page is new
            for s in range(seqs):
                tok = lens[s]
                if tok // page_size >= len(owned[s]):
                    owned[s].append(free.pop())  # last page full: allocate a new one
                page = owned[s][tok // page_size]
                cache[page, :, tok % page_size] = torch.randn(2, heads, dim).half()
                changed.add(page)
                lens[s] += 1
        counts = [(n + page_size - 1) // page_size for n in lens]
        indices = torch.tensor([p for s in range(seqs) for p in owned[s][: counts[s]]],
                               dtype=torch.int32)
        indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
        last = torch.tensor([(n - 1) % page_size + 1 for n in lens], dtype=torch.int32)
        q = torch.randn(seqs, heads, dim).half()
        before_bytes = rec.counters["bytes_written"]
        disk0 = _dir_bytes(objects) if os.path.isdir(objects) else 0
        span = 2 * step + 1
        c0 = time.perf_counter()
        cap = rec.before("PlannedDecode.plan", __name__, "PlannedDecode.plan", inst, 3, span,
                         None, span, plan_sig.bind(obj, indptr, indices, last))
        obj.plan(indptr, indices, last)
        cap.after(None, None)
        cap = rec.before("PlannedDecode.run", __name__, "PlannedDecode.run", inst, 3,
                         span + 1, None, span + 1, run_sig.bind(obj, q, cache))
        out = obj.run(q, cache)
        cap.after(out, None)
        c1 = time.perf_counter()
        assert rec.flush(600)
        w1 = time.perf_counter()
        new = rec.counters["bytes_written"] - before_bytes
        disk = _dir_bytes(objects) - disk0
        plan_arrays = sum(t.numel() * t.element_size() for t in (indptr, indices, last))
        target = len(changed) * page_bytes + 2 * q.numel() * q.element_size()
        if step == 0:
            target = len(indices) * page_bytes + 2 * q.numel() * q.element_size()
        else:
            totals[0] += new
            totals[1] += target
        print(f"  {step:4d} | {new / 1e3:8.1f} kB | {target / 1e3:18.1f} kB"
              f"{' (all pages)' if step == 0 else '            '[:11]}"
              f" | {new / target:5.3f}x | {plan_arrays / 1e3:7.1f} kB | {disk / 1e3:6.0f} kB"
              f" | {new / cache_bytes:.2e} | {(c1 - c0) * 1e3:9.1f} | {(w1 - c1) * 1e3:9.1f}")
    if steps:
        print(f"  steps 1..{steps}: {totals[0] / steps / 1e3:.1f} kB stored per step vs "
              f"{totals[1] / steps / 1e3:.1f} kB changed pages + q + out "
              f"({totals[0] / totals[1]:.3f}x), {totals[0] / steps / cache_bytes:.2e} of the "
              f"{cache_bytes / 1e9:.2f} GB cache")


def bench_land(base: str, n: int, rounds: int = 4, size: int = 4096) -> None:
    """Objects landed by ``BlobStore.put_object``: each way its own store, alternated;
    keys spread over the 256 object folders as content addresses are."""
    import hashlib

    from otel_flashinfer.blobs import layout
    from otel_flashinfer.blobs.store import BlobStore

    per: dict[bool, list[float]] = {True: [], False: []}
    for rnd in range(rounds):
        for unnamed in (True, False):
            folder = os.path.join(base, f"land-{rnd}-{int(unnamed)}")
            store = BlobStore(folder)
            if unnamed and not store._unnamed:
                print("landing objects: this filesystem has no O_TMPFILE; skipped")
                return
            store._unnamed = unnamed
            blobs = [os.urandom(16) + bytes(size - 16) for _ in range(n)]
            keys = [layout.object_key(hashlib.sha256(b).hexdigest(), "safetensors")
                    for b in blobs]
            t0 = time.thread_time()
            for key, data in zip(keys, blobs, strict=True):
                store.put_object(key, [data])
            per[unnamed].append((time.thread_time() - t0) / n * 1e6)
            shutil.rmtree(folder, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in per.items()}
    print(f"landing {n} new {size}-byte objects a round, {rounds} rounds alternated "
          "(the writing thread's CPU in put_object only, a part)")
    for unnamed, label in ((True, "unnamed + link "), (False, "temp + rename  ")):
        print(f"  {label}: " + ", ".join(f"{x:.1f}" for x in per[unnamed])
              + f" us an object (median {med[unnamed]:.1f})")
    print(f"  ratio unnamed / temp + rename: {med[True] / med[False]:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--tensors", type=int, default=64)
    ap.add_argument("--mb-per-tensor", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--cache-gb", type=float, default=4.0,
                    help="KV cache size for the per-step measurement (0 skips it)")
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--seq-pages", type=int, default=64)
    ap.add_argument("--land-objects", type=int, default=2000,
                    help="objects a round for the landing comparison (0 skips it)")
    ap.add_argument("--only-land", action="store_true", help="only the landing comparison")
    a = ap.parse_args()
    base = tempfile.mkdtemp(dir=a.dir)
    try:
        if a.land_objects > 0:
            bench_land(base, a.land_objects)
        if a.only_land:
            return
        bench_write(base, a.tensors, a.mb_per_tensor)
        bench_paged(base, a.steps)
        if a.cache_gb > 0:
            bench_decode_steps(base, a.cache_gb, a.decode_steps, a.seq_pages)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
