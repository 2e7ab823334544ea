"""CRASH_SAFE on the GPU: a BatchDecode whose page indices point far past the KV cache
faults, and the process dies inside the call; recovery completes its manifest as
``crashed``, and ``pull`` + ``replay`` (in a process of its own: a CUDA fault kills
the context) reproduce the CUDA error from the recorded inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUN = "BatchDecodeWithPagedKVCacheWrapper.run"

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    import otel_flashinfer
    from opentelemetry import trace
    from otel_flashinfer.provider import resolve_provider
    from gpu_decode import make_decode

    journal_dir, blob_url = sys.argv[1], sys.argv[2]
    otel_flashinfer.instrument(level=10, journal_dir=journal_dir, blob_url=blob_url,
                               crash_safe=True)
    resolve_provider(os.environ["OTEL_FLASHINFER_TRACES_FILE"])

    def die_when_run_returns(frame, event, arg):
        # An engine dies of a fatal CUDA error before the faulting call is over: here
        # the fault is made to surface (synchronize) as FlashInfer's run returns,
        # still inside the traced call, and the process is killed.
        code = frame.f_code
        if (event == "return" and code.co_name == "run"
                and "otel_flashinfer" not in code.co_filename
                and "flashinfer" in code.co_filename):
            sys.setprofile(None)
            try:
                torch.cuda.synchronize()
                print("no fault", flush=True)
            except Exception as exc:
                print("fault", type(exc).__name__, str(exc).splitlines()[0], flush=True)
            # What our side counted (a crash-safe write that failed, a skipped
            # capture), for the assertion message should a manifest be missing.
            print("counters", {k: v for k, v in otel_flashinfer.counters().items() if v},
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    with trace.get_tracer("engine").start_as_current_span("engine.step") as step:
        print("trace", f"{step.get_span_context().trace_id:032x}", flush=True)
        bad = make_decode(kv_len=256)
        bad.run()                              # a good run first
        assert otel_flashinfer.flush(120)
        bad.indices.add_(1 << 24)              # page ids far past the cache
        bad.wrapper.plan(*bad.plan_args, data_type=torch.float16)
        sys.setprofile(die_when_run_returns)
        bad.run()
    print("survived", flush=True)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["OTEL_FLASHINFER_TRACES_FILE"] = str(tmp_path / "traces.jsonl")
    return env


@pytest.mark.timeout(1200)
def test_decode_with_pages_past_the_cache_crashes_and_replay_reproduces_it(tmp_path):
    pytest.importorskip("flashinfer")
    from otel_flashinfer.blobs import manifest
    from otel_flashinfer.blobs.store import BlobStore
    from otel_flashinfer.journal import recover
    from otel_flashinfer.replay.pull import pull

    journal_dir, blobs = tmp_path / "journal", tmp_path / "blobs"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.run([sys.executable, str(script), str(journal_dir), str(blobs)],
                           env=_env(tmp_path), capture_output=True, text=True, timeout=600,
                           cwd=tmp_path)
    out = child.stdout + child.stderr
    assert child.returncode == -signal.SIGKILL, out
    assert "\nfault " in "\n" + child.stdout, out
    trace_id = child.stdout.split("trace", 1)[1].split()[0]

    records = recover(str(journal_dir), lambda r: None)
    crashed = [r for r in records if r.name == RUN]
    assert len(crashed) == 1, [r.name for r in records]
    if "flashinfer.blob.manifest" not in crashed[0].attributes:
        print(out)  # the child's counters line says which step of ours skipped it
        print("span", f"{crashed[0].span_id:016x}", "trace", trace_id)
        print("journal", sorted(str(p.relative_to(journal_dir)) for p in journal_dir.rglob("*")))
        print("blobs", sorted(str(p.relative_to(blobs)) for p in blobs.rglob("*"))[:80])
        pytest.fail("the recovered crashed span has no flashinfer.blob.manifest")
    url = crashed[0].attributes["flashinfer.blob.manifest"]
    store = BlobStore(str(blobs), check_writable=False)
    key = url.removeprefix(store.url_of(""))
    m = manifest.parse(store.get(key), key)
    assert m["status"] == "crashed" and m["error"]["type"] == "ProcessCrash"
    assert m["span_id"] == f"{crashed[0].span_id:016x}"

    bundle = tmp_path / "bundle"
    assert pull(trace_id, str(blobs), str(bundle)) is not None
    replayed = subprocess.run(
        [sys.executable, "-m", "otel_flashinfer", "replay", str(bundle), "--device", "cuda"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in replayed.stdout.splitlines() if f" {RUN} " in ln]
    print("\n" + replayed.stdout)
    assert len(lines) == 2, replayed.stdout + replayed.stderr
    assert lines[0].startswith("PASS") and "bit-exact" in lines[0]
    crash_line = next(ln for ln in lines if f"span={m['span_id']}" in ln)
    assert crash_line.startswith("PASS") and "reproduced the crash" in crash_line
    assert "cuda" in crash_line.lower() or "illegal" in crash_line.lower(), crash_line
