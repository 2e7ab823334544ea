"""OTLP/HTTP sends read requests' environment once in a while, with the same result.

``http_environment.CachedEnvironment`` stands in for a session's
``merge_environment_settings``: these tests hold it to the session's own answer for
proxies, ``NO_PROXY`` and CA bundles, count how often it reads the environment, and
send through the SDK's real OTLP/HTTP exporter to a real receiving process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from servers import child_env, free_port, otlp_request, start_otlp_receiver, stop_pid

from otel_flashinfer import http_environment
from otel_flashinfer.export import HttpSender

URLS = ("http://127.0.0.1:4318/v1/traces", "http://collector.example:4318/v1/traces",
        "https://tempo.example/v1/traces")
ENVS: tuple[dict[str, str], ...] = (
    {},
    {"HTTP_PROXY": "http://proxy.example:3128", "HTTPS_PROXY": "http://proxy.example:3129"},
    {"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "127.0.0.1,collector.example"},
    {"REQUESTS_CA_BUNDLE": "/etc/ssl/certs/bundle.pem"},
    {"https_proxy": "http://lower.example:8080", "no_proxy": "tempo.example"},
)
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE",
              "CURL_CA_BUNDLE")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("env", ENVS, ids=["none", "proxies", "no_proxy", "ca_bundle", "lower"])
def test_the_same_settings_as_the_sessions_own(clean_env: pytest.MonkeyPatch,
                                               env: dict[str, str]) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    session = requests.Session()
    cached = http_environment.CachedEnvironment(session)
    for url in URLS:
        for verify in (None, False, "/tmp/ca.pem"):
            want = session.merge_environment_settings(url, {}, None, verify, None)
            assert cached(url, {}, None, verify, None) == want
            assert cached(url, {}, None, verify, None) == want  # from the cache now


def test_the_environment_is_read_once_per_refresh(clean_env: pytest.MonkeyPatch) -> None:
    session = requests.Session()
    cached = http_environment.CachedEnvironment(session)
    reads: list[str] = []
    own = cached.original

    def counting(url: str, *args: Any) -> dict[str, Any]:
        reads.append(url)
        return own(url, *args)

    cached.original = counting
    clock = [1000.0]
    clean_env.setattr(http_environment.time, "monotonic", lambda: clock[0])
    for _ in range(50):
        assert cached(URLS[1], {}, None, None, None)["proxies"] == {}
    assert reads == [URLS[1]]
    # A proxy set meanwhile takes effect once the reading is REFRESH_S old.
    clean_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    clock[0] += http_environment.REFRESH_S - 1
    assert cached(URLS[1], {}, None, None, None)["proxies"] == {}
    clock[0] += 1
    assert cached(URLS[1], {}, None, None, None)["proxies"] == {
        "http": "http://proxy.example:3128"}
    assert len(reads) == 2
    # The session's own settings are part of the answer: a change reads it again.
    session.verify = "/tmp/other.pem"
    assert cached(URLS[1], {}, None, None, None)["verify"] == "/tmp/other.pem"
    assert len(reads) == 3


def test_a_caller_changing_the_answer_does_not_change_the_cache(
        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    cached = http_environment.CachedEnvironment(requests.Session())
    first = cached(URLS[1], {}, None, None, None)
    first["proxies"]["http"] = "http://changed.example"
    first["verify"] = False
    again = cached(URLS[1], {}, None, None, None)
    assert again["proxies"] == {"http": "http://proxy.example:3128"}
    assert again["verify"] is True


@pytest.fixture
def receiver() -> Any:
    http_port = free_port()
    proc = start_otlp_receiver(http_port, free_port())
    try:
        yield http_port
    finally:
        stop_pid(proc.pid)


def test_senders_share_the_sessions_reading_and_give_it_back(receiver: int) -> None:
    """Through the SDK's own exporter to a real receiver: the first send puts the
    reading on the session, a second sender shares it, and the last close gives the
    session its own method back."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{receiver}/v1/traces")
    session = http_environment.session_of(exporter)
    assert isinstance(session, requests.Session)
    first, second = HttpSender(exporter), HttpSender(exporter)
    assert "merge_environment_settings" not in session.__dict__  # nothing before a send
    assert first.send(otlp_request(3), 3)
    cached = session.__dict__["merge_environment_settings"]
    assert isinstance(cached, http_environment.CachedEnvironment)
    assert second.send(otlp_request(2), 2) and first.send(otlp_request(1), 1)
    assert session.__dict__["merge_environment_settings"] is cached
    assert cached.users == 2
    first.close()
    assert session.__dict__["merge_environment_settings"] is cached
    second.close()
    assert "merge_environment_settings" not in session.__dict__
    got = requests.get(f"http://127.0.0.1:{receiver}/count", timeout=10).json()
    assert got["spans"] == 6 and got["errors"] == 0, got


def test_an_exporter_without_a_requests_session_is_left_alone() -> None:
    class Other:
        _session = object()

    assert http_environment.hold(Other()) is None
    http_environment.release(None)


DRIVER = r'''
import json, sys
import torch
import otel_flashinfer
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from otel_flashinfer import health, http_environment

exporter = OTLPSpanExporter(endpoint=sys.argv[1])
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(exporter))
trace.set_tracer_provider(provider)
otel_flashinfer.instrument(level=1)
f = otel_flashinfer.traced(lambda q: q, name="f")
for _ in range(10):
    f(torch.ones(2))
flushed = otel_flashinfer.flush(10)
session = http_environment.session_of(exporter)
held = type(session.__dict__.get("merge_environment_settings")).__name__
otel_flashinfer.uninstrument()
after = type(session.__dict__.get("merge_environment_settings")).__name__
print(json.dumps({"flushed": flushed, "held": held, "after": after,
                  "native": health.counters().get("spans_native", 0)}))
'''


def test_the_applications_exporter_gets_its_session_back_at_uninstrument(
        receiver: int, tmp_path: Path) -> None:
    """The application's own SDK provider, OTLP/HTTP through a BatchSpanProcessor: our
    sender reads the environment through the exporter's session while instrumented,
    and ``uninstrument`` leaves that session as it found it."""
    import json

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run([sys.executable, str(driver),
                          f"http://127.0.0.1:{receiver}/v1/traces"], env=child_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"flushed": True, "held": "CachedEnvironment", "after": "NoneType",
                      "native": 10}, report
    got = requests.get(f"http://127.0.0.1:{receiver}/count", timeout=10).json()
    assert got["spans"] == 10 and got["errors"] == 0, got


def test_spans_a_receiver_rejects_in_a_partial_success_are_counted() -> None:
    """A receiver that takes a request (HTTP 200, gRPC OK) but rejects its spans: the
    SDK's exporters ignore the response; our senders count them (``spans_rejected``)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from otel_flashinfer import health
    from otel_flashinfer.export import GrpcSender

    http_port, grpc_port = free_port(), free_port()
    proc = start_otlp_receiver(http_port, grpc_port, reject=True)
    try:
        before = health.counters().get("spans_rejected", 0)
        http = HttpSender(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces"))
        assert http.send(otlp_request(3), 3)  # taken: not a failed send
        assert http.transport == "urllib3"  # our copy of the SDK's client over urllib3
        grpc = GrpcSender(GrpcExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True))
        assert grpc.send(otlp_request(4), 4)
        http.close()
        grpc.close()
        got = requests.get(f"http://127.0.0.1:{http_port}/count", timeout=10).json()
        rejected = health.counters().get("spans_rejected", 0) - before
        assert got["spans"] == 7 and rejected == 7, (rejected, got)
    finally:
        stop_pid(proc.pid)
