"""``otel-flashinfer show``: the span tree of a local OTLP/JSON-lines file, in a terminal.

Pure rendering: the file's spans are grouped by trace, nested by parent id and
printed with their duration, GPU time and the attributes that matter when reading
a FlashInfer trace (shapes, dtypes, NaN flags, crash marks, blob manifests).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from .otlp_json import read_requests

_STATUS_ERROR = 2
_KEY_SUFFIXES = (".shape", ".dtype")
_FLAGS = ("flashinfer.nonfinite", "flashinfer.crash", "flashinfer.cuda_error",
          "flashinfer.blob.manifest", "flashinfer.blob.skipped", "flashinfer.cuda_graph.replay",
          "flashinfer.cuda_graph.capturing", "flashinfer.stats.dropped", "flashinfer.gpu.time")


def _value(any_value: dict[str, Any]) -> Any:
    """An OTLP/JSON AnyValue -> a Python value."""
    if "stringValue" in any_value:
        return any_value["stringValue"]
    if "boolValue" in any_value:
        return any_value["boolValue"]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "doubleValue" in any_value:
        return float(any_value["doubleValue"])
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", [])]
    return None


def attributes_of(item: dict[str, Any]) -> dict[str, Any]:
    return {kv["key"]: _value(kv.get("value", {})) for kv in item.get("attributes", [])}


def collect_spans(requests: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten requests into span dicts with ``attrs``, ``service`` and ``scope``."""
    spans = []
    for request in requests:
        for resource_spans in request.get("resourceSpans", []):
            resource = attributes_of(resource_spans.get("resource", {}))
            service = resource.get("service.name", "")
            for scope_spans in resource_spans.get("scopeSpans", []):
                scope = scope_spans.get("scope", {}).get("name", "")
                for span in scope_spans.get("spans", []):
                    span = dict(span)
                    span["attrs"] = attributes_of(span)
                    span["service"] = service
                    span["pid"] = resource.get("process.pid")
                    span["scope"] = scope
                    spans.append(span)
    return spans


def _duration(span: dict[str, Any]) -> str:
    nanos = int(span.get("endTimeUnixNano", 0)) - int(span.get("startTimeUnixNano", 0))
    return _human_ns(nanos)


def _human_ns(nanos: int) -> str:
    if nanos >= 1_000_000_000:
        return f"{nanos / 1e9:.2f}s"
    if nanos >= 1_000_000:
        return f"{nanos / 1e6:.2f}ms"
    return f"{nanos / 1e3:.1f}us"


def _details(span: dict[str, Any]) -> str:
    attrs = span["attrs"]
    parts = []
    for key, value in attrs.items():
        if key.startswith(("flashinfer.arg.", "flashinfer.result.")) and key.endswith(
            _KEY_SUFFIXES
        ):
            short = key.split(".", 1)[1]
            parts.append(f"{short}={value}")
    gpu = attrs.get("flashinfer.gpu.time_ns")
    if isinstance(gpu, int) or (isinstance(gpu, float) and math.isfinite(gpu)):
        parts.insert(0, f"gpu={_human_ns(int(gpu))}")
    elif gpu is not None:
        parts.insert(0, f"gpu={gpu}")
    for key in _FLAGS:
        if key in attrs and key != "flashinfer.gpu.time":
            parts.append(f"{key.split('.', 1)[1]}={attrs[key]}")
    events = [e for e in span.get("events", []) if e.get("name") == "flashinfer.tensor_stats"]
    if events:
        parts.append(f"stats={len(events)}")
    return "  ".join(parts[:12])


#: Control characters (C0, DEL, C1): a trace file's text must not drive the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: Any) -> str:
    """``text`` with control characters shown escaped (``\\x1b``), never sent raw."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text


def _start(span: dict[str, Any]) -> int:
    return int(span.get("startTimeUnixNano", 0))


def tree_rows(members: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, bool]]:
    """(span, prefix, last) in print order: children under their parent by start time,
    each span once.  A file is untrusted: a span whose parent is missing or itself is a
    root, spans in a parent cycle are shown from the earliest, a span id used twice
    keeps its children under the first, and deep trees are walked without recursion."""
    by_id: dict[str, dict[str, Any]] = {}
    for span in members:
        sid = span.get("spanId")
        if isinstance(sid, str) and sid:
            by_id.setdefault(sid, span)
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    roots = []
    for span in members:
        parent = span.get("parentSpanId") or None
        if parent in by_id and by_id[parent] is not span:
            children[parent].append(span)
        else:
            roots.append(span)
    for group in children.values():
        group.sort(key=_start)
    rows: list[tuple[dict[str, Any], str, bool]] = []
    seen: set[int] = set()

    def walk(root: dict[str, Any], last: bool) -> None:
        stack = [(root, "", last)]
        while stack:
            span, prefix, last = stack.pop()
            if id(span) in seen:
                continue
            seen.add(id(span))
            rows.append((span, prefix, last))
            sid = span.get("spanId")
            kids = [k for k in children.get(sid, ()) if id(k) not in seen] \
                if isinstance(sid, str) and by_id.get(sid) is span else []
            inner = prefix + ("   " if last else "│  ")
            stack.extend((kid, inner, i == len(kids) - 1)
                         for i, kid in reversed(list(enumerate(kids))))

    roots.sort(key=_start)
    for i, root in enumerate(roots):
        walk(root, i == len(roots) - 1)
    for span in sorted(members, key=_start):  # parent cycles: no root reaches them
        if id(span) not in seen:
            walk(span, True)
    return rows


def render(spans: list[dict[str, Any]], color: bool = False, trace_id: str | None = None) -> str:
    """The span trees of ``spans``, one block per trace, oldest first."""
    style = _Style(color)
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        if trace_id is None or span.get("traceId") == trace_id.lower():
            by_trace[span.get("traceId", "")].append(span)
    lines: list[str] = []
    for tid, members in sorted(by_trace.items(),
                               key=lambda kv: min(int(s.get("startTimeUnixNano", 0))
                                                  for s in kv[1])):
        lines.append(style(f"trace {printable(tid)}  ({len(members)} spans)", "1"))
        for span, prefix, last in tree_rows(members):
            branch = "└─ " if last else "├─ "
            failed = span.get("status", {}).get("code") == _STATUS_ERROR
            name = style(printable(span.get("name", "?")), "31;1" if failed else "36")
            mark = style(" ERROR", "31") if failed else ""
            detail = printable(_details(span))
            lines.append(f"{prefix}{branch}{name}  {_duration(span)}{mark}"
                         + (f"  {detail}" if detail else ""))
        lines.append("")
    if not lines:
        return "no spans\n"
    return "\n".join(lines) + "\n"


def render_file(path: str, color: str = "auto", trace_id: str | None = None,
                skipped: list[str] | None = None) -> str:
    """The file's span trees; with ``skipped``, bad lines are noted there and the
    rest is shown (otherwise the first one is an error)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no trace file (run something instrumented first, "
                                "or give the file's path)")
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    return render(collect_spans(read_requests(path, skipped)), color=use_color,
                  trace_id=trace_id)
