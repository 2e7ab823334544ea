"""What one OTLP request costs the native path's sender, by spans a request.

A part, not a whole cost: the senders (``export.GrpcSender``, ``export.HttpSender``,
the JSON-lines file's write) called on this thread, back to back, with a ready request
of N level-1-like spans; the figure is this process's CPU a request (every thread:
gRPC's own threads included), against a local receiver that decodes every request in a
process of its own (``tests/otlp_receiver.py``, not counted).  It answers how much of
a span's export cost is the request's fixed part, which sets ``export.NATIVE_BATCH``.

    python benchmarks/probes/request_cost.py 512 1024 2048
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(spans: int) -> bytes:
    """An ExportTraceServiceRequest of ``spans`` spans shaped like level 1's."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id, span.span_id = os.urandom(16), os.urandom(8)
        span.parent_span_id = os.urandom(8)
        span.name, span.kind = "BatchDecodeWithPagedKVCacheWrapper.run", 1
        span.start_time_unix_nano = 1_796_687_803_108_013_783 + i
        span.end_time_unix_nano = span.start_time_unix_nano + 25_000
        for key, value in (("flashinfer.api", span.name), ("flashinfer.level", 1),
                           ("flashinfer.gpu.time_ns", 23_000)):
            attribute = span.attributes.add()
            attribute.key = key
            if isinstance(value, str):
                attribute.value.string_value = value
            else:
                attribute.value.int_value = value
    return request.SerializeToString()


def _cpu_per_request(send: Callable[[], bool], requests: int) -> tuple[float, float]:
    """(process CPU, wall) in microseconds a request, after ten to warm up."""
    for _ in range(10):
        assert send()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        assert send()
    return ((time.process_time() - cpu) / requests * 1e6,
            (time.perf_counter() - wall) / requests * 1e6)


def main() -> int:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    from otel_flashinfer import export

    sizes = [int(a) for a in sys.argv[1:]] or [512, 1024, 2048]
    http_port, grpc_port = _free_port(), _free_port()
    receiver = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "otlp_receiver.py"), "--http-port",
         str(http_port), "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        grpc = export.GrpcSender(GrpcExporter(endpoint=f"http://127.0.0.1:{grpc_port}",
                                              insecure=True))
        http = export.HttpSender(HttpExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces"))
        print("a part: the sender's CPU a request (this process, every thread), requests back "
              "to back; the receiver's CPU is its own process's")
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "out.bin", "ab") as out:
            def write(payload: bytes) -> bool:
                out.write(payload)
                out.flush()
                return True

            for spans in sizes:
                payload = _request(spans)
                for name, send in (
                        ("OTLP/gRPC", lambda p=payload, n=spans: grpc.send(p, n)),
                        ("OTLP/HTTP", lambda p=payload, n=spans: http.send(p, n)),
                        ("file write", lambda p=payload: write(p))):
                    cpu, wall = _cpu_per_request(send, max(50, 100_000 // spans))
                    print(f"{spans:5d} spans ({len(payload):7d} B)  {name:10s}  CPU {cpu:7.1f} us "
                          f"a request, {cpu / spans:5.3f} us a span; wall {wall:7.1f} us")
        grpc.close()
        http.close()
    finally:
        receiver.terminate()
        receiver.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
