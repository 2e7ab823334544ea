"""Pull throughput from a local store and from moto_server's S3, side by side.

Usage: python benchmarks/bench_pull.py [--tensors 32] [--mb-per-tensor 4]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import time

import torch

from otel_flashinfer.blobs.capture import BlobRecorder
from otel_flashinfer.config import Settings
from otel_flashinfer.replay.pull import pull

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from s3_fixture import moto_s3  # noqa: E402


def identity(x):
    return x


def fill(url: str, n: int, mb: float) -> int:
    rec = BlobRecorder(Settings(blob_url=url, blob_max_gb=1000), staging_mb=4096,
                       install_handlers=False)
    sig = inspect.signature(identity)
    total = 0
    for i in range(n):
        t = torch.randn(int(mb * 1024 * 1024 / 4))
        total += t.numel() * 4
        cap = rec.before("identity", __name__, "identity", None, 7, i + 1, None, i, sig.bind(t))
        cap.after(None, None)
    assert rec.flush(600)
    return total


def timed_pull(url: str, out: str) -> float:
    t0 = time.perf_counter()
    pull(7, url, out, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--mb-per-tensor", type=float, default=4.0)
    a = ap.parse_args()
    base = tempfile.mkdtemp()
    try:
        total = fill(os.path.join(base, "local"), a.tensors, a.mb_per_tensor)
        local_s = timed_pull(os.path.join(base, "local"), os.path.join(base, "b1"))
        with moto_s3() as s3:
            url = f"s3://{s3['bucket']}/blobs"
            fill(url, a.tensors, a.mb_per_tensor)
            s3_s = timed_pull(url, os.path.join(base, "b2"))
        print(f"pull {a.tensors} objects, {total / 1e6:.0f} MB (hash-verified, decoded)")
        print(f"  local store : {total / local_s / 1e6:8.1f} MB/s")
        print(f"  moto S3     : {total / s3_s / 1e6:8.1f} MB/s  "
              f"(ratio to local {local_s / s3_s:.2f}x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
