"""The OTLP/JSON encoding, one ExportTraceServiceRequest per line, and the exporter
that writes it to a local file.

A GPU box with no collector still keeps its traces: the file is the same data a
collector would receive (ids as lowercase hex, enums as integers, as the OTLP/JSON
spec asks), so ``otel-flashinfer push`` can send it on later, byte for byte.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from . import forking, health

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class TraceFileError(ValueError):
    """A trace file line that is not OTLP/JSON; names the file and the line."""


def _map_ids(spans: list[dict[str, Any]], convert: Any) -> None:
    for span in spans:
        for key in _ID_FIELDS:
            if span.get(key):
                span[key] = convert(span[key])
        for link in span.get("links", ()):
            for key in _ID_FIELDS:
                if link.get(key):
                    link[key] = convert(link[key])


def _walk_spans(request: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    for resource_spans in request.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            yield scope_spans.setdefault("spans", [])


def _b64_to_hex(text: str) -> str:
    return base64.b64decode(text).hex()


def _hex_to_b64(text: str) -> str:
    return base64.b64encode(bytes.fromhex(text)).decode("ascii")


def request_to_json(request: ExportTraceServiceRequest) -> str:
    """One protobuf request -> one OTLP/JSON line (no trailing newline)."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    for spans in _walk_spans(data):
        _map_ids(spans, _b64_to_hex)
    return json.dumps(data, separators=(",", ":"))


def json_to_request(line: str | dict[str, Any]) -> ExportTraceServiceRequest:
    """One OTLP/JSON line (or its parsed dict) -> the protobuf request."""
    data = json.loads(line) if isinstance(line, str) else json.loads(json.dumps(line))
    for spans in _walk_spans(data):
        _map_ids(spans, _hex_to_b64)
    return json_format.ParseDict(data, ExportTraceServiceRequest())


def _encodes(span: ReadableSpan) -> bool:
    """Whether ``span`` encodes on its own (a batch that failed is sorted out by it)."""
    try:
        encode_spans([span])
    except Exception:  # noqa: BLE001
        return False
    return True


def spans_to_json(spans: Sequence[ReadableSpan]) -> str:
    return request_to_json(encode_spans(spans))


def read_requests(path: str, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Parsed lines of a trace file; a bad line is an error naming file and line (with
    ``skipped``: noted there, and the rest read)."""
    for _, data in read_numbered(path, skipped):
        yield data


def read_numbered(path: str, skipped: list[str] | None = None
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, parsed line) of a trace file, each line's shape checked as far as
    ``show`` and ``push`` read it: the file is untrusted, and a bad line is an error
    naming file and line, not a traceback from deep inside a reader.  With ``skipped``,
    a bad line (a killed writer's truncated last one) is noted there and the good ones
    go on: what was recorded is not lost to one bad line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                data = _line(path, number, raw)
            except TraceFileError as exc:
                if skipped is None:
                    raise
                skipped.append(str(exc))
                continue
            if data is not None:
                yield number, data


def _line(path: str, number: int, raw: bytes) -> dict[str, Any] | None:
    """One line parsed and checked (None: blank); TraceFileError naming it."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TraceFileError(f"{path}:{number}: not UTF-8 text") from None
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceFileError(f"{path}:{number}: not JSON ({exc.msg})") from None
    except ValueError as exc:  # a number past Python's digit limit, say
        raise TraceFileError(f"{path}:{number}: not JSON ({exc})") from None
    except RecursionError:
        raise TraceFileError(f"{path}:{number}: not JSON (nested too deep)") from None
    problem = _request_problem(data)
    if problem:
        raise TraceFileError(f"{path}:{number}: not an OTLP/JSON "
                             f"ExportTraceServiceRequest ({problem})")
    return data


_HEX_LEN = {"traceId": 32, "spanId": 16, "parentSpanId": 16}
_TIMES = ("startTimeUnixNano", "endTimeUnixNano", "timeUnixNano")


def _list_of_dicts(item: dict[str, Any], key: str) -> list[dict[str, Any]] | str:
    value = item.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        return f"{key} is not a list of objects"
    return value


def _request_problem(data: Any) -> str | None:
    """What is wrong with one line's request, or None (pure)."""
    if not isinstance(data, dict):
        return "not an object"
    resources = _list_of_dicts(data, "resourceSpans")
    if isinstance(resources, str):
        return resources
    for rs in resources:
        problem = _holder_problem(rs, "resource")
        if problem:
            return problem
        scopes = _list_of_dicts(rs, "scopeSpans")
        if isinstance(scopes, str):
            return scopes
        for ss in scopes:
            problem = _holder_problem(ss, "scope")
            if problem:
                return problem
            spans = _list_of_dicts(ss, "spans")
            if isinstance(spans, str):
                return spans
            for span in spans:
                problem = _span_problem(span)
                if problem:
                    return problem
    return None


def _span_problem(span: dict[str, Any]) -> str | None:
    for key, n in _HEX_LEN.items():
        v = span.get(key)
        if v is None or (key == "parentSpanId" and v == ""):
            continue
        if not (isinstance(v, str) and _is_hex(v, n)):
            return f"span {key} {v!r} is not {n} hex digits"
    events = span.get("events")
    if events is not None and not isinstance(events, list):
        return "span events is not a list of objects"
    events = [e for e in events or () if isinstance(e, dict)]
    for obj in (span, *events):
        for key in _TIMES:
            v = obj.get(key)
            if v is not None and not _is_time(v):
                return f"{key} {v!r} is not a time in nanoseconds"
    if not isinstance(span.get("name", ""), str):
        return "a span name is not text"
    for key in ("attributes", "events", "links"):
        if isinstance(_list_of_dicts(span, key), str):
            return f"span {key} is not a list of objects"
    if not isinstance(span.get("status", {}), dict):
        return "span status is not an object"
    for obj in (span, *events):
        problem = _attributes_problem(obj)
        if problem:
            return problem
    return None


def _holder_problem(item: dict[str, Any], key: str) -> str | None:
    """A resource or scope: an object whose attributes are well formed."""
    holder = item.get(key, {})
    if not isinstance(holder, dict):
        return f"{key} is not an object"
    if key == "scope" and not isinstance(holder.get("name", ""), str):
        return "scope name is not text"
    return _attributes_problem(holder)


def _attributes_problem(item: dict[str, Any]) -> str | None:
    attributes = _list_of_dicts(item, "attributes")
    if isinstance(attributes, str):
        return attributes
    for kv in attributes:
        if not isinstance(kv.get("key"), str):
            return "an attribute has no key"
        problem = _value_problem(kv.get("value", {}))
        if problem:
            return f"attribute {kv['key'][:80]!r}: {problem}"
    return None


_INT64 = (-(2**63), 2**63 - 1)


def _value_problem(value: Any, depth: int = 0) -> str | None:
    """What is wrong with an OTLP/JSON AnyValue as ``show`` reads it, or None."""
    if not isinstance(value, dict):
        return "a value is not an object"
    if depth > 32:
        return "a value nested too deep"
    if "stringValue" in value and not isinstance(value["stringValue"], str):
        return "stringValue is not text"
    if "boolValue" in value and not isinstance(value["boolValue"], bool):
        return "boolValue is not true or false"
    if "intValue" in value:
        v = value["intValue"]
        try:
            ok = not isinstance(v, (bool, float)) and _INT64[0] <= int(v) <= _INT64[1]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return f"intValue {str(v)[:40]!r} is not a 64-bit integer"
    if "doubleValue" in value and not _is_double(value["doubleValue"]):
        return f"doubleValue {str(value['doubleValue'])[:40]!r} is not a number"
    if "arrayValue" in value:
        array = value["arrayValue"]
        items = _list_of_dicts(array, "values") if isinstance(array, dict) else "arrayValue"
        if isinstance(items, str):
            return "arrayValue is not an object with a list of values"
        for item in items:
            problem = _value_problem(item, depth + 1)
            if problem:
                return problem
    return None


def _is_double(v: Any) -> bool:
    """A number, or a string proto3 JSON allows for one ("NaN", "Infinity", "1.5")."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    if not isinstance(v, str):
        return False
    try:
        float(v)
    except ValueError:
        return False
    return True


def _is_time(v: Any) -> bool:
    """A time as OTLP/JSON writes it: a decimal string (or an int) within uint64."""
    if isinstance(v, str):
        # ASCII digits only ("²" is a digit to str.isdigit, not to int), at most 20
        return v.isascii() and v.isdigit() and len(v) <= 20 and int(v) < 2**64
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


def _is_hex(v: str, n: int) -> bool:
    return len(v) == n and all(c in "0123456789abcdefABCDEF" for c in v)


#: How often an open trace file is checked against its path (moved or deleted: the
#: next line goes to a new file there).
_REOPEN_CHECK_S = 1.0
#: Buffers one ``writev`` may take (IOV_MAX; Linux: 1024).
try:
    _IOV_MAX = max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
except (ValueError, OSError):  # pragma: no cover - no such name here
    _IOV_MAX = 16


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class JsonLinesSpanExporter(SpanExporter):
    """Appends each batch as one OTLP/JSON line; safe across threads and processes
    (one ``write`` of a whole line on an O_APPEND file).

    The file stays open between lines.  Each system call hands the GIL over and takes
    it back, and under a busy engine thread every take waits out CPython's 5 ms switch
    interval: the open, close and directory check per line cost the sender 30 ms of
    wall a line and the engine a GIL switch each.  The path is checked once a second: a
    file moved away (rotated) gets the lines of that second, then a new file starts at
    the path; a file deleted loses them."""

    #: It counts the spans it fails to send itself: ``export_watch`` leaves it be.
    counts_drops = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        self._fd = -1
        self._checked = 0.0
        self._release: Any = None  # closes the file if the exporter is dropped unshut
        forking.redo_in_child(self, "_after_fork")

    def _after_fork(self) -> None:
        """In a forked child: a lock the fork may have copied held, and a descriptor the
        child may close or reuse; both made again on the next line."""
        self._lock = threading.Lock()
        self._close()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            health.report("spans_dropped", f"spans for {self.path} after it was shut down",
                          n=len(spans))
            return SpanExportResult.FAILURE
        try:
            line = (spans_to_json(spans) + "\n").encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - an exporter must not raise
            health.report("file_export_errors", f"could not encode spans for {self.path}", exc)
            # One span the encoder refuses (a time out of range) must not take the
            # batch with it: the others go out, the refused ones are counted.
            good = [s for s in spans if _encodes(s)]
            if len(good) < len(spans):
                health.report("spans_dropped", "spans the encoder refused were dropped",
                              n=len(spans) - len(good))
            if not good:
                return SpanExportResult.FAILURE
            try:
                line = (spans_to_json(good) + "\n").encode("utf-8")
            except Exception:  # noqa: BLE001 - reported above
                health.report("spans_dropped", "spans the encoder refused were dropped",
                              n=len(good))
                return SpanExportResult.FAILURE
            spans = good
        if self.write_line(line):
            return SpanExportResult.SUCCESS
        # The SDK's processors do not count what an exporter fails to send: we do (the
        # native sender counts its own, through write_lines).
        health.report("spans_dropped", f"could not write spans to {self.path}", n=len(spans))
        return SpanExportResult.FAILURE

    def write_line(self, line: bytes) -> bool:
        """Append one encoded line (ending in a newline) in one ``write``; the native
        encoder's lines come here too."""
        return self.write_lines((line,))

    def write_lines(self, lines: Sequence[bytes]) -> bool:
        """Append whole lines in one system call (``writev``): a sender behind on a
        busy engine takes all it has in one GIL hand-over, not one per line."""
        if self._closed:
            return False
        try:
            with self._lock:
                if self._closed:
                    return False
                fd = self._file()
                for lo in range(0, len(lines), _IOV_MAX):
                    chunk = lines[lo:lo + _IOV_MAX]
                    done = os.writev(fd, chunk) if len(chunk) > 1 else os.write(fd, chunk[0])
                    if done < sum(map(len, chunk)):  # a short write (full disk, signal)
                        view = memoryview(b"".join(chunk))[done:]  # must not split a line
                        while view:
                            view = view[os.write(fd, view):]
            return True
        except Exception as exc:  # noqa: BLE001 - an exporter must not raise
            with self._lock:
                self._close()  # opened again for the next line
            health.report("file_export_errors", f"could not write {self.path}", exc)
            return False

    def _file(self) -> int:
        """The open file, opened again (its directory made) when there is none yet, or
        when the path no longer names it: moved away or deleted since."""
        now = time.monotonic()
        if self._fd >= 0 and now - self._checked >= _REOPEN_CHECK_S:
            self._checked = now
            try:
                here, ours = os.stat(self.path), os.fstat(self._fd)
                if (here.st_dev, here.st_ino) != (ours.st_dev, ours.st_ino):
                    self._close()
            except OSError:
                self._close()
        if self._fd < 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._release = weakref.finalize(self, _close_quietly, self._fd)
            # Not at exit: finalizers run from atexit too, and could close the file
            # before the exit flush (runtime._at_exit) writes the last lines.
            self._release.atexit = False
            self._checked = now
        return self._fd

    def _close(self) -> None:
        release, fd, self._release, self._fd = self._release, self._fd, None, -1
        if release is not None:
            release()
        elif fd >= 0:  # opened, its finalizer not made yet (a fork in between)
            _close_quietly(fd)

    def shutdown(self) -> None:
        self._closed = True
        with self._lock:
            self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
