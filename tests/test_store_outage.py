"""Level 10 with its S3 store killed in the middle of a traced loop.

The traced program (its own process, level 10, the blob store on a real S3 API:
``moto_server``) times every call.  The store is killed two seconds in: no call may
wait on the writers (they retry and fail in the background), every call still gets its
span, and the payloads the store could not take are counted, never lost silently.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_fixture import moto_s3
from servers import child_env

KILL_AT_S = 2.0

DRIVER = r'''
import json, sys, time
import torch
from run_delay import excused, reader
import otel_flashinfer
from otel_flashinfer import health, runtime

otel_flashinfer.instrument(level=10)

@otel_flashinfer.traced
def step_kernel(q, kv, scale=0.125):
    return q * scale

q, kv = torch.ones(8, 32, 128), torch.zeros(4, 2, 16, 8, 128)
for _ in range(20):
    step_kernel(q, kv)
assert otel_flashinfer.flush(60)
blobs = runtime.current().blobs
kept_before = blobs.counters.get("manifests", 0)
print("warm", flush=True)
clock = reader()  # what the OS gave other processes (run_delay.py)
times, worst, calls = [], 0.0, 0
start = time.monotonic()
end = start + float(sys.argv[1])
while time.monotonic() < end:
    q = q + 1  # new bytes each call: a new object to store
    m0, t0 = clock(), time.perf_counter()
    step_kernel(q, kv)
    dt = time.perf_counter() - t0
    calls += 1
    times.append((time.monotonic() - start, dt, excused(m0, clock())))
    worst = max(worst, dt)
    time.sleep(0.002)  # an engine between steps
t0 = time.perf_counter()
flushed = otel_flashinfer.flush(5)
# The writes in flight when the store died fail once the client's retries give up
# (5 to 10 s after the kill here), and the breaker opens: wait for that to show.
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not blobs.counters.get("skipped.store_down"):
    otel_flashinfer.traced(lambda q: q)(q)  # a call that finds the breaker open
    time.sleep(0.1)
print(json.dumps({"calls": calls + 20, "times": times, "worst": worst, "flushed": flushed,
                  "flush_s": time.perf_counter() - t0, "kept_before": kept_before,
                  "blobs": dict(blobs.counters), "counters": health.counters()}), flush=True)
'''


def _spans(path: Path) -> int:
    n = 0
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                n += len(ss["spans"])
    return n


@pytest.mark.server
def test_s3_store_killed_mid_loop(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with moto_s3() as s3:
        env = child_env({**s3["env"],
                         "OTEL_FLASHINFER_BLOB_URL": f"s3://{s3['bucket']}/blobs",
                         "OTEL_FLASHINFER_JOURNAL_DIR": ""})
        proc = subprocess.Popen([sys.executable, str(driver), "6"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "warm", proc.stderr.read() if proc.poll() is not None else line
            time.sleep(KILL_AT_S)
            os.kill(s3["pid"], signal.SIGKILL)  # the store dies
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    blobs = report["blobs"]
    # The store worked before it died ...
    assert report["kept_before"] > 0 and blobs.get("manifests", 0) > report["kept_before"]
    # ... and what it could not take afterwards is counted, not lost silently: the
    # writes that failed, then the payloads skipped at the call while the breaker was
    # open (instead of each retrying the dead store for seconds).
    assert blobs.get("skipped.write_failed", 0) > 0, blobs
    assert blobs.get("skipped.store_down", 0) > 0, blobs
    print(blobs)
    # No call waited on the writers' retries (seconds each) once the store was down:
    # beyond a call's own cost (its median then; a level-10 call copies and describes
    # its tensors, 2 to 5 ms on a loaded 2-core box), at most the OTLP outage test's
    # allowance for the GIL's switch interval.
    # Less the time the call waited for a CPU that other processes held (its scheduler
    # run delay beyond what our own threads ran meanwhile): on a shared 2-core box that
    # is the machine; a wait on a lock or on the GIL our threads hold still counts.
    after = [dt - delay for t, dt, delay in report["times"] if t > KILL_AT_S + 0.05]
    own = statistics.median(after)
    waits = [dt - own for dt in after if dt - own > 0.005]
    assert max(after) < 0.25, sorted(after)[-20:]
    assert len(waits) <= len(after) / 100, (own, waits)
    # Every call still has its span: those whose payload never landed go out at exit,
    # saying so, rather than die with the worker.
    spans = _spans(tmp_path / "flashinfer_traces.jsonl")
    assert spans >= report["calls"], (spans, report)

