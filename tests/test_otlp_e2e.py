"""The exporter proved against a real receiver: a traced program in its own process,
configured only through the standard OTEL_* variables, sends its spans to Arize
Phoenix over OTLP/gRPC and OTLP/HTTP; we read them back through Phoenix's REST API
and check names, ids, parent/child, attributes, status and the exception event.
The local-file default and ``otel-flashinfer push`` are checked the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from servers import PhoenixServer, child_env, last_json_line, phoenix_installed, run_python

import otel_flashinfer

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not phoenix_installed(), reason="needs arize-phoenix (test extra)"),
]

#: The traced program: an engine span with two nested traced calls and one that raises.
#: Inside each traced function the current span is ours, so the program can report the
#: span ids it saw; Phoenix must hold exactly those.
PROGRAM = r'''
import json, os
import torch
import otel_flashinfer
from opentelemetry import trace

otel_flashinfer.instrument(level=3, journal_dir="")
seen = {}

def note(name):
    seen[name] = format(trace.get_current_span().get_span_context().span_id, "016x")

@otel_flashinfer.traced
def inner(x, scale=0.5):
    note("inner")
    return x * scale

@otel_flashinfer.traced
def outer(x, layout="NHD"):
    note("outer")
    return inner(x) + 1

@otel_flashinfer.traced(name="explode")
def explode(x):
    note("explode")
    raise ValueError("bad page table")

with trace.get_tracer("engine").start_as_current_span("engine.step") as step:
    ctx = step.get_span_context()
    out = outer(torch.ones(2, 3, dtype=torch.float16))
    try:
        explode(torch.zeros(4, 8))
    except ValueError as exc:
        caught = str(exc)
seen["engine.step"] = format(ctx.span_id, "016x")
flushed = otel_flashinfer.flush(timeout_s=30)
print(json.dumps({"trace_id": format(ctx.trace_id, "032x"), "ids": seen, "flushed": flushed,
                  "caught": caught, "out": out.float().tolist(), "pid": os.getpid(),
                  "counters": otel_flashinfer.counters()}))
'''


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory):
    server = PhoenixServer(tmp_path_factory.mktemp("phoenix")).start()
    yield server
    server.stop()


@pytest.fixture
def program(tmp_path: Path) -> Path:
    path = tmp_path / "traced_program.py"
    path.write_text(PROGRAM)
    return path


def _project() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"


def _run(program: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    result = run_python(program, child_env(env), cwd, timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert report["caught"] == "bad page table"  # the user's exception reached the user
    assert report["out"] == [[1.5] * 3] * 2  # and results are the function's own
    # Our three spans left through the native encoder, none through the SDK's.
    assert report["counters"].get("spans_native") == 3, report["counters"]
    assert not report["counters"].get("spans_sdk"), report["counters"]
    assert not report["counters"].get("spans_dropped"), report["counters"]
    return report


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _assert_trace(spans: dict[str, dict[str, Any]], report: dict[str, Any]) -> None:
    """The four spans, their hierarchy, attributes and status as the program made them."""
    ids = report["ids"]
    assert set(spans) == set(ids.values()), (sorted(spans), ids)
    by_name = {s["name"]: s for s in spans.values()}
    assert set(by_name) == {"engine.step", "outer", "inner", "explode"}
    for name, span in by_name.items():
        assert span["context"]["span_id"] == ids[name]
        assert span["context"]["trace_id"] == report["trace_id"]

    step, outer, inner, explode = (by_name[n] for n in ("engine.step", "outer", "inner",
                                                        "explode"))
    assert step["parent_id"] is None
    assert outer["parent_id"] == ids["engine.step"]
    assert inner["parent_id"] == ids["outer"]
    assert explode["parent_id"] == ids["engine.step"]
    # Host times nest like the calls did.
    assert _when(step["start_time"]) <= _when(outer["start_time"]) <= _when(inner["start_time"])
    assert _when(inner["end_time"]) <= _when(outer["end_time"]) <= _when(step["end_time"])

    a = outer["attributes"]
    assert a["flashinfer.api"] == "outer"
    assert a["flashinfer.level"] == 3
    assert a["flashinfer.arg.x.shape"] == [2, 3]
    assert a["flashinfer.arg.x.dtype"] == "float16"
    assert a["flashinfer.arg.x.stride"] == [3, 1]
    assert a["flashinfer.arg.x.device"] == "cpu"
    assert a["flashinfer.arg.x.contiguous"] is True
    assert a["flashinfer.arg.layout"] == "NHD"  # a default, not passed by the caller
    assert a["flashinfer.result.0.shape"] == [2, 3]
    b = inner["attributes"]
    assert b["flashinfer.api"] == "inner"
    assert b["flashinfer.arg.scale"] == 0.5
    assert b["flashinfer.arg.x.shape"] == [2, 3]
    c = explode["attributes"]
    assert c["flashinfer.api"] == "explode"
    assert c["flashinfer.arg.x.shape"] == [4, 8]
    assert not any(k.startswith("flashinfer.result.") for k in c)

    for span in (step, outer, inner):
        assert span["status_code"] in ("UNSET", "OK"), span["status_code"]
    assert explode["status_code"] == "ERROR"
    assert "bad page table" in (explode["status_message"] or "")
    events = [e for e in explode["events"] if e["name"] == "exception"]
    assert len(events) == 1
    event = events[0]["attributes"]
    assert event["exception.type"] == "ValueError"
    assert event["exception.message"] == "bad page table"
    assert 'raise ValueError("bad page table")' in event["exception.stacktrace"]
    assert not outer["events"] and not inner["events"]


def test_grpc_export_reaches_phoenix(phoenix: PhoenixServer, program: Path,
                                     tmp_path: Path) -> None:
    project = _project()
    report = _run(program, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.grpc_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "e2e-grpc",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project},deployment=ci",
    }, tmp_path)
    assert report["flushed"] is True
    spans = phoenix.wait_spans(project, 4, report["trace_id"])
    _assert_trace(spans, report)
    # Nothing configured a file, and an endpoint was given: no local trace file.
    assert not (tmp_path / "flashinfer_traces.jsonl").exists()


def test_http_protobuf_export_with_headers(phoenix: PhoenixServer, program: Path,
                                           tmp_path: Path) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS reaches the wire: Phoenix files spans under the
    ``x-project-name`` header's project, ahead of the resource attribute's."""
    by_header, by_resource = _project(), _project()
    report = _run(program, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.http_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-project-name={by_header}",
        "OTEL_SERVICE_NAME": "e2e-http",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={by_resource}",
    }, tmp_path)
    assert report["flushed"] is True
    spans = phoenix.wait_spans(by_header, 4, report["trace_id"])
    _assert_trace(spans, report)
    assert not phoenix.project_exists(by_resource)


def _file_spans(path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Spans by id, and the (resource, scope) pairs, of an OTLP/JSON-lines file."""
    spans: dict[str, dict[str, Any]] = {}
    scopes: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        for rs in json.loads(line)["resourceSpans"]:
            resource = {kv["key"]: kv["value"] for kv in rs["resource"]["attributes"]}
            for ss in rs["scopeSpans"]:
                scopes.append({"resource": resource, "scope": ss.get("scope", {})})
                for span in ss["spans"]:
                    spans[span["spanId"]] = span
    return spans, scopes


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_local_file_then_push(phoenix: PhoenixServer, program: Path, tmp_path: Path,
                              protocol: str) -> None:
    """No endpoint: the default file exporter writes ./flashinfer_traces.jsonl; then
    ``otel-flashinfer push`` delivers it with the very same ids and hierarchy."""
    project = _project()
    report = _run(program, {
        "OTEL_SERVICE_NAME": "e2e-file",
        "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name={project}",
    }, tmp_path)
    trace_file = tmp_path / "flashinfer_traces.jsonl"
    assert trace_file.is_file()
    file_spans, scopes = _file_spans(trace_file)
    assert set(file_spans) == set(report["ids"].values())
    assert all(s["traceId"] == report["trace_id"] for s in file_spans.values())
    # Instrumentation scope and resource (Phoenix does not store the scope; the file does).
    by_id = {v: k for k, v in report["ids"].items()}
    ours = {by_id[s["spanId"]] for s in file_spans.values() if s["name"] != "engine.step"}
    assert ours == {"outer", "inner", "explode"}
    scope_names = {sc["scope"].get("name") for sc in scopes}
    assert "otel_flashinfer" in scope_names and "engine" in scope_names
    for sc in scopes:
        if sc["scope"].get("name") == "otel_flashinfer":
            assert sc["scope"].get("version") == otel_flashinfer.__version__
        assert sc["resource"]["service.name"] == {"stringValue": "e2e-file"}

    endpoint = phoenix.grpc_url if protocol == "grpc" else phoenix.http_url
    push = subprocess.run(
        [sys.executable, "-m", "otel_flashinfer", "push", str(trace_file),
         "--endpoint", endpoint, "--protocol", protocol],
        env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert push.returncode == 0, push.stderr[-3000:]
    spans = phoenix.wait_spans(project, 4, report["trace_id"])
    _assert_trace(spans, report)
