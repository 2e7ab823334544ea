"""The package's modules form no import circle (lazy imports inside functions count:
they still tie the modules together).  The runtime hands the hot path its state, the
journal library does not import its command, and the export path is handed the
pipeline's record type instead of importing the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "otel_flashinfer"


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports, anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    deps.add(module)
                deps.update(f"{module}.{alias.name}" for alias in node.names)
        found[".".join(parts)] = deps
    return {name: {d for d in deps if d in found and d != name}
            for name, deps in found.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert _cycles(_imports()) == []


def test_the_finder_sees_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_named_edges_stay_cut() -> None:
    graph = _imports()
    assert "otel_flashinfer.journal_cli" not in graph["otel_flashinfer.journal"]
    assert "otel_flashinfer.runtime" not in graph["otel_flashinfer.spans"]
    assert "otel_flashinfer.spans" not in graph["otel_flashinfer.native"]
    assert "otel_flashinfer.spans" not in graph["otel_flashinfer.stats.hooks"]
    assert "otel_flashinfer.pipeline" not in graph["otel_flashinfer.export"]
