"""A pulled bundle -> recorded calls with their tensors loaded (untrusted input).

``load_bundle`` re-validates everything: the index, every manifest, every
object's hash and size, and that each object decodes to the dtype and shape its
manifest claims.  Enum values stay ``EnumRef`` placeholders here: resolving one
imports a module, which only the runner does, after its allow-list check.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import torch

from ..blobs import encode, layout, manifest
from .pull import INDEX, BundleError, check_object, load_value_tensor, safe_path


@dataclass(frozen=True)
class EnumRef:
    """An enum member recorded by name ("module:Qual", "MEMBER")."""

    cls: str
    name: str


@dataclass(frozen=True)
class Unrepresentable:
    """An argument that could not be recorded (its type name)."""

    type: str


@dataclass
class PagedKV:
    """A compact KV cache: ``cache[i]`` is page ``page_ids[i]`` of the original."""

    cache: torch.Tensor
    page_ids: list[int]
    shape: list[int]


@dataclass
class RecordedArg:
    """One recorded argument: name, parameter kind, loaded value."""

    name: str
    kind: str
    value: Any


@dataclass
class RecordedCall:
    """One recorded call, tensors loaded."""

    api: str
    module: str
    qualname: str
    instance_id: str | None
    trace_id: str
    span_id: str
    status: str
    seq: int
    start_ns: int
    args: list[RecordedArg]
    result: Any
    skipped: str | None
    error: dict | None
    path: str
    manifest: dict = field(repr=False)


def _device_for(recorded: str, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if recorded.startswith("cuda") and torch.cuda.is_available():
        return torch.device(recorded)
    return torch.device("cpu")


class _Loader:
    def __init__(self, root: str, device: str | None, allow_pickle: bool = False) -> None:
        self.root = root
        self.device = device
        self.allow_pickle = allow_pickle
        self.cache: dict[str, bytes] = {}

    def object(self, entry: dict, where: str) -> torch.Tensor:
        key = entry["key"]
        data = self.cache.get(key)
        if data is None:
            path = safe_path(self.root, key)
            try:
                data = read_bounded(path, entry["nbytes"])
            except OSError as exc:
                raise BundleError(f"{where}: object {key} missing from bundle: {exc}") from None
            except BundleError as exc:
                raise BundleError(f"{where}: object {exc}") from None
            check_object(data, entry, where)
            self.cache[key] = data
        return load_value_tensor(data, entry, where, self.allow_pickle)

    def value(self, v: Any, where: str) -> Any:
        if not isinstance(v, dict):
            return v
        tag = v["t"]
        if tag == "float":
            return float(v["v"])
        if tag == "tuple":
            return tuple(self.value(i, where) for i in v["items"])
        if tag == "list":
            return [self.value(i, where) for i in v["items"]]
        if tag == "dict":
            return {k: self.value(i, where) for k, i in v["items"]}
        if tag == "enum":
            return EnumRef(v["cls"], v["name"])
        if tag == "dtype":
            return encode.DTYPES[v["v"]]
        if tag == "device":
            return torch.device(v["v"]) if self.device is None else torch.device(self.device)
        if tag == "tensor":
            t = self.object(v, where)
            dev = _device_for(v["device"], self.device)
            # Own storage of the span it addresses, exact strides kept (``clone`` would
            # make a stride-0 (expanded) tensor dense: 2^40 elements from one stored).
            flat = t.as_strided((encode.span_numel(t.shape, t.stride()),), (1,),
                                t.storage_offset())
            flat = flat.clone() if dev.type == "cpu" else flat.to(dev)
            return flat.as_strided(t.shape, t.stride(), 0)
        if tag == "paged_kv":
            pages = [self.object({**p, "t": "page", "dtype": v["dtype"], "format": v["format"],
                                  "page_shape": v["shape"][1:]}, where) for p in v["pages"]]
            if pages:
                cache = torch.stack(pages)
            else:
                cache = torch.empty([0, *v["shape"][1:]], dtype=encode.DTYPES[v["dtype"]])
            return PagedKV(cache.to(_device_for(v["device"], self.device)), v["page_ids"],
                           v["shape"])
        if tag == "unrepresentable":
            return Unrepresentable(v["type"])
        raise BundleError(f"{where}: unknown value tag {tag!r}")


def read_bounded(path: str, limit: int) -> bytes:
    """A bundle file's bytes, read back untrusted: a regular file (a FIFO would hang the
    reader, a link to /dev/zero fill memory) of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: {st.st_size} bytes, more than the {limit} expected")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BundleError(f"{path}: more than the {limit} bytes expected")
    return data


def read_index(root: str) -> dict:
    """The bundle's index, checked."""
    where = os.path.join(root, INDEX)
    try:
        index = json.loads(read_bounded(where, manifest.MAX_MANIFEST_BYTES))
    except OSError as exc:
        raise BundleError(f"{where}: cannot read bundle index: {exc}") from None
    except ValueError as exc:
        raise BundleError(f"{where}: malformed JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{where}: malformed JSON: nested too deep") from None
    if not isinstance(index, dict) or not isinstance(index.get("calls"), list):
        raise BundleError(f"{where}: index needs a 'calls' list")
    for call in index["calls"]:
        if not isinstance(call, dict) or not isinstance(call.get("manifest"), str):
            raise BundleError(f"{where}: each call needs a 'manifest' path")
        rel = call["manifest"]
        if not rel.startswith("manifests/"):
            raise BundleError(f"{where}: manifest path {rel!r} is not under manifests/")
        try:
            layout.parse_manifest_name(rel[len("manifests/"):])
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
    return index


def _built(loader: _Loader, value: Any, where: str) -> Any:
    """``loader.value``, with anything torch or Python refuses in a checked manifest (a
    device name, a size no memory holds) said as a ``BundleError`` naming the file."""
    try:
        return loader.value(value, where)
    except BundleError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise BundleError(f"{where}: cannot be rebuilt: {type(exc).__name__}: {exc}") from None


def load_bundle(path: str, device: str | None = "cpu", allow_pickle: bool = False
                ) -> list[RecordedCall]:
    """Every call of a bundle in recorded order, tensors on ``device`` (None: as recorded)."""
    index = read_index(path)
    loader = _Loader(path, device, allow_pickle)
    calls = []
    for item in index["calls"]:
        mpath = safe_path(path, item["manifest"])
        try:
            data = read_bounded(mpath, manifest.MAX_MANIFEST_BYTES)
        except OSError as exc:
            raise BundleError(f"{mpath}: cannot read manifest: {exc}") from None
        m = manifest.parse(data, mpath)
        args = [RecordedArg(a["name"], a["kind"],
                            _built(loader, a["value"], f"{mpath} (argument {a['name']})"))
                for a in m["args"]]
        result = _built(loader, m.get("result"), f"{mpath} (result)")
        calls.append(RecordedCall(
            api=m["api"], module=m["module"], qualname=m["qualname"],
            instance_id=m.get("instance_id"), trace_id=m["trace_id"], span_id=m["span_id"],
            status=m["status"], seq=m["seq"], start_ns=m["start_ns"], args=args, result=result,
            skipped=m.get("skipped"), error=m.get("error"), path=mpath, manifest=m))
    calls.sort(key=lambda c: (c.start_ns, c.seq))
    return calls
