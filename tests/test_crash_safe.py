"""CRASH_SAFE at level 10, end to end on the CPU: a child whose traced call dies by
SIGKILL leaves its inputs and a ``pending`` manifest; journal recovery completes the
manifest as ``crashed`` and points the recovered span at it; ``pull`` + ``replay``
re-run the call from the exact recorded inputs and reproduce the crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
KILL_ENV = "CRASH_SAFE_TEST_KILL"


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The child's tensors (seeded), the last row index past the table."""
    gen = torch.Generator().manual_seed(1234)
    table = torch.randn(64, 48, generator=gen)
    rows = torch.randint(0, 64, (9,), generator=gen)
    rows[-1] = 99
    return table, rows


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]``; a row past the table stands for an illegal address: with
    CRASH_SAFE_TEST_KILL=1 the process dies (as a faulting kernel kills an engine),
    otherwise it raises."""
    top = int(rows.max())
    if top >= table.shape[0]:
        if os.environ.get(KILL_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        raise IndexError(f"row {top} out of range for {table.shape[0]} rows")
    return table.index_select(0, rows)


CHILD = textwrap.dedent("""
    import os, sys
    import otel_flashinfer
    from opentelemetry import trace
    from otel_flashinfer.provider import resolve_provider
    import test_crash_safe as target

    journal_dir, blob_url = sys.argv[1], sys.argv[2]
    otel_flashinfer.instrument(level=10, journal_dir=journal_dir, blob_url=blob_url,
                               crash_safe=True)
    resolve_provider(os.environ["OTEL_FLASHINFER_TRACES_FILE"])
    gather = otel_flashinfer.traced(target.gather_rows)
    table, rows = target.inputs()
    with trace.get_tracer("engine").start_as_current_span("engine.step") as step:
        print("trace", f"{step.get_span_context().trace_id:032x}", flush=True)
        gather(table, rows[:4])          # in range: completes normally
        assert otel_flashinfer.flush(30)
        os.environ[target.KILL_ENV] = "1"
        gather(table, rows)              # dies inside the call
    print("survived", flush=True)
""")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.pop(KILL_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["OTEL_FLASHINFER_TRACES_FILE"] = str(tmp_path / "traces.jsonl")
    return env


def _cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otel_flashinfer", *args],
                          env=env or _env(tmp_path), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


@pytest.mark.timeout(300)
def test_sigkilled_call_is_completed_as_crashed_and_replay_reproduces_it(tmp_path):
    from otel_flashinfer.blobs import encode, manifest
    from otel_flashinfer.blobs.store import BlobStore
    from otel_flashinfer.journal import BLOBS, recover
    from otel_flashinfer.replay.bundle import load_bundle

    journal_dir, blobs = tmp_path / "journal", tmp_path / "blobs"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.run([sys.executable, str(script), str(journal_dir), str(blobs)],
                           env=_env(tmp_path), capture_output=True, text=True, timeout=240,
                           cwd=tmp_path)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert "survived" not in child.stdout
    trace_id = child.stdout.split("trace", 1)[1].split()[0]

    store = BlobStore(str(blobs), check_writable=False)
    keys = store.list_manifests(trace_id)
    assert len(keys) == 2
    before = [manifest.parse(store.get(k), k) for k in keys]
    assert [m["status"] for m in before] == ["ok", "pending"]
    assert [p.name for p in journal_dir.iterdir() if p.name.endswith(BLOBS)]

    records = recover(str(journal_dir), lambda r: None)
    (record,) = records
    assert f"{record.span_id:016x}" == before[1]["span_id"]
    assert record.attributes["flashinfer.crash"] is True
    assert record.attributes["flashinfer.blob.manifest"] == store.url_of(keys[1])
    after = manifest.parse(store.get(keys[1]), keys[1])
    assert after["status"] == "crashed" and after["error"]["type"] == "ProcessCrash"
    assert str(before[1]["pid"]) in after["error"]["message"]
    assert after["args"] == before[1]["args"]  # inputs untouched
    assert list(journal_dir.iterdir()) == []  # journal and its blob note are gone
    assert recover(str(journal_dir), lambda r: None) == []  # recovered once

    bundle = tmp_path / "bundle"
    pulled = _cli(tmp_path, "pull", trace_id, "--blob-url", str(blobs), "-o", str(bundle))
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    calls = load_bundle(str(bundle))
    assert [c.status for c in calls] == ["ok", "crashed"]
    table, rows = inputs()
    got = {a.name: a.value for a in calls[1].args}
    for name, want in (("table", table), ("rows", rows)):
        assert got[name].dtype == want.dtype and torch.equal(got[name], want)
    ref = after["args"][0]["value"]
    assert torch.equal(encode.decode((bundle / ref["key"]).read_bytes(), "safetensors"),
                       table.reshape(-1))

    replayed = _cli(tmp_path, "replay", str(bundle), "--allow-module", "test_crash_safe")
    lines = replayed.stdout.strip().splitlines()
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert lines[0].startswith("PASS") and "bit-exact" in lines[0]
    assert lines[1].startswith("PASS") and "reproduced the crash: IndexError: row 99" in lines[1]
    assert lines[-1] == "2 passed, 0 failed"

    # The crash itself comes back where the environment is the crashed process's.
    env = {**_env(tmp_path), KILL_ENV: "1"}
    killed = _cli(tmp_path, "replay", str(bundle), "--allow-module", "test_crash_safe",
                  env=env)
    assert killed.returncode == -signal.SIGKILL


def test_crashed_call_that_returns_normally_is_not_reproduced(tmp_path):
    """A fixed function no longer crashes: replay says so and fails."""
    from otel_flashinfer.replay.bundle import RecordedArg, RecordedCall
    from otel_flashinfer.replay.runner import _Runner

    table, rows = inputs()
    call = RecordedCall(
        api="gather_rows", module="test_crash_safe", qualname="gather_rows",
        instance_id=None, trace_id="0" * 32, span_id="1" * 16, status="crashed", seq=0,
        start_ns=1, args=[RecordedArg("table", "positional_or_keyword", table),
                          RecordedArg("rows", "positional_or_keyword", rows[:3])],
        result=None, skipped=None, error={"type": "ProcessCrash", "message": "x"},
        path="m.json", manifest={})
    res = _Runner(("test_crash_safe",), None, None).run(call)
    assert not res.passed and "not reproduced" in res.detail
    # In flight at SIGTERM/exit only (no ProcessCrash): running is enough, as before.
    call.error = None
    assert _Runner(("test_crash_safe",), None, None).run(call).passed


def test_remap_keeps_out_of_range_pages_out_of_range():
    from otel_flashinfer.replay.runner import remap_page_indices

    idx = torch.tensor([7, 3, 5, 3, 100, (1 << 24) + 2], dtype=torch.int32)
    out = remap_page_indices(idx, [3, 5, 7], num_pages=10)
    assert out.dtype == torch.int32
    assert out.tolist() == [2, 0, 1, 0, 93, (1 << 24) + 2 - 10 + 3]


def test_sidecar_names_the_store_only_when_crash_safe(tmp_path):
    import dataclasses

    from otel_flashinfer.config import Settings
    from otel_flashinfer.journal import BLOBS, open_journal

    for crash_safe, level in ((True, 10), (False, 10), (True, 5)):
        d = tmp_path / f"j{crash_safe}{level}"
        settings = dataclasses.replace(Settings(blob_url="rel/blobs"), journal_dir=str(d),
                                       crash_safe=crash_safe, level=level)
        journal = open_journal(settings, None)
        try:
            notes = [p for p in d.iterdir() if p.name.endswith(BLOBS)]
            if crash_safe and level == 10:
                (note,) = notes
                assert json.loads(note.read_text()) == {
                    "blob_url": os.path.abspath("rel/blobs")}
            else:
                assert notes == []
        finally:
            journal.close()
        assert list(d.iterdir()) == []
