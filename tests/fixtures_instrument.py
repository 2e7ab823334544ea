"""Helpers shared by the instrumentation tests: read spans back from a traces file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _value(value: dict[str, Any]) -> Any:
    (kind, raw), = value.items()
    return int(raw) if kind == "intValue" else raw


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Spans of an OTLP/JSON-lines file, each with its resource attributes under 'resource'."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        for rs in json.loads(line).get("resourceSpans", ()):
            resource = {a["key"]: _value(a["value"])
                        for a in rs.get("resource", {}).get("attributes", ())}
            for ss in rs.get("scopeSpans", ()):
                for span in ss.get("spans", ()):
                    out.append({**span, "resource": resource})
    return out
