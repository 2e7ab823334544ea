"""The store's index, written at record time: who recorded what, and each object's chain.

``pull TRACE_ID`` must bring the ``__init__`` and ``plan`` of every object whose
``run`` it holds, though an engine makes its wrappers at start-up and plans them
in other traces; ``pull --process`` and ``ls`` must see a whole process.  Scanning
every trace of a store for that does not scale (and costs one request per
manifest on S3), so each stored call also leaves an empty object whose *name*
says what a listing needs (layout.py): one prefix listing answers either question.

Everything here reads untrusted names and bytes: names are parsed by strict
patterns and anything else is skipped; ``info.json`` is checked field by field.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

from . import layout
from .store import BlobStore

INFO_SCHEMA = 1
MAX_INFO_BYTES = 64 * 1024


def service_name() -> str:
    """``service.name`` as the OTel SDK resolves it (OTEL_SERVICE_NAME, _RESOURCE_ATTRIBUTES)."""
    try:
        from opentelemetry.sdk.resources import Resource

        name = Resource.create({}).attributes.get("service.name")
        return str(name) if name else "unknown_service"
    except Exception:  # noqa: BLE001 - the index must not stop the recording
        return "unknown_service"


class IndexWriter:
    """Writes one process' entries (the recorder's writer threads call ``note``)."""

    def __init__(self, store: BlobStore, process: str, pid: int, start_ns: int) -> None:
        self.store = store
        self.process = process
        self.pid = pid
        self.start_ns = start_ns
        self._info_written = False

    def _write_info(self) -> None:
        info = {"schema": INFO_SCHEMA, "process": self.process, "pid": self.pid,
                "service": service_name()[:256], "host": socket.gethostname()[:256],
                "argv": [str(a)[:256] for a in sys.argv[:16]], "start_ns": self.start_ns}
        self.store.put_manifest(layout.process_info_key(self.process),
                                json.dumps(info, sort_keys=True).encode())
        self._info_written = True

    def note(self, meta: dict, nbytes: int, replaces: str | None = None) -> str:
        """Index one call whose manifest is written: its process listing, and its
        object's chain if it is an ``__init__``/``plan*``.  Returns the listing entry's
        key; ``replaces``: an earlier entry of the same call (``CRASH_SAFE`` notes a call
        before it runs, with fewer bytes), removed once this one is there."""
        if not self._info_written:
            self._write_info()
        start, span, trace = meta["start_ns"], meta["span_id"], meta["trace_id"]
        name = layout.call_entry_name(start, span, trace, nbytes, meta["api"])
        key = f"{layout.process_calls_prefix(self.process)}/{name}"
        self.store.put_marker(key)
        if replaces is not None and replaces != key:
            self.store.remove(replaces)
        instance = meta.get("instance_id")
        method = meta["qualname"].rsplit(".", 1)[-1]
        if instance and (method == "__init__" or method.startswith("plan")):
            chain = layout.chain_entry_name(start, span, trace, method)
            self.store.put_manifest(
                f"{layout.instance_prefix(self.process, instance)}/{chain}", b"")
        return key


# -- reading (untrusted) ----------------------------------------------------------------

def _names(store: BlobStore, prefix: str) -> list[str]:
    path = store.path(prefix)
    store.fs.invalidate_cache(path)
    try:
        found = store.fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in found)


def list_processes(store: BlobStore) -> list[str]:
    """Every process folder of the store (names that are not one are skipped)."""
    out = []
    for name in _names(store, layout.PROCESSES):
        try:
            out.append(layout.check_process(name))
        except ValueError:
            continue
    return out


def read_info(store: BlobStore, process: str) -> dict:
    """A process' ``info.json``, checked; a missing or bad one gives what the name says."""
    fallback = {"process": process, "pid": layout.process_pid(process), "service": "",
                "host": "", "argv": [], "start_ns": 0}
    key = layout.process_info_key(process)
    try:
        data = store.get(key, MAX_INFO_BYTES)
    except (FileNotFoundError, OSError, RuntimeError):  # StoreError: past the limit
        return fallback
    try:
        if len(data) > MAX_INFO_BYTES:
            raise ValueError("too large")
        info = json.loads(data)
        if not isinstance(info, dict) or info.get("process") != process:
            raise ValueError("names another process")
        out = dict(fallback)
        for field, kind in (("service", str), ("host", str), ("start_ns", int)):
            if isinstance(info.get(field), kind) and not isinstance(info.get(field), bool):
                out[field] = info[field]
        argv = info.get("argv")
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            out["argv"] = argv[:16]
        return out
    except (ValueError, RecursionError):  # nested past the parser's depth: bad too
        return fallback


def _entries(store: BlobStore, prefix: str, parse: Any) -> list[dict]:
    """The index names under ``prefix`` that ``parse`` accepts, in call order, each
    with ``manifest`` (its key); a name it refuses (foreign, tampered) is skipped."""
    out = []
    for name in _names(store, prefix):
        try:
            entry = parse(name)
        except ValueError:
            continue
        entry["manifest"] = layout.manifest_key(entry["trace_id"], entry["start_ns"],
                                                entry["span_id"])
        out.append(entry)
    out.sort(key=lambda e: (e["start_ns"], e["span_id"]))
    return out


def list_calls(store: BlobStore, process: str) -> list[dict]:
    """A process' call entries in call order, each with ``manifest`` (its key)."""
    entries = _entries(store, layout.process_calls_prefix(process), layout.parse_call_entry)
    # One entry per call: a CRASH_SAFE call noted before it ran and again after keeps
    # the later (more bytes) if the process died between the two.
    latest: dict[tuple, dict] = {}
    for entry in entries:
        entry["process"] = process
        key = (entry["trace_id"], entry["span_id"])
        if key not in latest or entry["bytes"] > latest[key]["bytes"]:
            latest[key] = entry
    return [e for e in entries if latest[(e["trace_id"], e["span_id"])] is e]


def list_chain(store: BlobStore, process: str, instance_id: str) -> list[dict]:
    """An object's ``__init__``/``plan*`` entries in call order, each with ``manifest``."""
    return _entries(store, layout.instance_prefix(process, instance_id),
                    layout.parse_chain_entry)


def describe_store(store: BlobStore) -> list[dict[str, Any]]:
    """What ``ls`` prints: per process its info, calls per API, traces and bytes."""
    out = []
    for process in list_processes(store):
        info = read_info(store, process)
        calls = list_calls(store, process)
        apis: dict[str, list[int]] = {}
        for c in calls:
            counts = apis.setdefault(c["api"], [0, 0])
            counts[0] += 1
            counts[1] += c["bytes"]
        out.append({**info, "calls": len(calls), "bytes": sum(c["bytes"] for c in calls),
                    "traces": len({c["trace_id"] for c in calls}),
                    "first_ns": calls[0]["start_ns"] if calls else None,
                    "last_ns": calls[-1]["start_ns"] if calls else None,
                    "apis": {api: {"calls": n, "bytes": b}
                             for api, (n, b) in sorted(apis.items())}})
    return out
