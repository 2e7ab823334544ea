"""What the crash journal adds to a traced call, at levels 1 and 3, in one run.

Each configuration traces the same function (three tensors and a scalar, like a
decode call) through ``otel_flashinfer.traced``; the two columns of a level are
interleaved in blocks, and each column gives the median and the best block, so a
noisy machine hurts both alike.  Also times ``Journal.begin`` + ``end`` alone.

    python benchmarks/bench_journal.py [--calls 300] [--rounds 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")

import torch  # noqa: E402

import otel_flashinfer  # noqa: E402
from otel_flashinfer import describe  # noqa: E402
from otel_flashinfer.journal import Journal  # noqa: E402
from otel_flashinfer.pipeline import CallRecord  # noqa: E402


@otel_flashinfer.traced(name="single_decode_with_kv_cache")
def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    return q


def _block(calls: int, args: tuple) -> float:
    """Seconds per call over ``calls`` calls; span building runs after, untimed, so the
    background worker does not compete with the timed calls for the GIL."""
    start = time.perf_counter()
    for _ in range(calls):
        decode(*args)
    elapsed = time.perf_counter() - start
    otel_flashinfer.flush(60)
    return elapsed / calls


def traced_calls(calls: int, rounds: int, journal_dir: str
                 ) -> dict[tuple[int, bool], tuple[float, float]]:
    """(median, best) per-call time of each configuration over ``rounds`` interleaved
    blocks: the median is what a loaded machine sees, the best block the intrinsic cost."""
    q = torch.zeros(8, 32, 128, dtype=torch.float16)
    kv = torch.zeros(64, 16, 8, 128, dtype=torch.float16)
    args = (q, kv, kv, 0.125)
    configs = [(level, journal) for level in (1, 3) for journal in (False, True)]
    times: dict[tuple[int, bool], list[float]] = {c: [] for c in configs}
    for level in (1, 3):
        for _ in range(rounds):
            for journal in (False, True):
                otel_flashinfer.instrument(level=level,
                                           journal_dir=journal_dir if journal else "")
                _block(100, args)  # warm-up: wrapper built, caches filled
                times[(level, journal)].append(_block(calls, args))
    otel_flashinfer.uninstrument()
    return {c: (statistics.median(t), min(t)) for c, t in times.items()}


def journal_alone(calls: int, rounds: int, journal_dir: str) -> dict[int, float]:
    journal = Journal(journal_dir)
    record = CallRecord("single_decode_with_kv_cache", 1 << 100, 7, None, time.time_ns(), 0, {})
    q = torch.zeros(8, 32, 128, dtype=torch.float16)
    kv = torch.zeros(64, 16, 8, 128, dtype=torch.float16)
    snaps = [describe.snapshot(v) for v in (q, kv, kv, 0.125)]
    name = b"single_decode_with_kv_cache"
    begin, end = journal.begin, journal.end
    out: dict[int, float] = {}
    try:
        for level, arg_snaps in ((1, None), (3, snaps)):
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(calls):
                    end(begin(record, arg_snaps, name))
                best = min(best, (time.perf_counter() - start) / calls)
            out[level] = best
    finally:
        journal.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per block")
    parser.add_argument("--rounds", type=int, default=60, help="blocks per column")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as journal_dir:
        traced = traced_calls(args.calls, args.rounds, journal_dir)
        alone = journal_alone(20000, 7, journal_dir)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, median of "
          f"{args.rounds} blocks of {args.calls} calls; begin+end alone: best of 7 x 20000")
    print(f"{'level':>5} {'':>6} {'no journal us/call':>19} {'journal us/call':>16} "
          f"{'added us':>9}")
    for level in (1, 3):
        for i, label in enumerate(("median", "best")):
            off, on = traced[(level, False)][i] * 1e6, traced[(level, True)][i] * 1e6
            print(f"{level:>5} {label:>6} {off:>19.2f} {on:>16.2f} {on - off:>9.2f}")
    print(f"Journal.begin+end alone: level 1 {alone[1] * 1e6:.2f} us, "
          f"level 3 (3 tensors + 1 scalar) {alone[3] * 1e6:.2f} us")

if __name__ == "__main__":
    main()
