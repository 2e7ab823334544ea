"""Level 10 on an S3 store: the client in the traced process, or in the upload helper.

An engine loop that needs the GIL (a fixed piece of Python work per step, then one
traced call whose tensors change every step) runs for ``--seconds`` against
``moto_server``'s S3, three ways, alternated over ``--rounds``:

- ``untraced``: the baseline;
- ``in-process``: level 10, the S3 client (s3fs) on the writer threads, as before the
  upload helper;
- ``helper``: level 10 as shipped, the writes made by ``otel_flashinfer.blobs.uploader``.

Printed per way: engine steps a second (ratio to untraced), calls that took more than
5 ms beyond the median call, CPU seconds of the traced process and of the helper (whole
cost: both count; moto_server's, the stand-in for a remote store, does not), and the
CPU of the S3 client's threads in the traced process (GIL they hold).  The engine
sleeps 2 ms a step (its GPU's time) so that moto_server, on the same two cores, has
room to answer.  Spans go to the embedded default (a JSONL trace
file), really encoded and written.

Usage: python benchmarks/bench_s3_store.py [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3_fixture import moto_s3  # noqa: E402

DRIVER = r'''
import json, os, resource, sys, threading, time
import torch
mode, seconds = sys.argv[1], float(sys.argv[2])
import otel_flashinfer
from otel_flashinfer.blobs import capture
capture.OFFLOAD_REMOTE_WRITES = mode == "helper"
if mode != "untraced":
    otel_flashinfer.instrument(level=10)

@otel_flashinfer.traced
def step_kernel(q, kv, scale=0.125):
    return q * scale

def engine_work():  # the engine's own Python between calls: it needs the GIL
    s = 0
    for i in range(4000):
        s += i * i
    return s

def cpu_s(stat):  # a thread's or a process's CPU seconds, from its /proc stat file
    f = open(stat).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def cpu_of(tid):
    return cpu_s(f"/proc/self/task/{tid}/stat")

def proc_cpu(pid):
    return cpu_s(f"/proc/{pid}/stat")

q, kv = torch.ones(8, 32, 128), torch.zeros(4, 2, 16, 8, 128)
for _ in range(20):
    step_kernel(q, kv)
if mode != "untraced":
    otel_flashinfer.flush(60)
def helper_pid():
    from otel_flashinfer import runtime
    h = runtime.current().blobs.store._uploader._helper
    return h.proc.pid if h is not None else None

helper0 = proc_cpu(helper_pid()) if mode == "helper" else 0.0  # started in the warm-up
ru0 = resource.getrusage(resource.RUSAGE_SELF)
threads0 = {t.native_id: cpu_of(t.native_id) for t in threading.enumerate()}
times, steps = [], 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    engine_work()
    time.sleep(0.002)  # the engine waits on its GPU: the store's stand-in gets a core
    q = q + 1
    t0 = time.perf_counter()
    step_kernel(q, kv)
    times.append(time.perf_counter() - t0)
    steps += 1
ru1 = resource.getrusage(resource.RUSAGE_SELF)
client = sum(cpu_of(t.native_id) - threads0.get(t.native_id, 0.0)
             for t in threading.enumerate() if t.name in ("fsspecIO", "asyncio_0"))
helper_cpu = 0.0
if mode == "helper":
    helper_cpu = proc_cpu(helper_pid()) - helper0
kept = 0
if mode != "untraced":
    from otel_flashinfer import runtime
    kept = runtime.current().blobs.counters.get("manifests", 0)
print(json.dumps({"steps": steps, "times": times, "kept": kept, "client_s": client,
                  "self_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                  "helper_s": helper_cpu}), flush=True)
os._exit(0)  # what is still unwritten is not this benchmark's concern
'''


def _run(mode: str, seconds: float, s3: dict, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(s3["env"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["OTEL_FLASHINFER_BLOB_URL"] = f"s3://{s3['bucket']}/{mode}-{os.urandom(4).hex()}"
    env["OTEL_FLASHINFER_JOURNAL_DIR"] = ""
    env["OTEL_FLASHINFER_BLOB_MAX_COUNT"] = "100000"
    driver = work / "driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run([sys.executable, str(driver), mode, str(seconds)], env=env,
                         cwd=work, capture_output=True, text=True, timeout=seconds + 180)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ns = ap.parse_args()
    modes = ("untraced", "in-process", "helper")
    got: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, moto_s3() as s3:
        for r in range(ns.rounds):
            for mode in modes if r % 2 == 0 else reversed(modes):
                work = Path(tmp) / f"{mode}-{r}"
                work.mkdir()
                got[mode].append(_run(mode, ns.seconds, s3, work))
    base = statistics.median(g["steps"] / ns.seconds for g in got["untraced"])
    print(f"level 10 on moto_server S3 (same box), {ns.seconds:g} s x {ns.rounds} "
          f"rounds, {os.cpu_count()} cores; spans to the default JSONL file")
    print(f"{'way':<11} {'steps/s':>8} {'ratio':>6} {'>5ms':>7} {'kept/s':>7} "
          f"{'self cpu/s':>10} {'helper/s':>8} {'client thr/s':>12}")
    for mode in modes:
        for g in got[mode]:
            rate = g["steps"] / ns.seconds
            own = statistics.median(g["times"])
            waits = sum(1 for t in g["times"] if t - own > 0.005)
            print(f"{mode:<11} {rate:8.0f} {rate / base:6.2f} "
                  f"{waits:>3}/{len(g['times']):<4} {g['kept'] / ns.seconds:7.1f} "
                  f"{g['self_s'] / ns.seconds:10.2f} {g['helper_s'] / ns.seconds:8.2f} "
                  f"{g['client_s'] / ns.seconds:12.2f}")


if __name__ == "__main__":
    main()
