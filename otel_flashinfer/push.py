"""``otel-flashinfer push``: send a local OTLP/JSON-lines file to a collector.

Each line already is an ExportTraceServiceRequest, so pushing is decoding it back
to protobuf and posting it unchanged (same ids, same times) over OTLP/HTTP or gRPC.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

from google.protobuf import json_format

from .otlp_json import TraceFileError, json_to_request, read_numbered


def parse_headers(text: str, source: str) -> dict[str, str]:
    """``k=v,k2=v2`` (URL-encoded, as OTEL_EXPORTER_OTLP_HEADERS) -> dict."""
    headers = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{source}: {item!r} is not KEY=VALUE")
        headers[urllib.parse.unquote(key.strip()).lower()] = urllib.parse.unquote(value.strip())
    return headers


def resolve_target(endpoint: str | None, protocol: str | None,
                   environ: Mapping[str, str]) -> tuple[str, str]:
    """(protocol, URL) from the flags, then the standard OTLP variables."""
    protocol = (protocol or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"protocol {protocol!r}: must be grpc or http/protobuf")
    signal_specific = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    url = endpoint or signal_specific or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not url:
        url = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318"
    try:
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        parsed.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"endpoint {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"endpoint {url!r}: must be an http(s)://host:port URL")
    if protocol == "http/protobuf" and not (endpoint is None and signal_specific) \
            and not parsed.path.rstrip("/").endswith("/v1/traces"):
        url = url.rstrip("/") + "/v1/traces"
    return protocol, url


def push_file(path: str, endpoint: str | None = None, protocol: str | None = None,
              headers: Sequence[str] = (), timeout_s: float = 10.0,
              environ: Mapping[str, str] | None = None,
              skipped: list[str] | None = None) -> int:
    """Send every request in ``path``; returns the number of spans sent.  With
    ``skipped``, a bad line is noted there and the rest still sent (stopping at it left
    the lines before it sent, and a second push sent them twice)."""
    env = os.environ if environ is None else environ
    protocol, url = resolve_target(endpoint, protocol, env)
    all_headers = parse_headers(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""),
                                "OTEL_EXPORTER_OTLP_HEADERS")
    for item in headers:
        all_headers.update(parse_headers(item, "--header"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no trace file")
    send = _grpc_sender(url, all_headers, timeout_s) if protocol == "grpc" else \
        _http_sender(url, all_headers, timeout_s)
    sent = 0
    for number, data in read_numbered(path, skipped):
        try:
            request = json_to_request(data)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            problem = TraceFileError(f"{path}:{number}: not an OTLP/JSON "
                                     f"ExportTraceServiceRequest ({exc})")
            if skipped is None:
                raise problem from None
            skipped.append(str(problem))
            continue
        send(request.SerializeToString(), request)
        sent += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    return sent


def _http_sender(url: str, headers: dict[str, str], timeout_s: float):  # noqa: ANN202
    def send(body: bytes, _request: object) -> None:
        req = urllib.request.Request(url, data=body, method="POST", headers={
            **headers, "content-type": "application/x-protobuf"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise ConnectionError(f"{url}: collector answered HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"{url}: {exc.reason}") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            # Not an HTTP answer at all: most often a gRPC port (4317) given to the
            # default http/protobuf protocol, which the SDK's own default (grpc) hides.
            raise ConnectionError(
                f"{url}: no OTLP/HTTP answer ({type(exc).__name__}); if this is a gRPC "
                "endpoint (port 4317), pass --protocol grpc or set "
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc") from None

    return send


def _grpc_sender(url: str, headers: dict[str, str], timeout_s: float):  # noqa: ANN202
    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    target = f"{parsed.hostname}:{parsed.port or 4317}"
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials())
               if parsed.scheme == "https" else grpc.insecure_channel(target))
    stub = TraceServiceStub(channel)
    metadata = tuple(headers.items())

    def send(_body: bytes, request: object) -> None:
        try:
            stub.Export(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            raise ConnectionError(f"{target}: gRPC {exc.code().name}: {exc.details()}") from None

    return send
