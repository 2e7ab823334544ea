"""A local OTLP receiver for the benchmarks and outage tests: OTLP/HTTP (``/v1/traces``)
and OTLP/gRPC (``TraceService/Export``) in one process, decoding every request and
counting spans.

It runs as its own process so that its CPU is not counted as the traced program's,
and it really parses what it gets (a receiver that only counted bytes would accept a
broken encoder).  ``GET /count`` answers ``{"spans": n, "requests": m, "errors": e}``.

    python tests/otlp_receiver.py --http-port 4318 --grpc-port 4317
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import threading
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_lock = threading.Lock()
_counts = {"spans": 0, "requests": 0, "errors": 0}
#: ``--reject``: every request is taken but all its spans rejected (a partial success).
_reject = False


def count_request(payload: bytes) -> int:
    """Decode one ExportTraceServiceRequest and count its spans (raises if malformed)."""
    request = ExportTraceServiceRequest.FromString(payload)
    spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    with _lock:
        _counts["spans"] += spans
        _counts["requests"] += 1
    return spans


def answer(spans: int) -> bytes:
    """The response body: empty (all taken), or with ``--reject`` a partial success
    rejecting every span, as a collector does for spans over its limits."""
    if not _reject:
        return ExportTraceServiceResponse().SerializeToString()
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
    )

    return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
        rejected_spans=spans, error_message="rejected by policy")).SerializeToString()


def _error() -> None:
    with _lock:
        _counts["errors"] += 1


class _Http(BaseHTTPRequestHandler):
    # Persistent connections, as the OpenTelemetry Collector, Jaeger, Tempo and Phoenix
    # keep them: the handler's default HTTP/1.0 closed each one after its response, and
    # every request a sender made then paid a new connection (a third of its CPU).
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        with _lock:
            body = json.dumps(_counts).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        if "Content-Length" not in self.headers:  # OTLP clients always say it
            _error()
            self.send_error(411)  # and closes: the body was not read
            return
        length = int(self.headers["Content-Length"])
        payload = self.rfile.read(length)
        encoding = self.headers.get("Content-Encoding", "")
        try:
            if encoding == "gzip":
                payload = gzip.decompress(payload)
            elif encoding == "deflate":
                payload = zlib.decompress(payload)
            spans = count_request(payload)
        except Exception:  # noqa: BLE001 - a bad request is counted and refused
            _error()
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = answer(spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _grpc_server(port: int):  # noqa: ANN202
    import grpc

    def export(request: bytes, context: object) -> bytes:
        try:
            spans = count_request(request)
        except Exception:  # noqa: BLE001
            _error()
            raise
        return answer(spans)

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def _say_final_count(signum: int, frame: object) -> None:
    """On SIGTERM: print ``final {counts}`` and exit.  A count read over HTTP before a
    kill misses what arrives after it; this one is the last word on what was received."""
    with _lock:
        print("final", json.dumps(_counts), flush=True)
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--reject", action="store_true",
                        help="take every request but reject all its spans (partial success)")
    args = parser.parse_args()
    global _reject
    _reject = args.reject
    grpc_server = _grpc_server(args.grpc_port)
    http = ThreadingHTTPServer(("127.0.0.1", args.http_port), _Http)
    signal.signal(signal.SIGTERM, _say_final_count)
    print("ready", flush=True)
    try:
        http.serve_forever()
    finally:
        grpc_server.stop(0)


if __name__ == "__main__":
    main()
