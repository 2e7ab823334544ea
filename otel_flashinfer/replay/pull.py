"""From a trace id to a verified, self-contained local bundle.

Bundle layout (``out_dir``)::

    index.json                       {"schema": 1, "trace_id" (null for a session),
                                      "selection", "source", "calls": [
                                       {"manifest": "manifests/<name>.json", "span_id",
                                        "trace_id", "api", "start_ns", "seq"}, ...]}
    manifests/<start_ns>-<span_id>.json   copies of the store's manifests
    objects/<aa>/<sha256>.<ext>      every object they name, hash-verified

A bundle replays on its own: the ``__init__`` and ``plan`` in force for every
object whose calls it holds come along from whatever trace recorded them, found
through the store's instance index (``blobs.index``), never by scanning traces.

Everything read from the store is untrusted: manifests are validated strictly,
every object's sha256 and size are checked and it must decode to the dtype and
shape its manifest claims, and nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field

import torch

from ..blobs import encode, index, layout, manifest
from ..blobs.store import BlobStore, StoreError
from . import chain

INDEX = "index.json"
BUNDLE_SCHEMA = 1


class BundleError(ValueError):
    """A refused store or bundle entry; the message names the file and the problem."""


@dataclass
class Bundle:
    """A pulled bundle: where it is and what it holds."""

    path: str
    trace_id: str
    calls: list[dict] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0


def safe_path(root: str, rel: str) -> str:
    """``root/rel`` if it stays inside ``root``; BundleError otherwise."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel:
        raise BundleError(f"{rel!r}: path is not a plain relative path")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise BundleError(f"{rel!r}: path has empty, '.' or '..' parts")
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, full]) != base:
        raise BundleError(f"{rel!r}: path would write outside {root}")
    return full


def _write_inside(root: str, rel: str, data: bytes) -> None:
    path = safe_path(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def check_object(data: bytes, entry: dict, where: str) -> None:
    """Refuse bytes whose hash or size is not what the manifest says."""
    digest = encode.sha256(data)
    if digest != entry["hash"]:
        raise BundleError(f"{where}: hash mismatch for {entry['key']} "
                          f"(manifest {entry['hash']}, bytes {digest})")
    if len(data) != entry["nbytes"]:
        raise BundleError(f"{where}: {entry['key']} has {len(data)} bytes, "
                          f"manifest says {entry['nbytes']}")


def load_value_tensor(data: bytes, entry: dict, where: str, allow_pickle: bool = False
                      ) -> torch.Tensor:
    """The tensor (or compact page) an object holds, checked against its entry."""
    try:
        flat = encode.decode(data, entry["format"], allow_pickle)
        if entry.get("t") == "tensor":
            return encode.rebuild(flat, entry["dtype"], entry["shape"], entry["stride"],
                                  entry["storage_offset"])
        page_shape = entry["page_shape"]
        n = _numel(page_shape)
        page = encode.rebuild(flat, entry["dtype"], [n], [1], 0)
        itemsize = page.element_size() if flat.dtype != page.dtype else 1
        held = flat.numel() // itemsize if flat.dtype != page.dtype else flat.numel()
        if held != n:
            raise encode.EncodeError(f"page holds {held} elements, shape {page_shape} needs {n}")
        return page.reshape(page_shape)
    except encode.EncodeError as exc:
        raise BundleError(f"{where}: object {entry['key']}: {exc}") from None
    except (RuntimeError, ValueError, OverflowError) as exc:  # what torch refuses
        raise BundleError(f"{where}: object {entry['key']}: cannot be read as its "
                          f"manifest says: {exc}") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _select(manifests: list[tuple[str, dict]], span_id: str | None) -> list[tuple[str, dict]]:
    """The chosen span plus the earlier calls of its object (its __init__/plan)."""
    if span_id is None:
        return manifests
    want = layout.span_hex(span_id)
    chosen = [(k, m) for k, m in manifests if m["span_id"] == want]
    if not chosen:
        raise BundleError(f"span {want} has no manifest in this trace")
    target = chosen[0][1]
    inst = target.get("instance_id")
    return [(k, m) for k, m in manifests
            if m["span_id"] == want or (inst is not None and m.get("instance_id") == inst
                                        and m["start_ns"] <= target["start_ns"])]


def read_manifest(store: BlobStore, key: str) -> dict:
    """A store manifest, parsed strictly and checked against its own name."""
    where = store.url_of(key)
    try:
        data = store.get(key, manifest.MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise BundleError(f"{where}: manifest named by the store's index is missing") from None
    except StoreError as exc:
        raise BundleError(str(exc)) from None
    m = manifest.parse(data, where)
    trace = key.split("/")[1] if key.count("/") == 2 else ""
    start_ns, span = layout.parse_manifest_name(key.rsplit("/", 1)[1])
    if m["trace_id"] != trace or m["span_id"] != span or m["start_ns"] != start_ns:
        raise BundleError(f"{where}: manifest ids do not match its name")
    return m


def trace_manifests(store: BlobStore, trace: str) -> list[tuple[str, dict]]:
    """Every manifest of one trace, in call order."""
    return [(key, read_manifest(store, key)) for key in store.list_manifests(trace)]


def complete_chains(store: BlobStore, manifests: list[tuple[str, dict]]
                    ) -> list[tuple[str, dict]]:
    """``manifests`` plus the ``__init__``/``plan`` in force for every object they call,
    found through the store's instance index wherever they were recorded.

    A call whose object has no recorded ``__init__`` is refused, naming its manifest:
    the bundle would not replay on its own.
    """
    have = {key: m for key, m in manifests}
    listed: dict[tuple[str, str], list[dict]] = {}
    for key, m in list(manifests):
        instance, process = m.get("instance_id"), m.get("process")
        if not instance or not process:
            continue  # a plain function, or written before the index existed
        need_init, need_plan = chain.needs(chain.method_of(m["qualname"]))
        if not need_init:
            continue
        where = store.url_of(key)
        try:
            prefix = layout.instance_prefix(process, instance)
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        entries = listed.get((process, instance))
        if entries is None:
            entries = index.list_chain(store, process, instance)
            for other_key, other in have.items():  # also what the selection holds already
                if other.get("instance_id") == instance and other.get("process") == process:
                    entries.append({"start_ns": other["start_ns"], "manifest": other_key,
                                    "method": chain.method_of(other["qualname"])})
            listed[(process, instance)] = entries
        init, plan = chain.in_force(entries, m["start_ns"])
        if init is None:
            raise BundleError(f"{where}: no recorded __init__ for instance {instance} "
                              f"({m['api']}) in the store (looked under {prefix}/)")
        for entry in (init, plan if need_plan else None):
            if entry is None or entry["manifest"] in have:
                continue
            found = read_manifest(store, entry["manifest"])
            if found.get("instance_id") != instance or found.get("process") != process \
                    or chain.method_of(found["qualname"]) != entry["method"]:
                raise BundleError(f"{store.url_of(entry['manifest'])}: is not the "
                                  f"{entry['method']} of instance {instance} its index says")
            if found["status"] != "ok" and chain.is_init(entry["method"]):
                raise BundleError(f"{store.url_of(entry['manifest'])}: the __init__ of "
                                  f"instance {instance} did not complete ({found['status']})")
            have[entry["manifest"]] = found
    return sorted(have.items(), key=lambda km: (km[1]["start_ns"], km[1]["seq"]))


def write_bundle(store: BlobStore, manifests: list[tuple[str, dict]], out_dir: str,
                 selection: dict, *, workers: int = 16, progress: bool | None = None,
                 allow_pickle: bool = False) -> Bundle:
    """Fetch and verify every object ``manifests`` name, then write the bundle.  It is
    made in a folder beside ``out_dir`` and moved in only once all of it was verified:
    a refused pull writes nothing into ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    stage = os.path.join(os.path.dirname(out_dir),
                         f".{os.path.basename(out_dir)}.pull-{uuid.uuid4().hex[:8]}")
    os.makedirs(stage)
    try:
        bundle = _write_staged(store, manifests, stage, selection, workers, progress,
                               allow_pickle)
        _move_into(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dataclasses.replace(bundle, path=out_dir)


def _move_into(stage: str, out_dir: str) -> None:
    """Every file of ``stage`` to the same place inside ``out_dir`` (an existing bundle
    folder keeps what the new one does not replace)."""
    os.makedirs(out_dir, exist_ok=True)
    for folder, _, files in os.walk(stage):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), stage).replace(os.sep, "/")
            dst = safe_path(out_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(os.path.join(folder, name), dst)


def _write_staged(store: BlobStore, manifests: list[tuple[str, dict]], out_dir: str,
                  selection: dict, workers: int, progress: bool | None,
                  allow_pickle: bool) -> Bundle:
    entries: dict[str, tuple[dict, str]] = {}
    for key, m in manifests:
        for entry in manifest.manifest_objects(m):
            entries.setdefault(entry["key"], (entry, store.url_of(key)))
            safe_path(out_dir, entry["key"])
    if progress is None:
        progress = sys.stderr.isatty()
    total = 0

    def fetch(item: tuple[dict, str]) -> int:
        entry, where = item
        try:
            data = store.get(entry["key"], entry["nbytes"])  # the hash is checked next
        except StoreError as exc:
            raise BundleError(f"{where}: {exc}") from None
        except OSError as exc:  # missing or unreadable: say which manifest named it
            raise BundleError(f"{where}: object {entry['key']}: {exc}") from None
        check_object(data, entry, where)
        load_value_tensor(data, entry, where, allow_pickle)
        _write_inside(out_dir, entry["key"], data)
        return len(data)

    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch, item) for item in entries.values()]
        for done, fut in enumerate(cf.as_completed(futures), 1):
            try:
                total += fut.result()
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
            if progress:
                sys.stderr.write(f"\rpull {done}/{len(futures)} objects, {total / 1e6:.1f} MB")
    if progress:
        sys.stderr.write("\n")
    calls = []
    for key, m in manifests:
        rel = "manifests/" + key.rsplit("/", 1)[1]
        _write_inside(out_dir, rel, manifest.dumps(m))
        calls.append({"manifest": rel, "span_id": m["span_id"], "trace_id": m["trace_id"],
                      "api": m["api"], "start_ns": m["start_ns"], "seq": m["seq"]})
    trace = selection.get("trace_id")
    index_doc = {"schema": BUNDLE_SCHEMA, "trace_id": trace, "selection": selection,
                 "source": store.url, "calls": calls}
    _write_inside(out_dir, INDEX, json.dumps(index_doc, indent=1).encode())
    return Bundle(path=out_dir, trace_id=trace or "", calls=calls, objects=len(entries),
                  bytes=total)


def pull(
    trace_id: int | str,
    blob_url: str = "./flashinfer_blobs",
    out_dir: str = ".",
    span_id: int | str | None = None,
    *,
    workers: int = 16,
    progress: bool | None = None,
    allow_pickle: bool = False,
) -> Bundle:
    """Fetch a trace's manifests (and the ``__init__``/``plan`` of every object they
    use, from whatever trace recorded them) and objects, verify them, write a bundle."""
    trace = layout.trace_hex(trace_id)
    store = BlobStore(blob_url, check_writable=False)
    manifests = trace_manifests(store, trace)
    if not manifests:
        raise BundleError(f"no manifests for trace {trace} under {blob_url}")
    manifests = _select(manifests, None if span_id is None else str(span_id))
    manifests = complete_chains(store, manifests)
    selection = {"trace_id": trace}
    if span_id is not None:
        selection["span_id"] = layout.span_hex(str(span_id))
    return write_bundle(store, manifests, out_dir, selection, workers=workers,
                        progress=progress, allow_pickle=allow_pickle)
