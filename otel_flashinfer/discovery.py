"""Which FlashInfer functions and methods are API entry points, read from the source.

FlashInfer marks its public entry points with ``@flashinfer_api`` (and, for
experimental ones, ``@flashinfer_experimental_api``, which applies it inside).  At
``FLASHINFER_LOGLEVEL=0`` that decorator returns the function unchanged, leaving no
marker at runtime, so the only reliable list is the package's own source: we parse
it with ``ast`` (never importing it here) and cache the result per installed
package (path and version), in memory and on disk, because parsing the ~150
relevant files of 0.7.2 takes a couple of seconds and every worker process would
otherwise pay it at startup.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

_LOG = logging.getLogger(__name__)

#: Decorator names that make a function a FlashInfer API entry point.
API_DECORATORS = ("flashinfer_api", "flashinfer_experimental_api")
_MARKERS = tuple(name.encode() for name in API_DECORATORS)
_CACHE_FORMAT = 1
_memory: dict[tuple[str, str], tuple[EntryPoint, ...]] = {}


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """One decorated function (``qualname`` = ``name``) or method (``Class.name``).

    ``api_name`` is the span name: the function name, or ``ClassName.method`` with
    the innermost class, as FlashInfer's own log prints it for its wrapper classes.
    """

    module: str
    qualname: str
    api_name: str
    is_method: bool
    decorator: str = "flashinfer_api"
    lineno: int = 0

    @property
    def experimental(self) -> bool:
        return self.decorator == "flashinfer_experimental_api"


def _decorator_name(node: ast.expr) -> str | None:
    """``@x``, ``@x(...)``, ``@mod.x`` and ``@mod.x(...)`` all name ``x``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def scan_source(source: str | bytes, module: str, filename: str = "<source>"
                ) -> list[EntryPoint]:
    """Entry points defined in one module's source (pure; no import).

    Module-level functions (also inside ``if``/``try`` blocks) and methods of
    classes, nested classes included, count.  Functions defined inside other
    functions are created per call and cannot be reached from outside, so they are
    left out.
    """
    tree = ast.parse(source, filename=filename)
    found: list[EntryPoint] = []

    def visit(node: ast.AST, classes: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in child.decorator_list:
                    name = _decorator_name(dec)
                    if name in API_DECORATORS:
                        qualname = ".".join((*classes, child.name))
                        api = f"{classes[-1]}.{child.name}" if classes else child.name
                        found.append(EntryPoint(module, qualname, api, bool(classes),
                                                name, child.lineno))
                        break
            elif isinstance(child, ast.ClassDef):
                visit(child, (*classes, child.name))
            elif not isinstance(child, ast.Lambda):
                visit(child, classes)

    visit(tree, ())
    return found


def _module_name(root: Path, package: str, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _candidate_files(root: Path) -> Iterator[Path]:
    """Files that mention a decorator at all (a byte search is ~100x cheaper than a parse)."""
    for path in sorted(root.rglob("*.py")):
        if path.name == "api_logging.py" and path.parent == root:
            continue  # defines the decorators; decorates nothing
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if any(marker in data for marker in _MARKERS):
            yield path


def scan_package(root: str | Path, package: str = "flashinfer") -> tuple[EntryPoint, ...]:
    """Every entry point under a package directory, ordered by module then line."""
    root = Path(root)
    found: list[EntryPoint] = []
    for path in _candidate_files(root):
        module = _module_name(root, package, path)
        try:
            found.extend(scan_source(path.read_bytes(), module, str(path)))
        except (SyntaxError, ValueError) as exc:
            _LOG.debug("otel_flashinfer: cannot parse %s: %s", path, exc)
    return tuple(found)


def package_root(package: str = "flashinfer") -> Path | None:
    """The installed package's directory, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def package_version(distribution: str = "flashinfer-python") -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "otel_flashinfer"


def _cache_file(root: Path, version: str) -> Path:
    key = hashlib.sha256(f"{_CACHE_FORMAT}\0{root}\0{version}".encode()).hexdigest()[:24]
    return _cache_dir() / f"discovery-{key}.json"


def _cacheable(version: str) -> bool:
    """A release is immutable; a local or dev build (``+``, ``dev``, none) may be edited."""
    return bool(version) and "+" not in version and "dev" not in version


def _installed_release(root: Path, distribution: str = "flashinfer-python") -> bool:
    """Whether ``root`` is the distribution's own installed copy: not a source checkout
    found first on ``sys.path``, nor an editable install, which are edited in place
    under a release-like version (a new ``@flashinfer_api`` function would wait for the
    cache to be removed)."""
    try:
        dist = importlib.metadata.distribution(distribution)
        if Path(str(dist.locate_file(root.name))).resolve() != root:
            return False
        direct = dist.read_text("direct_url.json")
        if direct and json.loads(direct).get("dir_info", {}).get("editable"):
            return False
    except (importlib.metadata.PackageNotFoundError, OSError, ValueError, AttributeError):
        return False
    return True


def _read_cache(path: Path) -> tuple[EntryPoint, ...] | None:
    try:
        data = json.loads(path.read_text())
        return tuple(EntryPoint(**item) for item in data["entry_points"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, entries: Iterable[EntryPoint]) -> None:
    """Atomic write (temp file + rename): concurrent workers never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"entry_points": [dataclasses.asdict(e) for e in entries]})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        _LOG.debug("otel_flashinfer: cannot write discovery cache %s: %s", path, exc)


def discover(package: str = "flashinfer", *, root: str | Path | None = None,
             version: str | None = None, disk_cache: bool = True) -> tuple[EntryPoint, ...]:
    """All entry points of the installed FlashInfer (empty when it is not installed)."""
    root = Path(root).resolve() if root is not None else package_root(package)
    if root is None:
        return ()
    if version is None:
        version = package_version() if package == "flashinfer" else ""
    key = (str(root), version)
    cached = _memory.get(key)
    if cached is not None and _cacheable(version):
        return cached
    use_disk = disk_cache and _cacheable(version) and (
        package != "flashinfer" or _installed_release(root))
    path = _cache_file(root, version) if use_disk else None
    entries = _read_cache(path) if path is not None and path.exists() else None
    if entries is None:
        entries = scan_package(root, package)
        if path is not None:
            _write_cache(path, entries)
    _memory[key] = entries
    return entries
