"""What a receiver says in an OTLP response that it accepted: a partial success.

A receiver may take a request (HTTP 200, gRPC OK) and still reject some of its spans
(``ExportTraceServiceResponse.partial_success.rejected_spans``, with a message why).
The SDK's exporters ignore it, so those spans would be lost unseen: our senders read
each response here and count them (``spans_rejected`` in ``counters()``, apart from
``spans_dropped``: the receiver had them and said no)."""

from __future__ import annotations

from typing import Any

from . import health


def note(response: Any) -> None:
    """Count the spans ``response`` (an ``ExportTraceServiceResponse``) rejected."""
    partial = response.partial_success
    rejected = int(partial.rejected_spans)
    message = partial.error_message
    if rejected > 0:
        health.report("spans_rejected", f"the receiver accepted a request but rejected "
                      f"{rejected} of its spans: {message!r}", n=rejected)
    elif message:
        health.report("export_warnings", f"the receiver accepted a request with a warning: "
                      f"{message!r}")


def deserialize(body: bytes) -> Any:
    """gRPC's response deserializer for our raw stub: the response, noted."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    response = ExportTraceServiceResponse.FromString(body)
    note(response)
    return response


def note_body(body: bytes, content_type: str | None) -> None:
    """An OTLP/HTTP response body: protobuf (as our requests are) or nothing; a body of
    another kind (a proxy's page) is not the receiver's answer and says nothing here."""
    if not body or (content_type and "protobuf" not in content_type.lower()):
        return
    try:
        deserialize(body)
    except Exception:  # noqa: BLE001 - not a response we can read: nothing to count
        return


class PartialWatch:
    """An OTLP/HTTP transport whose successful responses are read for rejected spans."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        result = self.inner.request(method, url, **kwargs)
        response = getattr(result, "response", None)
        status = getattr(result, "status_code", None)
        if response is not None and status is not None and 200 <= status < 300:
            try:
                note_body(response.data, response.headers.get("Content-Type"))
            except Exception as exc:  # noqa: BLE001 - reading it must not fail the send
                health.report("export_errors", "could not read an OTLP/HTTP response", exc)
        return result

    def is_connection_error(self, exception: Exception | None) -> bool:
        return self.inner.is_connection_error(exception)

    def close(self) -> None:
        self.inner.close()
