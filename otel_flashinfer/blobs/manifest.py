"""The per-call manifest: building it, and reading it back strictly.

Schema (``schema`` = 1), one JSON object per call::

    {"schema": 1, "api": "BatchDecodeWithPagedKVCacheWrapper.run",
     "module": "flashinfer.decode", "qualname": "BatchDecodeWithPagedKVCacheWrapper.run",
     "pid": 1234, "process": "1234-18a2b..." (the index folder of the process; absent
     in manifests written before the index existed), "instance_id": "1234:1403..." | null,
     "trace_id": "<32 hex>", "span_id": "<16 hex>", "parent_span_id": "<16 hex>" | null,
     "start_ns": 1700000000000000000, "seq": 7,
     "status": "ok" | "error" | "pending" | "crashed",
     "error": {"type": "ValueError", "message": "..."} | null,
     "format": "safetensors" | "torch",
     "args": [{"name": "q", "kind": "positional_or_keyword", "value": VALUE}, ...],
     "result": VALUE | null,            # null also when status is not "ok"
     "skipped": null | "<why outputs were not kept>"}

A VALUE is plain JSON for None, bool, int, str and finite floats, else a tagged
object ``{"t": TAG, ...}``:

    float   {"v": "nan" | "inf" | "-inf"}
    tuple / list   {"items": [VALUE, ...]}
    dict    {"items": [[KEY, VALUE], ...]}          KEY: str or int
    enum    {"cls": "module:Qual.Name", "name": "MEMBER"}
    dtype   {"v": "float16"}            device {"v": "cuda:0"}
    tensor  {"dtype", "shape", "stride", "storage_offset", "device", "hash", "key",
             "nbytes", "format", "source_storage_offset"}
             the object holds a flat span; the tensor is
             ``flat.as_strided(shape, stride, storage_offset)``.
    paged_kv {"dtype", "shape" (the whole cache), "device", "format",
              "page_ids": [int, ...]       (sorted, unique: pages the call referenced),
              "pages": [{"hash", "key", "nbytes"}, ...]  (one object per page, same order)}
             replay builds a compact cache of ``len(page_ids)`` pages and remaps indices.
    unrepresentable {"type": "<qualified type name>"}   (replay refuses such a call)
"""

from __future__ import annotations

import enum
import json
import math
import os
import threading
from typing import Any

from . import layout
from .encode import DTYPES, FORMATS

SCHEMA = 1
STATUSES = ("ok", "error", "pending", "crashed")
KINDS = ("positional_only", "positional_or_keyword", "var_positional", "keyword_only",
         "var_keyword")
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 32
#: No stored object is larger (one tensor or page); a claim past it is refused unread.
MAX_OBJECT_BYTES = 1 << 40


class ManifestError(ValueError):
    """A manifest that is refused; the message names the file and the problem."""


# -- building --------------------------------------------------------------------

#: Containers of containers one argument may hold in all (a list of 100,000 ints, or of
#: 100,000 pairs, is one): the depth bound alone let a value that branches (a list
#: holding itself twice) cost 2^depth calls on the caller's thread.
MAX_NODES = 1024
_CONTAINERS = (list, tuple, dict)


def plain_value(value: Any, tensor_ref, depth: int = 0, _left: list[int] | None = None,
                _path: set[int] | None = None) -> Any:
    """JSON form of an argument; ``tensor_ref(tensor)`` returns a tensor's entry.  A
    container inside itself, or past ``MAX_NODES`` containers, is recorded as
    unrepresentable (its replay then says so) rather than walked."""
    import torch

    if _left is None:
        _left, _path = [MAX_NODES], set()
    if depth > MAX_DEPTH:
        return {"t": "unrepresentable", "type": "nesting too deep"}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        cls = type(value)
        return {"t": "enum", "cls": f"{cls.__module__}:{cls.__qualname__}", "name": value.name}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"t": "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.Tensor):
        return tensor_ref(value)
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "v": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"t": "device", "v": str(value)}
    container = isinstance(value, (tuple, list)) or (isinstance(value, dict) and all(
        isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)) for k in value))
    if container:
        assert _path is not None
        if id(value) in _path:
            return {"t": "unrepresentable", "type": "a container inside itself"}
        items = value.values() if isinstance(value, dict) else value
        if any(isinstance(v, _CONTAINERS) for v in items):  # it branches: counted
            _left[0] -= 1
            if _left[0] < 0:
                return {"t": "unrepresentable",
                        "type": f"more than {MAX_NODES} containers of containers"}
        _path.add(id(value))
        try:
            if isinstance(value, dict):
                return {"t": "dict", "items": [
                    [k, plain_value(v, tensor_ref, depth + 1, _left, _path)]
                    for k, v in value.items()]}
            tag = "tuple" if isinstance(value, tuple) else "list"
            return {"t": tag, "items": [plain_value(v, tensor_ref, depth + 1, _left, _path)
                                        for v in value]}
        finally:
            _path.discard(id(value))
    cls = type(value)
    return {"t": "unrepresentable", "type": f"{cls.__module__}.{cls.__qualname__}"}


#: One encoder for every manifest: ``json.dumps`` with arguments makes a new one a call.
_canonical = json.JSONEncoder(sort_keys=True, allow_nan=False, separators=(",", ":")).encode
_quote = json.encoder.encode_basestring_ascii  # json.dumps' own quoting of a str


class StoredPage(dict):
    """A page's ``{"hash", "key", "nbytes"}`` with its canonical JSON made once: the
    page memo hands the same page to call after call."""

    __slots__ = ("json",)

    def __init__(self, digest: str, key: str, nbytes: int) -> None:
        super().__init__(hash=digest, key=key, nbytes=nbytes)
        # _canonical's bytes (keys in order), formatted: a JSONEncoder call a new page
        # cost the writer 20 us on the CPU box
        self.json = f'{{"hash":{_quote(digest)},"key":{_quote(key)},"nbytes":{int(nbytes)}}}'


class EncodedPages(list):
    """A paged cache's page list whose JSON is joined from its pages' own (``dumps``
    puts it in place): encoding 512 page entries again for every call's manifest cost
    the level-10 writer more than everything else it does for an unchanged cache."""

    __slots__ = ("json",)

    def __init__(self, pages: list[StoredPage]) -> None:
        super().__init__(pages)
        self.json = "[" + ",".join([page.json for page in pages]) + "]"


class EncodedInts(list):
    """A list of ints with its JSON made once (a paged cache's page ids: the same list
    call after call, kept by the writer with the cache's last call)."""

    __slots__ = ("json",)

    def __init__(self, items: list[int]) -> None:
        super().__init__(items)
        self.json = "[" + ",".join(map(str, items)) + "]"


#: Stands in for an EncodedPages while the rest is encoded; random per process, so a
#: string in a call's arguments cannot be taken for one.
_TOKEN = f"@otel-flashinfer-pages-{os.urandom(8).hex()}-"
#: ``found``: the JSON of the lists ``dumps`` is encoding on this thread, or None.
_encoding = threading.local()


class PagedEntry(dict):
    """A paged cache's manifest entry.  While ``dumps`` encodes on this thread, its
    pre-encoded lists show as tokens that ``dumps`` puts their JSON in place of (the
    JSON encoder takes a dict subclass's ``items()``): nothing is walked to find them,
    and nothing is changed in place, so another thread (a writer, a crash path, a
    signal's handler) encoding or reading the same entry meanwhile sees it whole."""

    __slots__ = ()

    def items(self) -> Any:
        found = getattr(_encoding, "found", None)
        if found is None:
            return super().items()
        out = []
        for key, value in super().items():
            if type(value) is EncodedPages or type(value) is EncodedInts:
                found.append(value.json)
                value = f"{_TOKEN}{len(found) - 1}"
            out.append((key, value))
        return out


def dumps(manifest: dict) -> bytes:
    """Canonical bytes of a manifest (sorted keys, no spaces, no NaN).  A PagedEntry's
    encoded lists are joined from their own JSON; anywhere else they are encoded as the
    lists they are (the same bytes, slower)."""
    outer = getattr(_encoding, "found", None)  # a dumps this one interrupted (a handler)
    found: list[str] = []
    _encoding.found = found
    try:
        text = _canonical(manifest)
    finally:
        _encoding.found = outer
    return _put_encoded(text, found).encode()


def _put_encoded(text: str, found: list[str]) -> str:
    """``text`` with each token's string replaced by its JSON, in one pass: tokens are
    numbered in the order the encoder wrote them (one that is missing, from an
    ``items()`` call outside the encoding, is skipped)."""
    pieces, pos = [], 0
    for i, raw in enumerate(found):
        quoted = f'"{_TOKEN}{i}"'
        at = text.find(quoted, pos)
        if at >= 0:
            pieces += (text[pos:at], raw)
            pos = at + len(quoted)
    pieces.append(text[pos:])
    return "".join(pieces)


# -- strict reading ----------------------------------------------------------------

def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {problem}")


def _int(where: str, v: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _fail(where, f"{what} must be an integer >= {lo}, got {str(v)[:40]}")
    if hi is not None and v > hi:
        raise _fail(where, f"{what} must be at most {hi}, got {str(v)[:40]}")
    return v


#: Sizes and strides past this are no tensor's (torch's own limit is 2^63 - 1).
MAX_DIM = 1 << 62


def _ints(where: str, v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or len(v) > 64:
        raise _fail(where, f"{what} must be a list of at most 64 integers")
    out = [_int(where, x, what) for x in v]
    if any(x > MAX_DIM for x in out):
        raise _fail(where, f"{what} has a value past 2^62: {v!r}")
    return out


def _hex(where: str, v: Any, n: int, what: str, nullable: bool = False) -> str | None:
    if v is None and nullable:
        return None
    if not isinstance(v, str) or len(v) != n or any(c not in "0123456789abcdef" for c in v):
        raise _fail(where, f"{what} must be {n} lowercase hex digits, got {v!r}")
    return v


def _check_object(where: str, entry: dict, fmt: str) -> None:
    h = _hex(where, entry.get("hash"), 64, "hash")
    try:
        layout.check_object_key(entry.get("key"), h, fmt)
    except ValueError as exc:
        raise _fail(where, str(exc)) from None
    _int(where, entry.get("nbytes"), "nbytes", hi=MAX_OBJECT_BYTES)


def _check_value(where: str, v: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _fail(where, "value nested too deep")
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _fail(where, "non-finite float outside a tagged value")
        return
    if not isinstance(v, dict) or not isinstance(v.get("t"), str):
        raise _fail(where, f"value is not JSON scalar or tagged object: {str(v)[:80]}")
    tag = v["t"]
    if tag == "float":
        if v.get("v") not in ("nan", "inf", "-inf"):
            raise _fail(where, f"bad float value {v.get('v')!r}")
    elif tag in ("tuple", "list"):
        if not isinstance(v.get("items"), list):
            raise _fail(where, f"{tag} without items list")
        for item in v["items"]:
            _check_value(where, item, depth + 1)
    elif tag == "dict":
        items = v.get("items")
        if not isinstance(items, list):
            raise _fail(where, "dict without items list")
        for pair in items:
            if (not isinstance(pair, list) or len(pair) != 2
                    or not isinstance(pair[0], (str, int)) or isinstance(pair[0], bool)):
                raise _fail(where, "dict item must be [str|int key, value]")
            _check_value(where, pair[1], depth + 1)
    elif tag == "enum":
        cls, name = v.get("cls"), v.get("name")
        if not isinstance(cls, str) or cls.count(":") != 1 or not isinstance(name, str):
            raise _fail(where, "enum needs cls 'module:Qual' and name")
        if not all(part.isidentifier() for part in cls.replace(":", ".").split(".")):
            raise _fail(where, f"enum class {cls!r} is not a dotted name")
        if not name.isidentifier():
            raise _fail(where, f"enum member {name!r} is not an identifier")
    elif tag == "dtype":
        if not _known_dtype(v.get("v")):
            raise _fail(where, f"unknown dtype {v.get('v')!r}")
    elif tag == "device":
        if not isinstance(v.get("v"), str) or len(v["v"]) > 32:
            raise _fail(where, "device must be a short string")
    elif tag == "tensor":
        _check_tensor(where, v)
    elif tag == "paged_kv":
        _check_paged(where, v)
    elif tag == "unrepresentable":
        if not isinstance(v.get("type"), str):
            raise _fail(where, "unrepresentable without type")
    else:
        raise _fail(where, f"unknown value tag {tag!r}")


def _known_dtype(name: Any) -> bool:
    """A dtype name we know: text first (a list or object is not a key of the table)."""
    return isinstance(name, str) and name in DTYPES


def _check_common(where: str, v: dict) -> tuple[str, list[int]]:
    if not _known_dtype(v.get("dtype")):
        raise _fail(where, f"unknown dtype {v.get('dtype')!r}")
    if v.get("format") not in FORMATS:
        raise _fail(where, f"unknown format {v.get('format')!r}")
    if not isinstance(v.get("device"), str) or len(v["device"]) > 32:
        raise _fail(where, "device must be a short string")
    return v["format"], _ints(where, v.get("shape"), "shape")


def _check_tensor(where: str, v: dict) -> None:
    fmt, shape = _check_common(where, v)
    stride = _ints(where, v.get("stride"), "stride")
    if len(stride) != len(shape):
        raise _fail(where, f"shape {shape} and stride {stride} differ in rank")
    _int(where, v.get("storage_offset"), "storage_offset")
    _check_object(where, v, fmt)


def _check_paged(where: str, v: dict) -> None:
    fmt, shape = _check_common(where, v)
    if not shape:
        raise _fail(where, "paged_kv shape must have a page dimension")
    ids = v.get("page_ids")
    pages = v.get("pages")
    if not isinstance(ids, list) or not isinstance(pages, list) or len(ids) != len(pages):
        raise _fail(where, "paged_kv needs page_ids and pages of equal length")
    prev = -1
    for pid in ids:
        _int(where, pid, "page id")
        if pid <= prev or pid >= shape[0]:
            raise _fail(where, f"page ids must be sorted, unique and < {shape[0]}")
        prev = pid
    for page in pages:
        if not isinstance(page, dict):
            raise _fail(where, "page entry must be an object")
        _check_object(where, page, fmt)


def parse(data: bytes, where: str) -> dict:
    """A manifest from untrusted bytes; ManifestError naming ``where`` on any problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(where, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(where, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise _fail(where, "malformed JSON: nested too deep") from None
    if not isinstance(m, dict):
        raise _fail(where, "manifest is not a JSON object")
    if m.get("schema") != SCHEMA:
        raise _fail(where, f"unsupported schema {m.get('schema')!r} (expected {SCHEMA})")
    for field in ("api", "module", "qualname"):
        if not isinstance(m.get(field), str) or not m[field]:
            raise _fail(where, f"{field} must be a non-empty string")
    if not all(p.isidentifier() for p in m["module"].split(".")):
        raise _fail(where, f"module {m['module']!r} is not a dotted name")
    if not all(p.isidentifier() or p == "<locals>" for p in m["qualname"].split(".")):
        raise _fail(where, f"qualname {m['qualname']!r} is not a dotted name")
    _int(where, m.get("pid"), "pid")
    if m.get("instance_id") is not None and not isinstance(m["instance_id"], str):
        raise _fail(where, "instance_id must be a string or null")
    if "process" in m:
        try:
            if layout.process_pid(m["process"]) != m["pid"]:
                raise ValueError(f"process {m['process']!r} is not pid {m['pid']}")
        except ValueError as exc:
            raise _fail(where, str(exc)) from None
    _hex(where, m.get("trace_id"), 32, "trace_id")
    _hex(where, m.get("span_id"), 16, "span_id")
    _hex(where, m.get("parent_span_id"), 16, "parent_span_id", nullable=True)
    _int(where, m.get("start_ns"), "start_ns")
    _int(where, m.get("seq"), "seq")
    if m.get("status") not in STATUSES:
        raise _fail(where, f"status must be one of {STATUSES}, got {m.get('status')!r}")
    if m.get("format") not in FORMATS:
        raise _fail(where, f"unknown format {m.get('format')!r}")
    args = m.get("args")
    if not isinstance(args, list):
        raise _fail(where, "args must be a list")
    for arg in args:
        if not isinstance(arg, dict) or not isinstance(arg.get("name"), str):
            raise _fail(where, "each arg needs a name")
        if not arg["name"].isidentifier():
            raise _fail(where, f"argument name {arg['name']!r} is not an identifier")
        if arg.get("kind") not in KINDS:
            raise _fail(where, f"argument {arg['name']}: unknown kind {arg.get('kind')!r}")
        _check_value(f"{where} (argument {arg['name']})", arg.get("value"))
    _check_value(f"{where} (result)", m.get("result"))
    error = m.get("error")
    if error is not None and not (isinstance(error, dict) and all(
            isinstance(error.get(k), str) for k in ("type", "message"))):
        raise _fail(where, "error must be null or {\"type\": str, \"message\": str}")
    if m.get("skipped") is not None and not isinstance(m["skipped"], str):
        raise _fail(where, "skipped must be a string or null")
    return m


def _no_constant(name: str) -> Any:
    """JSON's NaN and Infinity are not JSON: a manifest writes them as tagged floats."""
    raise ValueError(f"{name} is not JSON (a float that is not finite is written tagged)")


def iter_objects(value: Any):
    """Every stored-object entry ({hash, key, nbytes}) a checked value names."""
    if isinstance(value, dict):
        tag = value.get("t")
        if tag == "tensor":
            yield value
        elif tag == "paged_kv":
            # A page is checked against its bytes like a tensor of the page's shape.
            for page in value["pages"]:
                yield {**page, "t": "page", "dtype": value["dtype"], "format": value["format"],
                       "page_shape": value["shape"][1:]}
        elif tag in ("tuple", "list"):
            for item in value["items"]:
                yield from iter_objects(item)
        elif tag == "dict":
            for _, item in value["items"]:
                yield from iter_objects(item)


def manifest_objects(m: dict) -> list[dict]:
    """Every stored object a checked manifest names (args then result)."""
    out = []
    for arg in m["args"]:
        out.extend(iter_objects(arg["value"]))
    out.extend(iter_objects(m.get("result")))
    return out
