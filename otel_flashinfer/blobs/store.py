"""A content-addressed store over fsspec, with budgets shared across processes.

Objects are written only if absent and atomically (local: temp name + fsync +
rename; object stores: one PUT, which is atomic).  Callers write a manifest only
after every object it names is in place, so a manifest never points at a missing
or truncated object.  Several writer threads may store the same object at once:
the rename is checked under a lock, so one copy lands, the others are discarded
and only the first counts as newly written.

``put_content`` names an object by its sha256, hashed before writing so that a
duplicate costs no write (hashing while writing, in chunks, measured no faster
here: sha256 runs at ~1.4 GB/s, the fsync is what costs).

Budgets (``OTEL_FLASHINFER_BLOB_MAX_GB`` / ``_MAX_COUNT``): a call reserves one
count and an upper bound of its bytes before anything is copied; once written,
what dedup saved is given back.  The reservation is exact across threads (a
lock) and, for a local store, across every process writing to it (a counter
file ``.usage/counter`` under an fcntl record lock; delete it to reset the
budget).  For remote stores (s3://, gs://, ...) the budget is per process:
object stores have no cheap atomic counter.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import struct
import threading
import uuid
from typing import Any

import fsspec

from . import layout

log = logging.getLogger(__name__)

_COUNTER = struct.Struct("<qq")  # calls, bytes


def parts_of(data: bytes | list) -> list:
    """Buffers of an object given as bytes or as a list of buffers."""
    return data if isinstance(data, list) else [data]


class StoreError(RuntimeError):
    """The store cannot be used (names the URL)."""


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


class _Budget:
    """Calls and bytes reserved so far, shared through a locked file when local."""

    def __init__(self, max_count: int, max_bytes: int, counter_path: str | None) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._path = counter_path
        self._fd: int | None = None
        self._pid = -1
        self._count = 0
        self._bytes = 0

    def _open(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            self._pid = os.getpid()
        return self._fd

    def _update(self, d_count: int, d_bytes: int, check: bool) -> str | None:
        with self._lock:
            if self._path is None:
                count, nbytes = self._count, self._bytes
                reason = self._over(count, nbytes, d_count, d_bytes) if check else None
                if reason is None:
                    self._count, self._bytes = count + d_count, max(0, nbytes + d_bytes)
                return reason
            fd = self._open()
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _COUNTER.size, 0)
                count, nbytes = _COUNTER.unpack(raw) if len(raw) == _COUNTER.size else (0, 0)
                reason = self._over(count, nbytes, d_count, d_bytes) if check else None
                if reason is None:
                    os.pwrite(fd, _COUNTER.pack(count + d_count, max(0, nbytes + d_bytes)), 0)
                return reason
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def _over(self, count: int, nbytes: int, d_count: int, d_bytes: int) -> str | None:
        if d_count > 0 and count + d_count > self.max_count:
            return "max_count"
        if d_bytes > 0 and nbytes + d_bytes > self.max_bytes:
            return "max_bytes"
        return None

    def reserve(self, calls: int, nbytes: int) -> str | None:
        """Take ``calls`` and ``nbytes`` from the budget; the reason string if over."""
        return self._update(calls, nbytes, check=True)

    def release(self, calls: int, nbytes: int) -> None:
        """Give back what a reservation did not use."""
        self._update(-calls, -nbytes, check=False)

    def usage(self) -> tuple[int, int]:
        """(calls, bytes) currently counted."""
        with self._lock:
            if self._path is None:
                return self._count, self._bytes
            raw = os.pread(self._open(), _COUNTER.size, 0)
            return _COUNTER.unpack(raw) if len(raw) == _COUNTER.size else (0, 0)


class BlobStore:
    """Objects and manifests under one fsspec URL."""

    def __init__(
        self,
        url: str = "./flashinfer_blobs",
        *,
        max_count: int = 1000,
        max_bytes: int = 20 * 1024**3,
        storage_options: dict | None = None,
        check_writable: bool = True,
    ) -> None:
        self.url = url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except Exception as exc:
            raise StoreError(f"blob store {url!r} cannot be opened: {exc}") from exc
        self.local = _is_local(self.fs)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        self._known: set[str] = set()
        self._land_lock = threading.Lock()  # exists-check + rename of one object
        counter = os.path.join(self.root, layout.USAGE_DIR, "counter") if self.local else None
        self.budget = _Budget(max_count, max_bytes, counter)
        if check_writable:
            self._check_writable()

    # -- URLs and paths ---------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path (for ``self.fs``) of a relative key."""
        return layout.join(self.root, key)

    def url_of(self, key: str) -> str:
        """Full URL of a key, as put into span attributes."""
        if self.local:
            return "file://" + self.path(key)
        return self.fs.unstrip_protocol(self.path(key))

    def _check_writable(self) -> None:
        probe = f"{layout.USAGE_DIR}/probe-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            if self.local:
                os.makedirs(os.path.join(self.root, layout.USAGE_DIR), exist_ok=True)
                self.budget.usage()
            self.fs.pipe_file(self.path(probe), b"ok")
            self.fs.rm_file(self.path(probe))
        except Exception as exc:
            raise StoreError(f"blob store {self.url!r} is not writable: {exc}") from exc

    # -- writing ------------------------------------------------------------------
    def _tmp_path(self, path: str) -> str:
        return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"

    def _write_atomic(self, key: str, data: bytes | list) -> None:
        path = self.path(key)
        parts = parts_of(data)
        if not self.local:
            self.fs.pipe_file(path, b"".join(parts))  # a single PUT: all or nothing
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self._tmp_path(path)
        try:
            _write_synced(tmp, parts)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _land(self, tmp: str, key: str) -> bool:
        """Rename a synced temp file to ``key`` unless the object is there already
        (then the temp is deleted); whether this call put it there."""
        path = self.path(key)
        with self._land_lock:
            if key in self._known or os.path.exists(path):
                self._known.add(key)
                _unlink_quietly(tmp)
                return False
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
            self._known.add(key)
            return True

    def has_object(self, key: str) -> bool:
        """Whether an object is already stored (remembered once seen)."""
        if key in self._known:
            return True
        exists = os.path.exists(self.path(key)) if self.local else self.fs.exists(self.path(key))
        if exists:
            self._known.add(key)
        return exists

    def put_object(self, key: str, data: bytes | list) -> int:
        """Store an object (bytes or buffers in order) unless present; returns the
        bytes newly written (0 if deduped, also when another thread landed it first)."""
        if self.has_object(key):
            return 0
        if not self.local:
            self._write_atomic(key, data)
            self._known.add(key)
            return _nbytes(parts_of(data))
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self._tmp_path(path)
        try:
            _write_synced(tmp, parts_of(data))
            landed = self._land(tmp, key)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return _nbytes(parts_of(data)) if landed else 0

    def put_content(self, data: bytes | list, fmt: str) -> tuple[str, str, int]:
        """Store an object under its content address: (sha256 hex, key, bytes newly
        written).  Hashed first, so a duplicate costs no write."""
        parts = parts_of(data)
        h = hashlib.sha256()
        for part in parts:
            h.update(part)  # releases the GIL on large buffers: other writers go on
        digest = h.hexdigest()
        key = layout.object_key(digest, fmt)
        return digest, key, self.put_object(key, parts)

    def put_manifest(self, key: str, data: bytes) -> None:
        """Write (or replace) a manifest; call only after its objects are stored."""
        self._write_atomic(key, data)

    # -- reading --------------------------------------------------------------------
    def list_manifests(self, trace_id: int | str) -> list[str]:
        """Keys of a trace's manifests, in start-time order (one prefix listing)."""
        prefix = layout.trace_prefix(trace_id)
        self.fs.invalidate_cache(self.path(prefix))  # other writers may have added some
        try:
            names = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        keys = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            try:
                layout.parse_manifest_name(base)
            except ValueError:
                continue  # temp files, foreign files
            keys.append(f"{prefix}/{base}")
        return sorted(keys)

    def get(self, key: str) -> bytes:
        """Bytes of an object or manifest."""
        return self.fs.cat_file(self.path(key))


def _nbytes(parts: list) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_synced(path: str, parts: list) -> None:
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
