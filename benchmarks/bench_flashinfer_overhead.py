"""Host time per ``BatchDecodeWithPagedKVCacheWrapper.run()`` call: our levels 0/1/3
side by side with FlashInfer's own FLASHINFER_LOGLEVEL 0/1/3 (GPU needed).

FlashInfer reads its level once at import, so each FlashInfer level runs in its own
subprocess; our levels run in the FLASHINFER_LOGLEVEL=0 process, one after another.
Calls are timed in batches with a sync between batches (untimed), so the number is
the host cost of issuing the call, not the kernel.

    python benchmarks/bench_flashinfer_overhead.py [--calls 2000] [--batch 16] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _setup(batch: int):  # noqa: ANN202
    import flashinfer
    import torch

    heads, kv_heads, dim, page, pages_per_seq = 32, 8, 128, 16, 8
    dev = torch.device("cuda")
    pages = batch * pages_per_seq
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(torch.arange(0, pages + 1, pages_per_seq, dtype=torch.int32, device=dev),
                 torch.arange(pages, dtype=torch.int32, device=dev),
                 torch.full((batch,), page, dtype=torch.int32, device=dev),
                 heads, kv_heads, dim, page,
                 data_type=torch.float16, q_data_type=torch.float16)
    q = torch.randn(batch, heads, dim, dtype=torch.float16, device=dev)
    kv = torch.randn(pages, 2, page, kv_heads, dim, dtype=torch.float16, device=dev)
    return wrapper, q, kv


def _time_runs(wrapper, q, kv, calls: int, chunk: int = 100) -> float:  # noqa: ANN001
    """Median host microseconds per run() over chunks of ``chunk`` calls."""
    import torch

    import otel_flashinfer

    for _ in range(50):
        wrapper.run(q, kv)
    torch.cuda.synchronize()
    per_call = []
    for _ in range(max(1, calls // chunk)):
        start = time.perf_counter_ns()
        for _ in range(chunk):
            wrapper.run(q, kv)
        per_call.append((time.perf_counter_ns() - start) / chunk / 1000.0)
        torch.cuda.synchronize()
        otel_flashinfer.flush(30)  # keep our queue short; untimed
    return statistics.median(per_call)


def worker(fi_level: int, ours: list[int], calls: int, batch: int,
           rounds: int) -> dict[str, list[float]]:
    """Our levels interleaved: each round times a share of the calls at every level in
    turn (the lent hosts drift too much for one level after another); returns each
    level's per-round microseconds per call."""
    import otel_flashinfer

    levels = list(dict.fromkeys(ours))
    times: dict[int, list[float]] = {level: [] for level in levels}
    setups = {}
    for _ in range(rounds):
        for level in levels:
            otel_flashinfer.uninstrument()
            if level:
                otel_flashinfer.instrument(level=level, journal_dir="")
            if level not in setups:
                setups[level] = _setup(batch)
            wrapper, q, kv = setups[level]
            times[level].append(_time_runs(wrapper, q, kv, max(100, calls // rounds)))
    otel_flashinfer.uninstrument()
    return {f"fi{fi_level}_ours{level}": t for level, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ours", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        ours = [int(x) for x in args.ours.split(",")]
        print(json.dumps(worker(args.worker, ours, args.calls, args.batch, args.rounds)))
        return 0
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fi_level, ours in ((0, "0,1,3"), (1, "0"), (3, "0")):
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("OTEL_FLASHINFER_", "FLASHINFER_LOG"))}
            env.setdefault("OTEL_TRACES_EXPORTER", "none")  # measure the call path, not I/O
            env["FLASHINFER_LOGLEVEL"] = str(fi_level)
            env["FLASHINFER_LOGDEST"] = os.path.join(tmp, f"fi{fi_level}.log")
            done = subprocess.run(
                [sys.executable, __file__, "--worker", str(fi_level), "--ours", ours,
                 "--calls", str(args.calls), "--batch", str(args.batch),
                 "--rounds", str(args.rounds)],
                env=env, cwd=tmp, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results["fi0_ours0"]
    med = {key: statistics.median(values) for key, values in results.items()}

    def paired(key: str) -> float:
        """Median over rounds of (this level - level 0) timed in the same round."""
        return statistics.median(v - b for v, b in zip(results[key], base, strict=True))

    rows = [("baseline (both off)", med["fi0_ours0"], 0.0),
            ("otel-flashinfer level 1", med["fi0_ours1"], paired("fi0_ours1")),
            ("otel-flashinfer level 3", med["fi0_ours3"], paired("fi0_ours3")),
            # FlashInfer reads its level at import: its own process, so no pairing.
            ("FLASHINFER_LOGLEVEL=1", med["fi1_ours0"], med["fi1_ours0"] - med["fi0_ours0"]),
            ("FLASHINFER_LOGLEVEL=3", med["fi3_ours0"], med["fi3_ours0"] - med["fi0_ours0"])]
    print(f"BatchDecodeWithPagedKVCacheWrapper.run, batch {args.batch}, {args.calls} calls "
          f"per configuration; ours interleaved over {args.rounds} rounds (added: median of "
          "paired per-round differences to level 0)")
    # "added" pairs rounds; "median diff" and "ratio" compare the medians over rounds,
    # which drift between rounds moves: both are printed so neither hides the other.
    print(f"{'configuration':<26}{'us/call':>10}{'added us':>10}{'median diff':>12}"
          f"{'ratio':>8}")
    base_med = med["fi0_ours0"]
    for name, value, added in rows:
        print(f"{name:<26}{value:>10.2f}{added:>+10.2f}{value - base_med:>+12.2f}"
              f"{value / base_med:>8.2f}")
    print(json.dumps({"us_per_call": med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
