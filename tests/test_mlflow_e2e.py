"""The native export path against MLflow's tracking server (OTLP/HTTP at /v1/traces).

MLflow and Phoenix pin incompatible GraphQL libraries, so MLflow lives in a virtual
environment of its own (``.venv-mlflow``, made by ``.ci/run``); the server and the
client that reads the traces back both run from there.  The traced program is the one
the Phoenix tests use (tests/test_otlp_e2e.py), configured only through OTEL_*.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from servers import REPO_ROOT, child_env, free_port, http_get_json, stop_pid, wait_until
from test_otlp_e2e import PROGRAM, _run

MLFLOW_VENV = REPO_ROOT / ".venv-mlflow"
MLFLOW = MLFLOW_VENV / "bin" / "mlflow"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not MLFLOW.exists(), reason="needs .venv-mlflow (made by .ci/run)"),
]

#: Reads a trace back through MLflow's own client: one JSON line of its spans.
READ_BACK = r'''
import json, sys
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
trace = client.get_trace(sys.argv[2])
spans = []
for s in trace.data.spans:
    spans.append({"name": s.name, "span_id": s.span_id, "parent_id": s.parent_id,
                  "trace_id": s.trace_id, "status": str(s.status.status_code),
                  "attributes": {k: v for k, v in (s.attributes or {}).items()},
                  "events": [e.name for e in s.events]})
print(json.dumps(spans, default=str))
'''


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(work / "mlflow.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--default-artifact-root", str(work / "artifacts"), "--workers", "1"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=child_env())
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_until(lambda: proc.poll() is None and
                           http_get_json(url + "/health", timeout_s=1.0)[0] == 200, 180, 0.5)
        if not ready:
            raise RuntimeError((work / "mlflow.log").read_text()[-4000:])
        yield url
    finally:
        stop_pid(proc.pid)


def _read_back(url: str, trace_id: str, tmp_path: Path) -> list[dict[str, Any]]:
    script = tmp_path / "read_back.py"
    script.write_text(READ_BACK)
    python = MLFLOW_VENV / "bin" / "python"

    def attempt() -> list[dict[str, Any]] | None:
        proc = subprocess.run([str(python), str(script), url, f"tr-{trace_id}"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return None
        spans = json.loads(proc.stdout.strip().splitlines()[-1])
        return spans if len(spans) >= 4 else None

    found: list[Any] = []
    assert wait_until(lambda: found.append(attempt()) or found[-1] is not None, 60, 1.0), \
        "MLflow never showed the trace"
    return found[-1]


def test_native_http_export_reaches_mlflow(mlflow_server: str, tmp_path: Path) -> None:
    program = tmp_path / "traced_program.py"
    program.write_text(PROGRAM)
    report = _run(program, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": mlflow_server,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-mlflow-experiment-id=0",
        "OTEL_SERVICE_NAME": f"mlflow-{uuid.uuid4().hex[:8]}",
    }, tmp_path)
    assert report["flushed"] is True
    spans = _read_back(mlflow_server, report["trace_id"], tmp_path)
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"engine.step", "outer", "inner", "explode"}, by_name
    ids = report["ids"]

    def hex_id(value: str) -> str:
        return value[2:] if value.startswith("0x") else value

    for name, span in by_name.items():
        assert hex_id(span["span_id"]) == ids[name]
    assert hex_id(by_name["outer"]["parent_id"]) == ids["engine.step"]
    assert hex_id(by_name["inner"]["parent_id"]) == ids["outer"]
    assert hex_id(by_name["explode"]["parent_id"]) == ids["engine.step"]
    outer = by_name["outer"]["attributes"]
    assert outer["flashinfer.api"] == "outer"
    assert outer["flashinfer.arg.x.shape"] == [2, 3]
    assert outer["flashinfer.arg.layout"] == "NHD"
    assert "ERROR" in by_name["explode"]["status"]
    assert "exception" in by_name["explode"]["events"]
