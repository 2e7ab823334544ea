"""Hard crashes end to end: a child traced at level 3 dies inside a call (SIGKILL, or a
segfault through ctypes) nested under an engine span; after recovery the trace file
holds that call's span with the child's ids, its arguments and ERROR status, once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_journal import NOTE, _dead_pid, _write_journal

from otel_flashinfer import health
from otel_flashinfer.journal import recover
from otel_flashinfer.otlp_json import read_requests

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import ctypes, os, sys, time
    import torch
    import otel_flashinfer
    from opentelemetry import trace
    from otel_flashinfer.provider import resolve_provider

    mode, journal_dir = sys.argv[1], sys.argv[2]
    otel_flashinfer.instrument(level=3, journal_dir=journal_dir)
    resolve_provider(os.environ["OTEL_FLASHINFER_TRACES_FILE"])

    @otel_flashinfer.traced(name="single_decode_with_kv_cache")
    def single_decode_with_kv_cache(q, k_cache, v_cache, sm_scale=None, layout="NHD"):
        if mode == "warm":
            return q
        ctx = trace.get_current_span().get_span_context()
        print("ready", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", flush=True)
        if mode == "segv":
            ctypes.string_at(0)
        time.sleep(120)

    q = torch.zeros(4, 32, 128, dtype=torch.float16)
    kv = torch.zeros(16, 8, 128, dtype=torch.float16)
    real_mode, mode = mode, "warm"
    single_decode_with_kv_cache(q, kv, kv, sm_scale=0.125)   # a call that completes
    otel_flashinfer.flush()
    mode = real_mode
    tracer = trace.get_tracer("engine")
    with tracer.start_as_current_span("engine.step") as step:
        print("engine", f"{step.get_span_context().span_id:016x}", flush=True)
        single_decode_with_kv_cache(q, kv, kv, 0.125)
""")


def _env(traces: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OTEL_FLASHINFER_TRACES_FILE"] = str(traces)
    for key in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_FLASHINFER_LEVEL",
                "OTEL_FLASHINFER_JOURNAL_DIR"):
        env.pop(key, None)
    env["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    return env


def _start_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    traces = tmp_path / "traces.jsonl"
    journal_dir = tmp_path / "journal"
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(journal_dir)], cwd=tmp_path,
        env=_env(traces), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while "ready" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        word, *rest = line.split()
        seen[word] = " ".join(rest)
    if "ready" not in seen:
        proc.kill()
        raise AssertionError(f"child never got inside the call: {proc.stderr.read()}")
    trace_id, span_id = seen["ready"].split()
    return proc, {"trace_id": trace_id, "span_id": span_id, "engine": seen["engine"]}


def _spans(traces: Path) -> list[dict]:
    if not traces.exists():
        return []
    out = []
    for request in read_requests(str(traces)):
        for resource_spans in request["resourceSpans"]:
            for scope_spans in resource_spans["scopeSpans"]:
                out.extend(scope_spans.get("spans", []))
    return out


def _attrs(span: dict) -> dict:
    out = {}
    for item in span.get("attributes", []):
        value = item["value"]
        if "arrayValue" in value:
            out[item["key"]] = [int(v.get("intValue", 0)) for v in
                                value["arrayValue"].get("values", [])]
        else:
            (kind, raw), = value.items()
            out[item["key"]] = int(raw) if kind == "intValue" else raw
    return out


def _check_crashed_span(traces: Path, ids: dict[str, str], pid: int) -> None:
    crashed = [s for s in _spans(traces) if _attrs(s).get("flashinfer.crash") is True]
    assert len(crashed) == 1, json.dumps(crashed)[:2000]
    span = crashed[0]
    assert span["name"] == "single_decode_with_kv_cache"
    assert span["traceId"] == ids["trace_id"]
    assert span["spanId"] == ids["span_id"]
    assert span["parentSpanId"] == ids["engine"]
    assert span["status"]["code"] == 2  # ERROR
    attrs = _attrs(span)
    assert attrs["flashinfer.api"] == "single_decode_with_kv_cache"
    assert attrs["flashinfer.crash.pid"] == pid
    # Argument names come from the wrapper's plan when it passes one, else positions.
    shape_key = next(k for k in ("flashinfer.arg.q.shape", "flashinfer.arg.0.shape")
                     if k in attrs)
    assert attrs[shape_key] == [4, 32, 128]
    assert attrs[shape_key.replace("shape", "dtype")] == "float16"
    named = shape_key == "flashinfer.arg.q.shape"
    assert attrs["flashinfer.arg.sm_scale" if named else "flashinfer.arg.3"] == 0.125
    events = {e["name"]: e for e in span.get("events", [])}
    exc = {a["key"]: a["value"]["stringValue"] for a in events["exception"]["attributes"]}
    assert exc["exception.type"] == "ProcessCrash"
    assert str(pid) in exc["exception.message"]
    start, end = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
    assert start <= end <= time.time_ns()
    # The completed warm-up call is there once, without the crash mark.
    normal = [s for s in _spans(traces) if s["name"] == "single_decode_with_kv_cache"
              and "flashinfer.crash" not in _attrs(s)]
    assert len(normal) == 1


def _recover_cli(journal_dir: Path, traces: Path) -> subprocess.Popen[str]:
    # The product's CLI where it has the command wired, else the journal's own entry.
    code = textwrap.dedent(f"""
        import sys
        try:
            from otel_flashinfer.cli import build_parser, main
            build_parser().parse_args(["recover", "x"])
        except (ImportError, SystemExit):
            from otel_flashinfer.journal_cli import main
        sys.exit(main(["recover", {str(journal_dir)!r}]))
    """)
    return subprocess.Popen([sys.executable, "-c", code], env=_env(traces),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(240)
def test_sigkill_mid_call_two_racing_recoverers_emit_the_span_once(tmp_path: Path) -> None:
    proc, ids = _start_child(tmp_path, "sleep")
    journal_dir = tmp_path / "journal"
    traces = tmp_path / "traces.jsonl"
    try:
        (journal,) = [p for p in journal_dir.iterdir() if p.name.endswith(".journal")]
        before = journal.read_bytes()
        # The child is alive: recovery must leave its journal alone.
        assert recover(str(journal_dir), lambda r: None) == []
        assert journal.exists()
        assert journal.read_bytes()[:256] == before[:256]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert journal.exists()

    racers = [_recover_cli(journal_dir, traces) for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in racers]
    assert [r.returncode for r in racers] == [0, 0], outputs
    summaries = sorted(out.strip() for out, _ in outputs)
    assert summaries[0].startswith("recovered 0 span(s) from 0 journal(s)")
    assert summaries[1].startswith("recovered 1 span(s) from 1 journal(s)")
    _check_crashed_span(traces, ids, proc.pid)
    assert not [p for p in journal_dir.iterdir() if ".journal" in p.name]


@pytest.mark.timeout(240)
def test_segfault_mid_call_is_recovered_by_the_next_instrumented_process(
        tmp_path: Path) -> None:
    proc, ids = _start_child(tmp_path, "segv")
    proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGSEGV
    journal_dir = tmp_path / "journal"
    traces = tmp_path / "traces.jsonl"
    assert [p for p in journal_dir.iterdir() if p.name.endswith(".journal")]

    code = textwrap.dedent(f"""
        import otel_flashinfer
        otel_flashinfer.instrument(level=1, journal_dir={str(journal_dir)!r})
        assert otel_flashinfer.flush(30)
        otel_flashinfer.uninstrument()
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(traces), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "recovered 1 in-flight call(s) of 1 crashed process(es)" in done.stderr
    _check_crashed_span(traces, ids, proc.pid)
    # The recoverer's own journal is gone too after a clean uninstrument.
    assert not [p for p in journal_dir.iterdir() if ".journal" in p.name]


def test_cli_rejects_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from otel_flashinfer.journal_cli import main

    assert main(["recover", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    health.reset()


def _dead_journal_and_closed_port(tmp_path: Path) -> tuple[Path, Path, int]:
    """A folder holding a dead process's journal, the journal, and a port nobody
    listens on (the receiver down)."""
    import socket

    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    path = _write_journal(journal_dir, pid=_dead_pid(), ticks=5, notes=[NOTE],
                          last_write_ns=5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return journal_dir, path, port


def _receiver_down_env(traces: Path, port: int) -> dict[str, str]:
    """A traced program's environment exporting OTLP/HTTP to ``port``, where nobody
    listens, giving up after 2 s."""
    return {**_env(traces), "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2"}


@pytest.mark.timeout(120)
def test_cli_keeps_the_journal_while_the_receiver_is_down(tmp_path: Path) -> None:
    """``recover`` deleted a journal once its spans were handed on: with the collector
    down they were dropped, and gone.  Now the journal stays until a run exports it."""
    journal_dir, path, port = _dead_journal_and_closed_port(tmp_path)
    traces = tmp_path / "traces.jsonl"
    env = _receiver_down_env(traces, port)
    cmd = [sys.executable, "-m", "otel_flashinfer", "recover", str(journal_dir)]
    down = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert down.returncode == 1, down.stderr
    assert "1 span(s) were dropped" in down.stderr
    assert "kept the 1 journal(s)" in down.stderr
    assert sorted(os.listdir(journal_dir)) == [path.name]  # back under its own name
    up = subprocess.run(cmd, env=_env(traces), capture_output=True, text=True, timeout=90)
    assert up.returncode == 0, up.stderr
    assert os.listdir(journal_dir) == []
    crashed = [s for s in _spans(traces) if _attrs(s).get("flashinfer.crash") is True]
    assert [(s["spanId"], s["name"]) for s in crashed] == [
        (f"{NOTE['span_id']:016x}", NOTE["name"].decode())]




@pytest.mark.timeout(120)
def test_recovery_at_start_keeps_the_journal_while_the_receiver_is_down(
        tmp_path: Path) -> None:
    """The first instrumented process recovers dead processes' journals itself: it
    deleted them as soon as their spans were handed on, so with the collector down they
    were dropped and gone.  Now they stay until a run exports them."""
    journal_dir, path, port = _dead_journal_and_closed_port(tmp_path)
    traces = tmp_path / "traces.jsonl"
    code = textwrap.dedent(f"""
        import otel_flashinfer
        otel_flashinfer.instrument(level=1, journal_dir={str(journal_dir)!r})
        print("flushed", otel_flashinfer.flush(20), flush=True)
        otel_flashinfer.uninstrument()
    """)
    env = _receiver_down_env(traces, port)
    down = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    assert down.returncode == 0, down.stderr
    assert "journals are kept for the next recovery" in down.stderr
    assert sorted(os.listdir(journal_dir)) == [path.name]
    up = subprocess.run([sys.executable, "-c", code], env=_env(traces), cwd=tmp_path,
                        capture_output=True, text=True, timeout=90)
    assert up.returncode == 0, up.stderr
    assert "flushed True" in up.stdout, up.stderr
    assert os.listdir(journal_dir) == []
    crashed = [s for s in _spans(traces) if _attrs(s).get("flashinfer.crash") is True]
    assert [s["spanId"] for s in crashed] == [f"{NOTE['span_id']:016x}"]


@pytest.mark.timeout(120)
def test_a_forked_child_leaves_the_parents_recovered_journals_alone(tmp_path: Path) -> None:
    """A child forked after start-up recovery inherited the claims: its normal exit
    settled them (its flush empty, its drop count reset) and deleted the journal whose
    spans the parent could not send."""
    journal_dir, path, port = _dead_journal_and_closed_port(tmp_path)
    code = textwrap.dedent(f"""
        import os, sys
        import otel_flashinfer
        otel_flashinfer.instrument(level=1, journal_dir={str(journal_dir)!r})
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a worker that ends normally: its exit handlers run
        os.waitpid(pid, 0)
        print("claimed", sorted(n for n in os.listdir({str(journal_dir)!r})
                                if ".recovering." in n), flush=True)
        otel_flashinfer.uninstrument()
    """)
    env = _receiver_down_env(tmp_path / "t.jsonl", port)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert f"{path.name}.recovering." in out.stdout  # still the parent's after the child
    assert sorted(os.listdir(journal_dir)) == [path.name]  # put back: never exported
