"""Real receiving servers for end-to-end tests: start on free 127.0.0.1 ports, wait
until they answer, read spans back through their own API, stop by pid.

Imported explicitly by the tests that need them (``from servers import ...``); the
in-memory exporter is for unit tests only, so the exporter itself is proved here
against Arize Phoenix, which takes OTLP over both gRPC and HTTP/protobuf.

Phoenix imports slowly (~20 s on two cores), so callers start it once per module and
may start it early (``wait=False``) to overlap its boot with other work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Phoenix features that reach the internet or start optional machinery at boot;
#: off so that the server starts fast and offline.
PHOENIX_QUIET_ENV = {
    "PHOENIX_HOST": "127.0.0.1",
    "PHOENIX_TELEMETRY_ENABLED": "false",
    "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    "PHOENIX_DISABLE_AGENT_ASSISTANT": "true",
    "PHOENIX_ENABLE_MCP_SERVER": "false",
    "PHOENIX_ALLOWED_SANDBOX_PROVIDERS": "NONE",
}


def free_port() -> int:
    """A TCP port nothing listens on right now (also used as a 'receiver down' port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval_s)


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get_json(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET; connection errors are status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read().decode("utf-8")
            status = response.status
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        status = exc.code
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def stop_pid(pid: int, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process group we started (``start_new_session=True``): ``sig``, then KILL."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(pid, s)
        except ProcessLookupError:
            return
        if wait_until(lambda: not _alive(pid), timeout_s, 0.05):
            return


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid  # not our child (or already reaped): fall back to a signal probe
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    return done == 0


def phoenix_installed() -> bool:
    return importlib.util.find_spec("phoenix") is not None


class PhoenixServer:
    """One Phoenix process with its own working dir (SQLite), HTTP and gRPC ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()
        self.log_path = self.workdir / "phoenix.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """Base URL of the UI/REST API and of OTLP/HTTP (``/v1/traces``)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """OTLP/gRPC endpoint (``http://`` = no TLS, as the exporter reads it)."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout_s: float = 180.0) -> PhoenixServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "OTEL_"))}
        env.update(PHOENIX_QUIET_ENV)
        env.update(
            PHOENIX_PORT=str(self.http_port),
            PHOENIX_GRPC_PORT=str(self.grpc_port),
            PHOENIX_WORKING_DIR=str(self.workdir),
        )
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phoenix.server.main", "serve"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def ready(self) -> bool:
        status, _ = http_get_json(self.http_url + "/healthz", timeout_s=1.0)
        return status == 200 and tcp_open(self.grpc_port)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"Phoenix exited with {code}:\n{self.log_tail()}")
            return self.ready()

        if not wait_until(check, timeout_s, 0.2):
            raise TimeoutError(f"Phoenix not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-n:]
        except OSError:
            return ""

    # ---- reading spans back ----------------------------------------------------------

    def spans(self, project: str, trace_id: str | None = None) -> list[dict[str, Any]] | None:
        """Every span of ``project`` (REST ``/v1/projects/{p}/spans``), optionally of one
        trace; None while the project does not exist."""
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {"limit": "1000"}
            if cursor:
                query["cursor"] = cursor
            url = (f"{self.http_url}/v1/projects/{urllib.parse.quote(project, safe='')}/spans?"
                   + urllib.parse.urlencode(query))
            status, body = http_get_json(url)
            if status == 404:
                return None
            if status != 200:
                raise RuntimeError(f"GET {url}: {status} {str(body)[:500]}")
            out.extend(body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                break
        if trace_id is not None:
            out = [s for s in out if s["context"]["trace_id"] == trace_id]
        return out

    def wait_spans(self, project: str, count: int, trace_id: str | None = None,
                   timeout_s: float = 30.0) -> dict[str, dict[str, Any]]:
        """Spans by span id once at least ``count`` arrived (ingestion is asynchronous)."""
        got: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal got
            got = self.spans(project, trace_id) or []
            return len(got) >= count

        wait_until(check, timeout_s, 0.2)
        return {s["context"]["span_id"]: s for s in got}

    def project_exists(self, project: str) -> bool:
        return self.spans(project) is not None

    # ---- stopping --------------------------------------------------------------------

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout_s=10.0)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crashed receiver: no goodbye on open connections."""
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout_s=10.0, sig=signal.SIGKILL)
            self.proc.wait(timeout=10)


class Blackhole:
    """A receiver that accepts connections and never answers (a hung collector, a
    firewall that drops replies): exporters wait for their own timeouts."""

    def __init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(conn)  # kept open, never read or answered

    def close(self) -> None:
        self._closed = True
        for conn in [*self._conns, self._server]:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- traced programs in a subprocess ---------------------------------------------------

def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any OTEL_*/PHOENIX_* setting, the repo and the
    tests' helpers (``run_delay``) importable, plus ``extra``: a traced program
    configured only through what it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", ""))
        if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_otlp_receiver(http_port: int, grpc_port: int, reject: bool = False
                        ) -> subprocess.Popen:
    """``tests/otlp_receiver.py`` (a real OTLP/HTTP and gRPC receiver that decodes and
    counts every span; ``GET /count`` on the HTTP port) on these ports, once it says
    it is ready; ``reject``: it answers every request with a partial success rejecting
    all its spans.  Stop it with ``stop_pid``."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "otlp_receiver.py"), "--http-port",
         str(http_port), "--grpc-port", str(grpc_port), *(["--reject"] if reject else [])],
        stdout=subprocess.PIPE, text=True,
        env=child_env(), start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def run_python(script: Path, env: Mapping[str, str], cwd: Path, timeout_s: float = 120.0,
               args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with this interpreter; output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *args], env=dict(env), cwd=cwd, capture_output=True,
        text=True, timeout=timeout_s,
    )


def last_json_line(stdout: str) -> dict[str, Any]:
    """The last line of a program's stdout that is a JSON object (its report)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON report in output:\n{stdout[-2000:]}")


def otlp_request(spans: int) -> bytes:
    """A serialized ExportTraceServiceRequest of ``spans`` minimal spans (one trace)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id, span.span_id, span.name = bytes(15) + b"\x01", i.to_bytes(8, "big"), "f"
    return request.SerializeToString()
