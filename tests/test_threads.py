"""Our background threads block the signals an application handles (``threads``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(r"""
    import inspect, os, signal, sys, threading, torch, otel_flashinfer
    from otel_flashinfer.blobs.capture import BlobRecorder
    from otel_flashinfer.config import Settings
    otel_flashinfer.instrument(level=3, journal_dir="journal")

    @otel_flashinfer.traced(name="f")
    def f(x):
        return x

    f(1)
    otel_flashinfer.flush()
    rec = BlobRecorder(Settings(blob_url=sys.argv[1]), install_handlers=False)
    def add(x, y): return x + y
    c = rec.before("add", "m", "add", None, 9, 1, None, 1,
                   inspect.signature(add).bind(torch.ones(4), 1.0))
    c.after(torch.ones(4), None)
    rec.flush(10)

    def blocked(tid):
        for line in open(f"/proc/self/task/{tid}/status"):
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)

    def show(prefix):
        for t in threading.enumerate():
            tid = threading.get_native_id() if t is threading.current_thread() else t.native_id
            if not os.path.exists(f"/proc/self/task/{tid}"):
                continue  # a forked child's list still names the parent's threads
            mask = blocked(tid)
            print(prefix + t.name, *(mask >> (s - 1) & 1 for s in (signal.SIGTERM, signal.SIGINT)))

    show("")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the SDK's processor starts its worker again in a forked child
        show("fork:")
        sys.stdout.flush()
        os._exit(0)
    os.waitpid(pid, 0)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc")
@pytest.mark.parametrize("native", ["1", "0"])
def test_our_threads_leave_sigterm_and_sigint_to_the_application(tmp_path, native) -> None:
    """The kernel may hand SIGTERM to any thread that does not block it; one handed to
    our exporter or writer did not wake an engine's main thread asleep in a blocking
    call, so its shutdown handler waited.  Ours block them; the main thread does not.
    On the SDK's path, the BatchSpanProcessor behind our own provider is ours too."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OTEL_FLASHINFER_NATIVE_EXPORT": native}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "blobs")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    rows = {}
    for line in out.stdout.splitlines():
        name, term, sigint = line.rsplit(" ", 2)
        rows[name] = [term, sigint]
    assert rows["MainThread"] == ["0", "0"], out.stdout + out.stderr
    ours = {name: mask for name, mask in rows.items()
            if name.startswith(("otel_flashinfer", "otel-flashinfer", "otel-fi", "OtelBatch"))}
    assert {"otel_flashinfer-pipeline", "otel_flashinfer-journal",
            "otel-flashinfer-blobs-0"} <= set(ours), out.stdout + out.stderr
    sdk = [name for name in ours if name.startswith("OtelBatch")]  # our provider's
    assert len(sdk) == 1, ours
    assert rows["fork:MainThread"] == ["0", "0"], out.stdout + out.stderr
    assert rows["fork:" + sdk[0]] == ["1", "1"], out.stdout + out.stderr
    assert all(mask == ["1", "1"] for mask in ours.values()), ours
