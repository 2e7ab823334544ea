"""Level 10, the writer's side of a paged-KV call: storing the pages a decode call
references, with every page encoded and sha256-hashed (the previous path) against pages
reused by their fingerprint (``blobs.fingerprint``), side by side in one run.

This measures a part: the writer thread's CPU per call (``BlobRecorder._store_held``),
into a local store, with the pages already on the host.  The caller's gather and copy,
and the fingerprint kernels on the GPU, are not in it; ``bench_whole_cost.py --levels
10`` on the device measures the whole.  The default shape is the benchmark decode's
(batch 8, kv 1024, page 16, 8 KV heads, d 128, fp16: 512 pages, 32 MB).

    python benchmarks/bench_level10_pages.py [--calls 10] [--changed 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from otel_flashinfer.blobs.capture import BlobRecorder, _Held  # noqa: E402
from otel_flashinfer.blobs.fingerprint import page_fingerprints  # noqa: E402
from otel_flashinfer.config import Settings  # noqa: E402


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--pages", type=int, default=512)
    parser.add_argument("--changed", type=int, default=8,
                        help="pages each step writes a token into (one per sequence)")
    args = parser.parse_args()
    # The CPU fingerprints stand in for the GPU kernel: on one thread, so that torch's
    # pool does not spin (OpenMP waits busy after a parallel op) into the writer's window.
    torch.set_num_threads(1)
    pages = torch.randn(args.pages, 2, 16, 8, 128).to(torch.float16)
    ids = torch.arange(args.pages)
    with tempfile.TemporaryDirectory(prefix="bench_l10_") as root:
        settings = dataclasses.replace(Settings(blob_url=root), blob_max_gb=1000.0,
                                       blob_max_count=10**9)
        recorder = BlobRecorder(settings, install_handlers=False)
        results = {}
        for label, fingerprints in (("every page encoded and hashed (previous path)", False),
                                    ("pages reused by fingerprint", True)):
            step = pages.clone()
            cpu, own, wall = 0.0, 0.0, 0.0
            for call in range(args.calls + 1):
                step[:args.changed, 0, call % 16] += 1  # this step's tokens
                held = _Held({"t": "paged_kv"})
                held.host, held.ids = step, ids
                held.fps = page_fingerprints(step) if fingerprints else None
                c0, o0, t0 = _cpu_s(), time.thread_time(), time.perf_counter()
                recorder._store_held(held)  # noqa: SLF001
                if call:  # the first call stores everything either way
                    cpu += _cpu_s() - c0
                    own += time.thread_time() - o0
                    wall += time.perf_counter() - t0
            results[label] = cpu / args.calls
            print(f"  {label}: process CPU {cpu / args.calls * 1e3:8.2f} ms (the writing "
                  f"thread's own {own / args.calls * 1e3:.2f}), wall "
                  f"{wall / args.calls * 1e3:8.2f} ms per call")
        recorder.shutdown(10)
    before, after = results.values()
    mb = pages.numel() * pages.element_size() / 2**20
    print(f"writer thread only (a part: not the caller, not the GPU), {args.pages} pages "
          f"({mb:.0f} MB) a call, {args.changed} changed per step: "
          f"{after / before:.3f}x the previous path's CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
