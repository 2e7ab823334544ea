"""OTLP/HTTP through the SDK's urllib3 transport while the requests session adds nothing.

``http_direct.direct_settings`` decides, from real ``requests.Session`` objects and the
real environment, when requests would send a request exactly as urllib3's pool does;
the wire tests hold the two paths to the same request line, headers and body on a real
socket, over plain HTTP and over TLS with a certificate of the test's own.
"""

from __future__ import annotations

import gzip
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from servers import free_port, otlp_request

from otel_flashinfer import http_direct
from otel_flashinfer.export import HttpSender

URL = "http://127.0.0.1:4318/v1/traces"
CLIENT_HEADERS = {"Content-Type": "application/x-protobuf", "User-Agent": "OTel-OTLP",
                  "x-tenant": "a"}
ENV_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE", "NETRC")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # not the box's ~/.netrc
    return monkeypatch


def _decide(session: requests.Session, url: str = URL) -> tuple[Any, str]:
    return http_direct.direct_settings(session, url, CLIENT_HEADERS)


def test_a_plain_session_goes_direct_with_the_headers_requests_would_send(
        clean_env: pytest.MonkeyPatch) -> None:
    session = requests.Session()
    session.headers["x-from-session"] = "s"
    session.headers["Accept"] = None  # requests drops a header set to None
    settings, reason = _decide(session)
    assert reason == "direct"
    prepared = session.prepare_request(requests.Request("POST", URL, headers=CLIENT_HEADERS,
                                                        data=b"x"))
    want = {k.lower(): v for k, v in prepared.headers.items() if k.lower() != "content-length"}
    assert {k.lower(): v for k, v in settings.headers.items()} == want
    assert "accept" not in want and want["x-tenant"] == "a" and want["user-agent"] == "OTel-OTLP"
    # requests' CA bundle where it would use its own: certifi's, not the system's store.
    assert settings.verify == requests.utils.extract_zipped_paths(
        requests.utils.DEFAULT_CA_BUNDLE_PATH)
    assert settings.cert is None


def _mount_other(session: requests.Session) -> None:
    session.mount("http://127.0.0.1", requests.adapters.HTTPAdapter())


def _retrying(session: requests.Session) -> None:
    session.mount("http://", requests.adapters.HTTPAdapter(max_retries=3))


class _Sub(requests.Session):
    pass


def _pinned(session: requests.Session) -> None:
    """A certificate pin given to the default adapter's pool manager: urllib3's own
    pool would not know it."""
    session.get_adapter("https://").init_poolmanager(10, 10, assert_fingerprint="00" * 32)


def _own_context(session: requests.Session) -> None:
    context = ssl.create_default_context()
    session.get_adapter("http://").init_poolmanager(10, 10, ssl_context=context)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda s: setattr(s, "auth", ("u", "p")), "auth"),
    (lambda s: s.hooks["response"].append(lambda r, **_: r), "hooks"),
    (lambda s: s.cookies.set("c", "1"), "cookies"),
    (lambda s: s.params.update(tenant="a"), "params"),
    (lambda s: s.proxies.update(http="http://proxy.example:3128"), "proxies"),
    (_mount_other, "adapters"),
    (_retrying, "adapters"),
    (_pinned, "adapters"),
    (_own_context, "adapters"),
])
def test_a_session_that_adds_to_the_request_keeps_requests(
        clean_env: pytest.MonkeyPatch, change: Any, reason: str) -> None:
    session = requests.Session()
    change(session)
    assert _decide(session) == (None, reason)


def test_a_subclassed_session_keeps_requests(clean_env: pytest.MonkeyPatch) -> None:
    assert _decide(_Sub()) == (None, "session_type")


def test_a_user_in_the_url_keeps_requests(clean_env: pytest.MonkeyPatch) -> None:
    """requests sends it as basic auth; urllib3 would drop it."""
    assert _decide(requests.Session(), "http://user:tok@127.0.0.1:4318/v1/traces") == (
        None, "url_auth")


def test_the_environment_decides_as_requests_does(clean_env: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    clean_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert _decide(requests.Session()) == (None, "proxies")
    clean_env.setenv("NO_PROXY", "127.0.0.1")  # requests bypasses the proxy for it
    assert _decide(requests.Session())[1] == "direct"
    session = requests.Session()
    session.trust_env = False  # requests reads no environment at all then
    clean_env.delenv("NO_PROXY")
    assert _decide(session)[1] == "direct"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login u password p\n")
    clean_env.delenv("HTTP_PROXY")
    clean_env.setenv("NETRC", str(netrc))
    assert _decide(requests.Session()) == (None, "netrc")  # requests would add basic auth
    assert _decide(requests.Session(), "http://other.example/v1/traces")[1] == "direct"


def test_tls_settings_follow_the_environment_and_the_session(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not read here")
    https = "https://tempo.example/v1/traces"
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    settings, _ = _decide(requests.Session(), https)
    assert settings.verify == str(bundle)
    clean_env.delenv("REQUESTS_CA_BUNDLE")
    session = requests.Session()
    session.verify, session.cert = False, ("/c.pem", "/k.pem")
    settings, _ = _decide(session, https)
    assert settings.verify is False and settings.cert == ("/c.pem", "/k.pem")
    session.verify = str(tmp_path)  # a folder of CAs: urllib3's ca_certs cannot take it
    assert _decide(session, https) == (None, "ca_path")
    session.verify = str(tmp_path / "missing.pem")  # requests' own error, not ours
    assert _decide(session, https) == (None, "ca_path")


def test_a_transport_the_application_chose_is_left_alone(clean_env: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=URL, _transport=Urllib3HTTPTransport())
    sender = HttpSender(exporter)
    sender._choose(exporter)  # noqa: SLF001
    assert (sender.transport, sender.direct_reason) == ("requests", "transport")


# ---- on the wire ------------------------------------------------------------------------


class _Capture(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict[str, str], bytes]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.seen.append((self.command, self.path,  # type: ignore[attr-defined]
                                 {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        cookie = getattr(self.server, "set_cookie", None)
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[ThreadingHTTPServer, int]]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Capture)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, port
    finally:
        server.shutdown()
        server.server_close()


def _without_direct(sender: HttpSender) -> HttpSender:
    sender._direct_at = float("inf")  # noqa: SLF001 - never asks: the session sends
    return sender


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_both_paths_put_the_same_request_on_the_wire(
        clean_env: pytest.MonkeyPatch, capture: tuple[Any, int], compression: str) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = capture
    clean_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme,authorization=Bearer%20t")
    url = f"http://127.0.0.1:{port}/v1/traces"
    kind = Compression.Gzip if compression == "gzip" else Compression.NoCompression
    direct = HttpSender(OTLPSpanExporter(endpoint=url, compression=kind))
    plain = _without_direct(HttpSender(OTLPSpanExporter(endpoint=url, compression=kind)))
    payload = otlp_request(5)
    assert direct.send(payload, 5) and plain.send(payload, 5)
    assert (direct.transport, direct.direct_reason) == ("urllib3", "direct")
    assert plain.transport == "requests"
    (m1, p1, h1, b1), (m2, p2, h2, b2) = server.seen
    assert (m1, p1) == (m2, p2) == ("POST", "/v1/traces")
    assert h1 == h2, (h1, h2)
    assert h1["x-tenant"] == "acme" and h1["authorization"] == "Bearer t"
    assert h1["content-type"] == "application/x-protobuf"
    if compression == "gzip":
        assert h1["content-encoding"] == "gzip"
        b1, b2 = gzip.decompress(b1), gzip.decompress(b2)
    assert b1 == b2 == payload
    direct.close()
    plain.close()


def test_a_proxy_set_later_is_honoured_at_the_next_look(
        clean_env: pytest.MonkeyPatch, capture: tuple[Any, int]) -> None:
    """The capture server stands in for an HTTP proxy: requests sends it the absolute
    URL.  Until the proxy is set, the request goes straight to the endpoint."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = capture
    sender = HttpSender(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    assert sender.send(otlp_request(1), 1) and sender.transport == "urllib3"
    clean_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    far = "http://collector.invalid:4318/v1/traces"
    sender.exporter._client._endpoint = far  # noqa: SLF001 - a proxied endpoint
    sender._direct_at = 0.0  # noqa: SLF001 - the next look is due
    sender.exporter._client._transport._session.__dict__.pop(  # noqa: SLF001
        "merge_environment_settings", None)  # the cached reading too
    assert sender.send(otlp_request(1), 1)
    assert (sender.transport, sender.direct_reason) == ("requests", "proxies")
    assert [path for _, path, _, _ in server.seen] == ["/v1/traces", far]
    sender.close()


def test_a_cookie_set_by_the_receiver_is_sent_back_as_requests_would(
        clean_env: pytest.MonkeyPatch, capture: tuple[Any, int]) -> None:
    """A load balancer's sticky cookie: the first response sets it, and every later
    request carries it (through the session, whose jar now holds it)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = capture
    server.set_cookie = "AWSALB=sticky1; Path=/"
    sender = HttpSender(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    assert sender.send(otlp_request(1), 1) and sender.transport == "urllib3"
    server.set_cookie = None
    assert sender.send(otlp_request(2), 2) and sender.send(otlp_request(3), 3)
    assert (sender.transport, sender.direct_reason) == ("requests", "cookies")
    cookies = [headers.get("cookie") for _, _, headers, _ in server.seen]
    assert cookies == [None, "AWSALB=sticky1", "AWSALB=sticky1"]
    sender.close()


def test_a_closed_sender_makes_no_pool(clean_env: pytest.MonkeyPatch,
                                       capture: tuple[Any, int]) -> None:
    """``close`` may run while the sender thread still sends (a join that timed out):
    it goes on through the session and leaves no urllib3 pool behind."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = capture
    sender = HttpSender(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    assert sender.send(otlp_request(1), 1) and sender.transport == "urllib3"
    sender.close()
    sender._direct_at = 0.0  # noqa: SLF001 - a look would be due
    assert sender.send(otlp_request(1), 1)
    assert sender.transport == "requests" and sender._direct is None  # noqa: SLF001
    assert len(server.seen) == 2


def test_a_forked_child_makes_its_own_pool(clean_env: pytest.MonkeyPatch,
                                          capture: tuple[Any, int]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = capture
    sender = HttpSender(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    assert sender.send(otlp_request(1), 1)
    parents = sender._direct  # noqa: SLF001
    sender.after_fork()
    assert sender.transport == "requests" and sender._direct is None  # noqa: SLF001
    assert sender.send(otlp_request(2), 2) and sender.transport == "urllib3"
    assert sender._direct is not parents  # noqa: SLF001
    assert len(server.seen) == 2
    sender.close()


# ---- TLS: certificate checks stay on --------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_capture(capture: tuple[Any, int], self_signed: tuple[Path, Path]) -> tuple[Any, int]:
    server, port = capture
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, self_signed))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server, port


def test_tls_verifies_against_the_configured_certificate(
        clean_env: pytest.MonkeyPatch, tls_capture: tuple[Any, int],
        self_signed: tuple[Path, Path]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    server, port = tls_capture
    url = f"https://127.0.0.1:{port}/v1/traces"
    trusted = HttpSender(OTLPSpanExporter(endpoint=url, certificate_file=str(self_signed[0])))
    assert trusted.send(otlp_request(3), 3)
    assert trusted.transport == "urllib3"
    assert trusted._direct_settings.verify == str(self_signed[0])  # noqa: SLF001
    # Without it the bundle is certifi's, which does not know this certificate.
    untrusted = HttpSender(OTLPSpanExporter(endpoint=url, timeout=3))
    assert not untrusted.send(otlp_request(4), 4)
    assert untrusted.transport == "urllib3"
    assert len(server.seen) == 1 and server.seen[0][3] == otlp_request(3)
    trusted.close()
    untrusted.close()
    assert os.path.exists(self_signed[0])
