"""Level 10 while its payloads are skipped: what such a call adds over the same call at
level 5, side by side, each level in its own process, rounds alternated.

``--case max_count`` (default): ``BLOB_MAX_COUNT`` is 1,000 calls by default, which a
decode loop reaches within seconds; from then on every call at level 10 is skipped.
``--case staging_full``: the writers are behind (each object's store slowed by 3 ms, a
slow disk; staging cut to 8 MB so that the flush is short), staging fills, and most
calls are skipped for want of room; the calls kept meanwhile, and their writes, are in
the figure too.  Spans are
encoded and
written to the default JSONL file, the journal is on, and the figure is the whole
process's CPU per call (every thread, the flush included).

This measures a part on a CPU box: the level-5 statistics are stubbed out in both
processes, since their torch-op stand-ins on CPU tensors cost hundreds of microseconds
a call and would hide the blob path (on the device the statistics kernel runs instead;
``bench_whole_cost.py --levels 10`` measures a skip there, with everything).

    python benchmarks/bench_level10_skip.py [--calls 20000] [--rounds 3]
        [--case max_count|staging_full]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(level: int, calls: int, case: str) -> dict:
    """One level's loop in this process: caller wall and whole CPU per call."""
    import torch

    torch.set_num_threads(1)
    import otel_flashinfer
    from otel_flashinfer.blobs.store import BlobStore
    from otel_flashinfer.stats import recorder

    recorder.StatsRecorder.begin = lambda self, inputs, api=None: None
    recorder.StatsRecorder.finish = lambda self, state, outputs: None
    if case == "staging_full":  # a slow disk, and 8 MB of staging that the warm-up fills
        from otel_flashinfer.blobs.capture import BlobRecorder

        put = BlobStore.put_content
        BlobStore.put_content = lambda self, *a: (time.sleep(0.003), put(self, *a))[1]
        BlobRecorder.__init__.__kwdefaults__["staging_mb"] = 8.0
    otel_flashinfer.instrument(level=level)
    q = torch.randn(8, 32, 128, dtype=torch.float16)
    kv = torch.randn(4, 2, 16, 8, 128, dtype=torch.float16)

    def run(q, paged_kv_cache, *, out=None, return_lse=False):  # noqa: ANN001, ANN202, ARG001
        return q

    call = otel_flashinfer.traced(run, name="BatchDecodeWithPagedKVCacheWrapper.run")
    for _ in range(500):  # the budget of one is spent here, or staging filled
        call(q, kv)
    assert otel_flashinfer.flush(60)
    for _ in range(100 if case == "staging_full" else 0):
        call(q, kv)
    before = otel_flashinfer.counters()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call(q, kv)
    wall = time.perf_counter() - wall0
    flushed = otel_flashinfer.flush(120)
    cpu = time.process_time() - cpu0
    counters = otel_flashinfer.counters()
    key = f"blob.skipped.{case}"
    return {"caller_us": wall / calls * 1e6, "cpu_us": cpu / calls * 1e6, "flushed": flushed,
            "skipped": counters.get(key, 0) - before.get(key, 0),
            "kept": counters.get("blob.manifests", 0) - before.get("blob.manifests", 0),
            "spans": counters.get("spans_native", 0) + counters.get("spans_sdk", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--case", choices=["max_count", "staging_full"], default="max_count")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.calls, args.case)))
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if args.case == "max_count":
        env["OTEL_FLASHINFER_BLOB_MAX_COUNT"] = "1"
    else:
        env.update(OTEL_FLASHINFER_BLOB_MAX_COUNT="10000000", OTEL_FLASHINFER_BLOB_MAX_GB="1000")
    results: dict[int, list[dict]] = {5: [], 10: []}
    print(f"case {args.case}: {args.calls} calls a process after a warm-up, {args.rounds} rounds "
          "alternated; level-5 statistics stubbed out in both (a part, see the docstring)"
          )
    for round_ in range(args.rounds):
        for level in (5, 10):
            with tempfile.TemporaryDirectory(prefix="bench_skip_") as cwd:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(level), "--calls",
                     str(args.calls), "--case", args.case], env=env, cwd=cwd,
                    capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[level].append(result)
            print(f"  round {round_ + 1}: level {level:2d}  caller {result['caller_us']:7.2f} us"
                  f"  whole CPU {result['cpu_us']:7.2f} us  spans {result['spans']}"
                  + (f"  skipped {result['skipped']}, kept {result['kept']}"
                     if level == 10 else ""))
    med = {lvl: sorted(r["cpu_us"] for r in rs)[len(rs) // 2] for lvl, rs in results.items()}
    print(f"median whole CPU a call: level 5 {med[5]:.2f} us, level 10 {med[10]:.2f} us"
          f" = {med[10] / med[5]:.2f}x level 5 (+{med[10] - med[5]:.2f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
