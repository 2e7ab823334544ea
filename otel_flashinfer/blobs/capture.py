"""Level 10 on the caller's thread: take copies fast, write them in the background.

The span wrapper calls, per traced call::

    cap = recorder.before(api, module, qualname, instance_id, trace_id, span_id,
                          parent_span_id, start_ns, bound_args)
    ... run the function ...
    cap.after(result, error)

``before`` copies the inputs (CPU tensors: ``clone``; CUDA tensors: an async
device-to-host copy into a pinned staging buffer plus an event, no host sync)
and returns a ``CallCapture`` whose ``manifest_url`` is known at once, or whose
``skipped`` says why nothing is kept (``max_count``, ``max_bytes``, ``staging_full``,
``queue_full``, ``store_down``: writes failing, see ``StoreBreaker``, ``error``;
``write_failed`` can appear later); a call skipped before anything is copied gets the
reason's shared ``SkippedCall`` instead.  Once ``max_count`` is spent, a call is
skipped as such before any other check.
``after`` copies the outputs the same way and hands the call to the writer
threads (``writers``, default 2: while one hashes or copies, another waits on
fsync), which wait for the copies, encode, hash, store objects and write the
manifest last.  One call is written by one thread, so its manifest still comes
after its own objects; calls may finish out of order.  A ``CallCapture`` also
satisfies the span pipeline's ``Pending`` protocol (``ready``/``apply``/``abandon``).

Paged KV caches: for a method of an object with ``_paged_kv_indices_buf`` (the
FlashInfer decode/prefill wrappers), the argument ``paged_kv_cache`` (tensor or
``(k, v)`` tuple) is gathered on its device to the pages the planned indices
reference; each page becomes its own content-addressed object, so a page that
did not change since the last step is not stored again.

Index: after its manifest, each call gets its entries in the store's index
(``blobs.index``: the process' listing, and for ``__init__``/``plan*`` the
object's chain), so ``pull`` finds a ``run``'s chain and a whole process
without scanning traces.  A failed index write is counted, the call is kept.

Crash safety: ``atexit`` and SIGTERM (chained to the application's handler) turn
in-flight calls into ``crashed`` manifests with their inputs and wait for the
writer; with ``crash_safe`` the inputs and a ``pending`` manifest are written
before the function runs.
"""

from __future__ import annotations

import atexit
import collections
import inspect
import itertools
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import capture_guard, forking, threads
from ..stats import kernel as stats_kernel
from . import encode, layout, manifest
from .fingerprint import PageMemo, gather_fused, page_fingerprints
from .index import IndexWriter
from .store import BlobStore

log = logging.getLogger(__name__)

PAGED_ARG_NAMES = ("paged_kv_cache",)
#: While staging looks too full for an API's calls, one of them still tries this often.
STAGING_PROBE_S = 0.005
#: A remote store's writes go through the upload helper process (``uploader``); off
#: only to measure what that saves (``benchmarks/bench_s3_store.py``).
OFFLOAD_REMOTE_WRITES = True
PLAN_INDEX_ARG_NAMES = ("indices", "paged_kv_indices")
_KIND_NAMES = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


class _Skip(Exception):
    """A call that will not be kept; the message is the reason string."""


class StoreFailed(Exception):
    """A store operation raised (any error: s3fs's client raises its own types, not
    OSError); what it raised is its ``__cause__``."""


class StoreBreaker:
    """While the store fails, payloads are skipped (``store_down``) instead of copied and
    queued for writes that fail too, each after the client's retries (6 to 10 s on S3).

    A failed write opens it for a pause (1 s, doubled for each failure in a row, at most
    30 s).  After the pause one call is written as a probe while the others are still
    skipped; its success closes the breaker, its failure opens it again.  Every write
    is admitted with the breaker's generation, and only a result of the current one
    counts: a write admitted before it opened does not close it, nor double its pause.
    Any store error counts, also one that is the payload's own (an object too large for
    a single PUT): the next call's probe closes it again.  The caller reads it without
    a lock: a call that races a change is one payload either way.
    """

    FIRST_PAUSE_S = 1.0
    MAX_PAUSE_S = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.until = 0.0
        self.pause = 0.0
        self.probing = False
        self.generation = 0

    def refuses(self, now: float) -> bool:
        """Whether a call skips its payload now (on the caller's thread)."""
        return self.probing or now < self.until

    def admit(self, now: float) -> int | None:
        """The generation a writer writes a queued call under, or None to drop it; the
        first one admitted after the pause is the probe."""
        if self.pause == 0.0:
            return self.generation
        with self._lock:
            if self.pause == 0.0:
                return self.generation
            if self.probing or now < self.until:
                return None
            self.probing = True
            return self.generation

    def failed(self, now: float, generation: int) -> None:
        with self._lock:
            if generation != self.generation:
                return
            self.generation += 1
            self.pause = min(max(2 * self.pause, self.FIRST_PAUSE_S), self.MAX_PAUSE_S)
            self.until = now + self.pause
            self.probing = False

    def inconclusive(self, generation: int) -> None:
        """The probe failed for another reason than the store: the next call probes."""
        with self._lock:
            if generation == self.generation:
                self.probing = False

    def succeeded(self, generation: int) -> None:
        if self.pause == 0.0:
            return
        with self._lock:
            if generation != self.generation:
                return
            self.generation += 1
            self.pause = self.until = 0.0
            self.probing = False


class _Held:
    """One copy waiting for the writer: a tensor span, or the pages of a KV cache."""

    __slots__ = ("dev", "dev_bytes", "entry", "event", "fps", "host", "ids", "pinned",
                 "plain_bytes", "source_key", "staged")

    def __init__(self, entry: dict) -> None:
        self.entry = entry  # the manifest value, filled in by the writer
        self.host: torch.Tensor | None = None  # flat span, or [n, *page] pages
        self.ids: torch.Tensor | None = None  # page ids per gathered page (paged only)
        #: Per gathered page, its fingerprint (``fingerprint``; CUDA pages only).
        self.fps: torch.Tensor | None = None
        self.event: Any = None
        self.pinned: list[torch.Tensor] = []
        self.plain_bytes = 0
        #: The gathered pages, left on the device (``host`` None): the writer copies
        #: only those whose fingerprint it has not stored (``_fetch_pages``).
        self.dev: torch.Tensor | None = None
        self.dev_bytes = 0
        #: Which cache the pages came from (its data pointer): the writer compares a
        #: call's fingerprints with that cache's last call (``_store_pages``).
        self.source_key: int | None = None
        #: Copies queued by ``stage_copies``, viewed by the writer after the event:
        #: ([(buffer, bytes, dtype, shape)], fused meta?, page ids?) (``_assign``).
        self.staged: tuple | None = None


class _LastPages:
    """A cache's last call as the writer stored it (``_store_pages``)."""

    __slots__ = ("found", "fps", "fps_bytes", "ids", "ids_json", "order", "pages",
                 "positions")

    def __init__(self, ids: bytes, fps: Any, order: list, positions: Any,
                 ids_json: Any, found: list, pages: Any) -> None:
        self.ids, self.fps, self.order, self.positions = ids, fps, order, positions
        self.fps_bytes = fps.tobytes()  # fps (numpy) as bytes: compared whole each call
        self.ids_json, self.found, self.pages = ids_json, found, pages


#: Caches whose last call the writers remember (one per layer's cache, and k and v).
_LAST_PAGES_MAX = 512


class SkippedCall:
    """A call whose payload is not kept, one object per reason for every such call, which
    is also its span's ``Pending``: a skipped call allocates nothing (a ``CallCapture``
    cost an Event, a lock and a pending object), and once ``BLOB_MAX_COUNT`` is reached,
    or for every call a filter leaves out, skipping is the usual case."""

    __slots__ = ("skipped",)
    meta = manifest_key = manifest_url = outputs_skipped = None

    def __init__(self, reason: str) -> None:
        self.skipped = reason

    def after(self, result: Any, error: BaseException | None) -> None:
        """Nothing to capture."""

    def pending(self, record: Any) -> SkippedCall:
        return self

    def ready(self) -> bool:
        return True

    def apply(self, record: Any) -> None:
        record.attributes["flashinfer.blob.skipped"] = self.skipped

    def abandon(self, record: Any, reason: str) -> None:
        self.apply(record)


_SKIPPED: dict[str, SkippedCall] = {}


def skipped(reason: str) -> SkippedCall:
    """The ``SkippedCall`` of ``reason``."""
    call = _SKIPPED.get(reason)
    if call is None:
        call = _SKIPPED.setdefault(reason, SkippedCall(reason))
    return call


class CallCapture:
    """One call's payload on its way to the store."""

    def __init__(self, recorder: BlobRecorder, meta: dict | None) -> None:
        self._rec = recorder
        self.meta = meta
        #: Why it was dropped on its way (``_drop``); a call skipped before anything was
        #: copied is a ``SkippedCall`` instead.
        self.skipped: str | None = None
        self.manifest_key: str | None = None
        self.manifest_url: str | None = None
        self.held: list[_Held] = []
        self.reserved_bytes = 0
        self.written_bytes = 0
        #: Why the outputs were left out of a manifest that has the inputs (None: kept).
        self.outputs_skipped: str | None = None
        #: The call's process-listing entry, once noted (``CRASH_SAFE`` notes it twice).
        self.index_key: str | None = None
        self.done = threading.Event()
        self._state_lock = threading.Lock()
        self._finished = False
        if meta is not None:
            self.manifest_key = layout.manifest_key(
                meta["trace_id"], meta["start_ns"], meta["span_id"])
            self.manifest_url = recorder.store.url_of(self.manifest_key)

    def _claim(self) -> bool:
        with self._state_lock:
            if self._finished or self.skipped is not None:
                return False
            self._finished = True
            return True

    def after(self, result: Any, error: BaseException | None) -> None:
        """Capture the outputs (when the call succeeded) and hand the call to the writer."""
        if not self._claim():
            return
        try:
            self._rec._complete(self, result, error)
        except Exception:  # noqa: BLE001 - never break the observed program
            self._rec._internal_error("after")
            self._rec._drop(self, "error")

    # -- Pending protocol of the span pipeline --------------------------------------------
    def pending(self, record: Any) -> BlobPending:
        """A ``Pending`` for the span pipeline, bound to the span's record."""
        return BlobPending(self, record)


class BlobPending:
    """Span pipeline ``Pending``: the span waits until the manifest is written."""

    def __init__(self, capture: CallCapture, record: Any) -> None:
        self.capture = capture
        self.record = record

    def ready(self) -> bool:
        """Whether the manifest is written (or the call was skipped)."""
        return self.capture.done.is_set()

    def apply(self, record: Any) -> None:
        """Put the manifest URL or the skip reason on the span record."""
        cap = self.capture
        if cap.skipped is not None:
            record.attributes["flashinfer.blob.skipped"] = cap.skipped
        else:
            record.attributes["flashinfer.blob.manifest"] = cap.manifest_url
            if cap.outputs_skipped is not None:
                record.attributes["flashinfer.blob.skipped"] = f"outputs:{cap.outputs_skipped}"

    def abandon(self, record: Any, reason: str) -> None:
        """The span goes without waiting: point at the manifest still on its way."""
        attrs = record.attributes
        if self.capture.skipped is not None:
            attrs["flashinfer.blob.skipped"] = self.capture.skipped
        else:
            attrs["flashinfer.blob.manifest"] = self.capture.manifest_url
            attrs["flashinfer.blob.unconfirmed"] = reason
            if self.capture.outputs_skipped is not None:
                attrs["flashinfer.blob.skipped"] = f"outputs:{self.capture.outputs_skipped}"


class BlobRecorder:
    """Captures call payloads into a ``BlobStore`` (see the module docstring)."""

    def __init__(
        self,
        settings: Any,
        *,
        store: BlobStore | None = None,
        staging_mb: float = 1024.0,
        device_hold_mb: float = 128.0,
        queue_max: int = 4096,
        install_handlers: bool = True,
        writers: int = 2,
    ) -> None:
        self.settings = settings
        self.format = getattr(settings, "blob_format", "safetensors")
        if self.format not in encode.FORMATS:
            raise ValueError(f"blob format must be one of {encode.FORMATS}, got {self.format!r}")
        self.crash_safe = bool(getattr(settings, "crash_safe", False))
        self.store = store or BlobStore(
            getattr(settings, "blob_url", "./flashinfer_blobs"),
            max_count=int(getattr(settings, "blob_max_count", 1000)),
            max_bytes=int(float(getattr(settings, "blob_max_gb", 20.0)) * 1024**3),
            durable=self.crash_safe,
            offload=OFFLOAD_REMOTE_WRITES,
        )
        if self.crash_safe:  # runs expected to crash keep no lease to leave behind
            self.store.budget.close()
        self._staging_bytes = int(staging_mb * 1024 * 1024)
        self._device_hold_bytes = int(device_hold_mb * 1024 * 1024)
        self._copy_streams: dict[int, Any] = {}
        self.queue_max = queue_max
        self.writers = max(1, int(writers))
        self.counters = collections.Counter()
        self._logged: set[str] = set()
        self._plan_numel: dict[str, int] = {}
        self._pid = os.getpid()
        self._init_process_state()
        if install_handlers:
            self._install_handlers()

    # -- process state (recreated in a forked child) -----------------------------------------
    def _init_process_state(self) -> None:
        """At start, and in a forked child: what the parent's threads held (staged bytes
        of calls they were writing, locks they may have held at the fork) is not the
        child's."""
        from .staging import StagingPool

        if self._pid != os.getpid():
            self.store.after_fork()
        self.staging = StagingPool(self._staging_bytes)
        #: Per API: the staging bytes its last kept call took for its inputs, and when
        #: a call last tried: a call finds staging too full before it describes its
        #: arguments.
        self._staged_need: dict[str, tuple[int, float]] = {}
        #: Device bytes of gathered pages waiting for the writer (``_Held.dev``): past
        #: it, a call's pages are copied to the host whole, as without fingerprints.
        self.device_hold = StagingPool(self._device_hold_bytes)
        self._counter_lock = threading.Lock()
        #: Pages stored before, by fingerprint: not encoded, hashed or stored again.
        self.page_memo = PageMemo()
        #: (cache, kind, pages) -> its last call's pages as stored (``_store_pages``).
        self._last_pages: dict[tuple, _LastPages] = {}
        self._pid = os.getpid()
        start_ns = time.time_ns()
        self.process = layout.process_name(self._pid, start_ns)
        self.index = IndexWriter(self.store, self.process, self._pid, start_ns)
        self._seq = itertools.count()
        self._queue: collections.deque[CallCapture] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = 0  # calls a writer thread has taken and not finished
        self._qlock = threading.RLock()  # RLock: the SIGTERM handler may enqueue
        self._inflight: dict[int, CallCapture] = {}
        #: (event, pinned buffers) of dropped calls, given back once the event is done.
        self._unsettled: collections.deque[tuple[Any, list]] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._start_lock = threading.Lock()
        self.breaker = StoreBreaker()

    def _install_handlers(self) -> None:
        ref = weakref.ref(self)

        def _at_exit() -> None:
            rec = ref()
            if rec is not None:
                rec.shutdown(timeout_s=30.0)

        atexit.register(_at_exit)
        forking.redo_in_child(self, "_init_process_state")
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)

            def _on_term(signum: int, frame: Any) -> None:
                # The calls in flight are over only if the process ends: an application
                # whose own handler returns (a graceful stop: a flag set) goes on, and
                # those calls complete with their outputs.
                rec = ref()
                if callable(previous):
                    if rec is not None:
                        # What is done goes out first: a handler may end the process
                        # without raising (os._exit).
                        rec.flush(timeout_s=10.0)
                    try:
                        previous(signum, frame)
                    except BaseException:  # sys.exit() and the like: ending now
                        if rec is not None:
                            rec._finish_inflight("crashed")
                            rec.flush(timeout_s=10.0)
                        raise
                    return
                if previous == signal.SIG_IGN:
                    return
                if rec is not None:  # SIG_DFL (or unknown): the process ends
                    rec._finish_inflight("crashed")
                    rec.flush(timeout_s=10.0)
                    rec.store.close()  # no atexit after this: the lease goes back now
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

            signal.signal(signal.SIGTERM, _on_term)
        except (ValueError, OSError):
            self._internal_error("sigterm handler")

    def _count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    def _internal_error(self, where: str) -> None:
        self._count("internal_errors")
        if where not in self._logged:
            self._logged.add(where)
            log.exception("otel_flashinfer blob recorder: internal error in %s", where)

    # -- caller thread ------------------------------------------------------------
    def before(
        self,
        api: str,
        module: str,
        qualname: str,
        instance_id: str | None,
        trace_id: int,
        span_id: int,
        parent_span_id: int | None,
        start_ns: int,
        bound_args: inspect.BoundArguments | dict[str, Any],
    ) -> CallCapture | SkippedCall:
        """Copy the inputs of a call about to run; never raises."""
        try:
            return self._before(api, module, qualname, instance_id, trace_id, span_id,
                                parent_span_id, start_ns, bound_args)
        except Exception:  # noqa: BLE001 - never break the observed program
            self._internal_error("before")
            self.counters["skipped.error"] += 1
            return skipped("error")

    def _before(self, api, module, qualname, instance_id, trace_id, span_id, parent_span_id,
                start_ns, bound_args) -> CallCapture | SkippedCall:
        if os.getpid() != self._pid:
            self._init_process_state()
        if len(self._queue) >= self.queue_max:
            self.counters["skipped.queue_full"] += 1
            return skipped("queue_full")
        now = time.monotonic()
        if self.breaker.refuses(now):
            self._count("skipped.store_down")
            return skipped("store_down")
        seen = self._staged_need.get(api)
        if seen is not None and self.staging.max_bytes - self.staging.used < seen[0]:
            # The writers are behind: skipped before describing and copying what would
            # not fit, judged by what the API's last kept call staged.  A call is let
            # through to try every STAGING_PROBE_S all the same: this API's calls may
            # have shrunk since (another shape, pages held on the device again).
            if now - seen[1] < STAGING_PROBE_S:
                self._count("skipped.staging_full")
                return skipped("staging_full")
            self._staged_need[api] = (seen[0], now)
        args, obj = _arguments(bound_args)
        meta = {
            "schema": manifest.SCHEMA, "api": api, "module": module, "qualname": qualname,
            "pid": os.getpid(), "process": self.process, "instance_id": instance_id,
            "trace_id": layout.trace_hex(trace_id), "span_id": layout.span_hex(span_id),
            "parent_span_id": None if parent_span_id is None else layout.span_hex(parent_span_id),
            "start_ns": int(start_ns), "seq": next(self._seq), "status": "pending",
            "error": None, "format": self.format, "result": None, "skipped": None,
        }
        pending: list[tuple[_Held, Any]] = []
        paged = _paged_plan(obj, instance_id, self._plan_numel)
        entries = []
        for name, kind, value in args:
            if paged is not None and name in PAGED_ARG_NAMES:
                ref = self._collector(pending, paged)
            else:
                ref = self._collector(pending, None)
            entries.append({"name": name, "kind": kind,
                            "value": manifest.plain_value(value, ref)})
        meta["args"] = entries
        nbytes = sum(_estimate(src, paged_info) for _, (src, paged_info) in pending)
        reason = self.store.budget.reserve(1, nbytes)
        if reason is not None:
            self.counters[f"skipped.{reason}"] += 1
            return skipped(reason)
        cap = CallCapture(self, meta)
        cap.reserved_bytes = nbytes
        try:
            self._copy_all(cap, pending)
        except _Skip as skip:
            self._drop(cap, str(skip))
            return cap
        except Exception:  # noqa: BLE001 - a copy that failed (out of memory...): the call goes on
            self._internal_error("copy")
            self._drop(cap, "error")  # gives its reservation back
            return cap
        self._staged_need[api] = (sum(_staged_bytes(held) for held in cap.held), now)
        self._inflight[id(cap)] = cap
        if self.crash_safe:
            self._write_now(cap)
        return cap

    def note_plan(self, instance_id: str | None, bound_args: Any) -> None:
        """A plan's page count (its index tensor's length), which the object's later runs
        gather pages by.  The hooks note every plan that reaches level 10, before they
        decide on its payload (filtered, captured, queue full): a run after a plan left
        unnoted gathered by the count before it and left out the pages the plan added."""
        if not instance_id:
            return
        args = bound_args.arguments if isinstance(bound_args, inspect.BoundArguments) \
            else bound_args
        for name in PLAN_INDEX_ARG_NAMES:
            value = args.get(name)
            if isinstance(value, torch.Tensor):
                self._plan_numel[instance_id] = value.numel()

    def _collector(self, pending: list, paged: tuple | None):
        def ref(tensor: torch.Tensor) -> dict:
            if paged is not None and tensor.dim() >= 2:
                entry = manifest.PagedEntry(
                    t="paged_kv", dtype=encode.dtype_name(tensor.dtype),
                    shape=list(tensor.shape), device=str(tensor.device), format=self.format)
            else:
                entry = {"t": "tensor", "dtype": encode.dtype_name(tensor.dtype),
                         "shape": list(tensor.shape), "stride": list(tensor.stride()),
                         "storage_offset": 0, "source_storage_offset": tensor.storage_offset(),
                         "device": str(tensor.device), "format": self.format}
            held = _Held(entry)
            if entry["t"] == "paged_kv":
                held.source_key = tensor.data_ptr()
            pending.append((held, (tensor, paged if entry["t"] == "paged_kv" else None)))
            return entry

        return ref

    def _copy_all(self, cap: CallCapture, pending: list) -> None:
        """Copy every collected tensor off the caller's memory (async for CUDA).  On any
        failure what this call took is given back (not what an earlier call took: the
        outputs' failing must not lose the inputs), and the error goes on."""
        first = len(cap.held)
        # The extension only for CUDA tensors: a process that records CPU tensors alone
        # must not start building (or loading) it.
        module = (stats_kernel.get() if any(src.is_cuda for _, (src, _) in pending)
                  else None)
        #: device -> the held copies made on its current stream: one event each, recorded
        #: after the last copy, covers them all (an event per tensor cost the caller a
        #: CUDA call and a Python object each).
        streams: dict[torch.device, list[_Held]] = {}
        #: device -> (source, pinned buffer, bytes) for one ``stage_copies`` call, when
        #: the extension is built; else each copy is a torch op here.
        batches: dict[torch.device, list] | None = (
            {} if getattr(module, "stage_copies", None) is not None else None)
        try:
            for held, (src, paged) in pending:
                cap.held.append(held)  # first: a failure below still gives back its budget
                batch = None
                if src.device.type != "cpu":
                    streams.setdefault(src.device, []).append(held)
                    if batches is not None and src.is_cuda:
                        batch = batches.setdefault(src.device, [])
                fused = None
                if paged is not None and src.is_cuda:
                    fused = gather_fused(module, src, paged[0], paged[1])
                if fused is not None:  # one launch: gather, fingerprints and ids
                    self._to_host(cap, held, fused[0], meta=fused[1], batch=batch)
                elif paged is not None:
                    buf_idx = paged[0]
                    n = paged[1]
                    idx = buf_idx[:n].to(device=src.device, dtype=torch.long)
                    idx = idx.clamp(0, max(src.shape[0] - 1, 0))
                    pages = src.index_select(0, idx)
                    # On the GPU, a fingerprint per page tells the writer which pages it
                    # stored before (a few kernels, against hashing 32 MB on the host).
                    # On the CPU it would cost more than the hash it saves.
                    fps = page_fingerprints(pages) if pages.is_cuda else None
                    self._to_host(cap, held, pages, page_ids=idx, fps=fps, batch=batch)
                elif not (src.is_conj() or src.is_neg()):
                    if batch is not None:  # the span copied from the tensor itself
                        self._to_host(cap, held, src, batch=batch, span=True)
                    else:
                        self._to_host(cap, held, encode.flat_span(src))
                else:
                    # A lazily conjugated or negated view: its bytes are not its values.
                    # copy_ would apply the bits to the host copy on the host right after
                    # queueing the async copy, racing it (torch's copy_kernel_cuda: the
                    # GPU test stored such a view negated but not conjugated, now and
                    # then); resolved on the device they are ordered on its stream.
                    flat = encode.flat_span(src)
                    self._to_host(cap, held, flat.resolve_conj().resolve_neg())
            for device, helds in streams.items():
                batch = batches.get(device) if batches is not None else None
                if batch:
                    event: Any = _StagedEvent(module, module.stage_copies(
                        [c[0] for c in batch], [c[1] for c in batch], [c[2] for c in batch]))
                else:
                    # blocking: the writer that waits on it sleeps rather than spins (a
                    # spin is CPU the whole process pays while the GPU catches up)
                    event = torch.cuda.Event(blocking=True)
                    event.record(torch.cuda.current_stream(device))
                for held in helds:
                    held.event = event
        except BaseException:
            self._release_held(cap, first)
            del cap.held[first:]
            raise

    def _to_host(self, cap: CallCapture, held: _Held, src: torch.Tensor,
                 page_ids: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                 meta: torch.Tensor | None = None, batch: list | None = None,
                 span: bool = False) -> None:
        """Copies of ``src`` (and of a paged cache's page ids and fingerprints, or of
        ``meta``: the fused kernel's [n, 3] ids and fingerprints, one copy) for the
        writer, held in staging.  With ``batch`` the copies are queued there for one
        ``stage_copies`` call and the writer makes its views after the event (``span``:
        ``src`` itself, copied as the flat span its layout addresses)."""
        if src.device.type == "cpu":
            nbytes = src.numel() * src.element_size() + (
                0 if page_ids is None else page_ids.numel() * 8)
            if not self.staging.reserve(nbytes):
                raise _Skip("staging_full")
            held.plain_bytes = nbytes
            held.host = src.clone() if page_ids is None else src  # index_select already copied
            held.ids = None if page_ids is None else page_ids.clone()
            return  # no fingerprints on the CPU: the hash is cheaper there
        if meta is not None:
            parts = [src, meta]
        else:
            parts = [src] if page_ids is None else [src, page_ids]
            if page_ids is not None and fps is not None:
                parts.append(fps)
        if meta is not None or (page_ids is not None and fps is not None):
            # The pages stay where they are (our own gathered copy): the writer copies
            # only those it has not stored.  Not with crash_safe, which writes every
            # page before the call runs, and not past the device budget.
            dev_bytes = src.numel() * src.element_size()
            if not self.crash_safe and self.device_hold.reserve(dev_bytes):
                held.dev, held.dev_bytes = src, dev_bytes
                parts = parts[1:]
        outs: list = []
        for part in parts:
            if span and part is src:
                numel = encode.span_numel(src.shape, src.stride())
                shape: Any = (numel,)
            else:
                numel, shape = part.numel(), part.shape
            nbytes = numel * part.element_size()
            buf = self.staging.acquire_pinned(nbytes)
            if buf is None:
                raise _Skip("staging_full")
            held.pinned.append(buf)
            if batch is not None:
                batch.append((part, buf, nbytes))
                outs.append((buf, nbytes, part.dtype, shape))
                continue
            view = _host_view(buf, nbytes, part.dtype, shape)
            view.copy_(part, non_blocking=True)
            outs.append(view)
        # ``held.event``: one per device for the call's copies, recorded by ``_copy_all``.
        if batch is not None:
            held.staged = (outs, meta is not None, page_ids is not None)
        else:
            _assign(held, outs, meta is not None, page_ids is not None)

    def _release_held(self, cap: CallCapture, first: int = 0) -> None:
        """Give a call's staging back.  Pinned buffers whose copies nobody waited for (a
        call dropped between its copies and the writer) go back only once their event
        has completed, which a writer thread waits for (``_settle``): a buffer given
        back early could be reused or freed to torch's host allocator, which knows
        nothing of our copies, while the GPU still writes into it."""
        unsettled = False
        for held in cap.held[first:]:
            if held.plain_bytes:
                self.staging.release(held.plain_bytes)
                held.plain_bytes = 0
            if held.pinned and held.event is not None:
                self._unsettled.append((held.event, held.pinned))
                unsettled = True
            else:
                for buf in held.pinned:
                    self.staging.release_pinned(buf)
            held.pinned = []
            held.host = held.ids = held.staged = None
            if held.dev_bytes:
                self.device_hold.release(held.dev_bytes)
                held.dev_bytes = 0
            held.dev = None
        if unsettled:
            self._ensure_writer()
            self._wake.set()

    def _settle(self) -> None:
        """Wait for the copies of dropped calls (``_release_held``), then give their
        buffers back; on a writer thread, counted busy (``flush`` waits for it)."""
        while True:
            with self._qlock:
                if not self._unsettled:
                    return
                self._idle.clear()  # before the pop: flush sees one or the other
                self._busy += 1
                event, bufs = self._unsettled.popleft()
            try:
                with capture_guard.gpu_queries(block=True):
                    event.synchronize()
            except Exception:  # noqa: BLE001 - a broken context: nothing writes there now
                self._internal_error("settle")
            finally:
                for buf in bufs:
                    self.staging.release_pinned(buf)
                self._done_one()

    def _done_one(self) -> None:
        """A writer finished a taken call or settle: idle once nothing is left."""
        with self._qlock:
            self._busy -= 1
            if not self._queue and not self._unsettled and self._busy == 0:
                self._idle.set()

    def _drop(self, cap: CallCapture, reason: str) -> None:
        """Give up on a call: free its copies and budget, mark why."""
        self._inflight.pop(id(cap), None)
        self._release_held(cap)
        if cap.meta is not None:
            # Often on the call's thread: credit the lease only (a writer settles it).
            self.store.budget.release(1, max(0, cap.reserved_bytes - cap.written_bytes),
                                      settle=False)
        self._count(f"skipped.{reason}")
        cap.skipped = reason
        cap.meta = None
        cap.done.set()

    def _complete(self, cap: CallCapture, result: Any, error: BaseException | None) -> None:
        meta = cap.meta
        if error is not None:
            meta["status"] = "error"
            meta["error"] = {"type": type(error).__qualname__, "message": str(error)[:2000]}
        else:
            meta["status"] = "ok"
            pending: list = []
            value = manifest.plain_value(result, self._collector(pending, None))
            nbytes = sum(_estimate(src, None) for _, (src, _) in pending)
            reason = self.store.budget.reserve(0, nbytes) if nbytes else None
            if reason is None:
                first = len(cap.held)
                try:
                    self._copy_all(cap, pending)
                    cap.reserved_bytes += nbytes
                    meta["result"] = value
                except Exception as exc:  # noqa: BLE001 - the inputs are kept either way
                    del cap.held[first:]
                    self.store.budget.release(0, nbytes, settle=False)  # the call's thread
                    if type(exc) is not _Skip:
                        self._internal_error("copy")
                    reason = str(exc) if type(exc) is _Skip else "error"
            if reason is not None:
                # The manifest keeps the inputs; the span and counters() say what is missing.
                meta["skipped"] = cap.outputs_skipped = reason
                self._count(f"outputs_skipped.{reason}")
        self._enqueue(cap)

    def _finish_inflight(self, status: str) -> None:
        """Hand every call still running to the writer as ``status`` (crash paths)."""
        for cap in list(self._inflight.values()):
            if cap._claim():
                cap.meta["status"] = status
                self._enqueue(cap)

    def _enqueue(self, cap: CallCapture) -> None:
        self._inflight.pop(id(cap), None)
        with self._qlock:
            self._idle.clear()
            self._queue.append(cap)
        self._ensure_writer()
        self._wake.set()

    def _ensure_writer(self) -> None:
        running = self._threads
        if len(running) >= self.writers and all(t.is_alive() for t in running):
            return
        with self._start_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.writers:
                t = threading.Thread(target=self._run_writer, daemon=True,
                                     name=f"otel-flashinfer-blobs-{len(self._threads)}")
                threads.start(t)
                self._threads.append(t)

    # -- writer threads ------------------------------------------------------------
    def _idle_give_back(self) -> None:
        """Half a second without calls: the budget's lease goes back to the shared file,
        so a process that stops recording (or exits without atexit, as multiprocessing
        children and killed processes do) holds none of it."""
        if self._busy == 0:
            try:
                self.store.budget.give_back()
            except Exception:  # noqa: BLE001
                self._internal_error("budget")

    def _take(self) -> CallCapture | None:
        """The next queued call (counted busy), or None; sets idle when nothing is left."""
        with self._qlock:
            if self._queue:
                self._busy += 1
                return self._queue.popleft()
            if self._busy == 0:
                self._idle.set()
            return None

    def _run_writer(self) -> None:
        while True:
            self._wake.clear()  # before looking at the queue: a later append wakes us
            if self._unsettled:
                self._settle()
            cap = self._take()
            if cap is None:
                if self._stopping:
                    return
                if not self._wake.wait(0.5) and not self._queue:
                    self._idle_give_back()
                continue
            self._wake.set()  # more may be queued: let another writer look too
            generation = self.breaker.admit(time.monotonic())
            try:
                if generation is None:
                    self._drop(cap, "store_down")
                    continue
                self._write(cap)
                self.breaker.succeeded(generation)
            except Exception as exc:  # noqa: BLE001 - a failing store must not stop the writer
                if isinstance(exc, StoreFailed):
                    self.breaker.failed(time.monotonic(), generation)
                    # It may come back empty: what it held is looked at again.
                    self.store.forget_objects()
                    self.page_memo.clear()
                    self._last_pages.clear()
                else:  # not the store's doing: a probe says nothing either way
                    self.breaker.inconclusive(generation)
                self._internal_error("write")
                self._count("write_failures")
                self._drop(cap, "write_failed")
            finally:
                self._done_one()

    def _store_held(self, held: _Held) -> int:
        """Encode, hash and store one held copy; returns payload bytes newly stored.

        The budget counts payload bytes (what the tensors hold), not file headers.
        """
        if "hash" in held.entry or "pages" in held.entry:
            return 0
        if held.event is not None:
            with capture_guard.gpu_queries(block=True):
                held.event.synchronize()
            held.event = None  # its copies are done: the buffers may go back at once
        if held.staged is not None:
            outs, meta, paged = held.staged
            held.staged = None
            _assign(held, [_host_view(*out) for out in outs], meta, paged)
        written = 0
        if held.entry["t"] == "paged_kv":
            written = self._store_pages(held)
        else:
            data = encode.encode_parts(held.host, self.format)
            digest, key, new = _store_call(self.store.put_content, data, self.format)
            if new:
                written += held.host.numel() * held.host.element_size()
            held.entry.update(hash=digest, key=key, nbytes=_size(data))
        return written

    def _store_pages(self, held: _Held) -> int:
        """A paged cache's pages: each stored once, by content, the manifest entry
        naming them in page-id order.

        Per-page work is Python under the GIL that the engine's thread needs, so loops
        that run per page are kept to what only Python can do (storing new pages).  A
        decode step changes a few of a cache's hundreds of pages: positions whose
        fingerprint equals the one the same cache had there in its last call reuse
        that call's stored page (compared in one tensor op), and only the others look
        in the memo or are stored."""
        source = held.host if held.host is not None else held.dev
        n = held.ids.shape[0]
        page_raw = math.prod(source.shape[1:]) * source.element_size()
        memo = self.page_memo
        fps = held.fps
        kind = memo.kind(source, self.format) if fps is not None else None
        slot = (held.source_key, kind, n)
        last = self._last_pages.get(slot) if fps is not None else None
        # numpy, not torch: a torch op costs the writer 5-20 us under the GIL; the
        # steady state (a cache unchanged since its last call) is two byte compares.
        fps_now = fps.numpy() if fps is not None else None
        ids_now = held.ids.numpy().tobytes() if fps is not None else None
        if last is not None and last.ids == ids_now:
            order, positions, ids_json = last.order, last.positions, last.ids_json
            if fps_now.tobytes() == last.fps_bytes:  # its page list, JSON and all
                self._count("pages_unchanged", len(order))
                held.entry["page_ids"] = ids_json
                held.entry["pages"] = last.pages
                return 0
            diff = (fps_now != last.fps).any(axis=1)
            if type(positions) is not range:
                diff = diff[positions]
            changed = diff.nonzero()[0].tolist()
            found = list(last.found)
            keys: list = [None] * len(order)
            if changed:
                rows = fps_now[[positions[i] for i in changed]].tolist()
                for i, (a, b) in zip(changed, rows, strict=True):
                    keys[i] = (a, b, kind)
                for i, stored in zip(changed, memo.lookup([keys[i] for i in changed]),
                                     strict=True):
                    found[i] = stored
        else:
            ids = held.ids.tolist()
            order = sorted(set(ids))
            if order == ids:  # the usual case: each page once, in order
                positions: Sequence[int] = range(len(ids))
            else:
                first: dict[int, int] = {}
                for pos, pid in enumerate(ids):
                    first.setdefault(pid, pos)
                positions = [first[pid] for pid in order]
            ids_json = manifest.EncodedInts(order)
            changed = None
            if fps is not None:
                rows = fps_now.tolist()
                if type(positions) is not range:
                    rows = [rows[pos] for pos in positions]
                keys = [(a, b, kind) for a, b in rows]
                found = memo.lookup(keys)
            else:
                keys, found = [None] * len(order), [None] * len(order)
        if changed is None:
            missing = [i for i, stored in enumerate(found) if stored is None]
        else:  # the rest are the last call's, stored
            missing = [i for i in changed if found[i] is None]
        wanted = [positions[i] for i in missing]
        # On the device, only the pages not stored before are copied, a chunk at a time.
        new_pages = (self._fetch_pages(held.dev, wanted) if held.host is None
                     else (held.host[pos] for pos in wanted))
        written = 0
        for i, page in zip(missing, new_pages, strict=True):
            data = encode.encode_parts(page.reshape(-1), self.format)
            digest, key, new = _store_call(self.store.put_content, data, self.format)
            if new:
                written += page_raw
            stored = manifest.StoredPage(digest, key, _size(data))
            if keys[i] is not None:
                memo.put(keys[i], stored)
            found[i] = stored
        unchanged = len(order) - len(missing)
        if unchanged:
            self._count("pages_unchanged", unchanged)
        pages = manifest.EncodedPages(found)
        held.entry["page_ids"] = ids_json
        held.entry["pages"] = pages
        if fps is not None:
            if len(self._last_pages) >= _LAST_PAGES_MAX and slot not in self._last_pages:
                self._last_pages.clear()
            # copies: ids and fingerprints sit in a staging buffer that is given back
            self._last_pages[slot] = _LastPages(ids_now, fps_now.copy(), order,
                                                positions, ids_json, found, pages)
        return written

    #: Pages copied per section that a graph capture may wait for (capture_guard).
    _FETCH_PAGES = 64

    def _fetch_pages(self, dev: torch.Tensor, positions: list[int]) -> Iterator[torch.Tensor]:
        """Host copies of the gathered pages at ``positions`` of ``dev``, in that order,
        copied a chunk at a time on a stream of the writer's own: the host holds one
        chunk (not every new page of the call), a capture that begins waits for at most
        one such copy (``capture_guard``), and the caller's stream never."""
        if dev.device.type != "cuda":
            yield from (dev[pos] for pos in positions)
            return
        step = self._FETCH_PAGES
        for lo in range(0, len(positions), step):
            part = positions[lo:lo + step]
            with capture_guard.gpu_queries(block=True):
                stream = self._copy_streams.get(dev.device.index)
                if stream is None:  # our own; until it can be made, one of torch's pool
                    stream = stats_kernel.new_stream(dev.device.index)
                    if stream is not None:
                        stream = self._copy_streams.setdefault(dev.device.index, stream)
                    else:
                        stream = torch.cuda.Stream(device=dev.device)
                with torch.cuda.stream(stream):
                    idx = torch.tensor(part, dtype=torch.long).to(dev.device)
                    host = dev.index_select(0, idx).cpu()  # waits for this stream only
            yield from host.unbind(0)

    def _write(self, cap: CallCapture) -> None:
        for held in cap.held:
            cap.written_bytes += self._store_held(held)
        # CRASH_SAFE wrote a pending manifest under this key before the call
        _store_call(self.store.put_manifest, cap.manifest_key, manifest.dumps(cap.meta),
                    not self.crash_safe)
        self._note(cap)
        self._release_held(cap)
        self.store.budget.release(0, max(0, cap.reserved_bytes - cap.written_bytes))
        cap.reserved_bytes = cap.written_bytes
        self._count("manifests")
        self._count("bytes_written", cap.written_bytes)
        cap.done.set()

    def _note(self, cap: CallCapture) -> None:
        """Index a written call; a failure loses the index entry, not the call."""
        try:
            cap.index_key = self.index.note(cap.meta, cap.written_bytes, cap.index_key)
        except Exception:  # noqa: BLE001
            self._internal_error("index")
            self._count("index_errors")

    def _write_now(self, cap: CallCapture) -> None:
        """crash_safe: store inputs and a ``pending`` manifest before the call runs."""
        try:
            for held in cap.held:
                cap.written_bytes += self._store_held(held)
            self.store.put_manifest(cap.manifest_key, manifest.dumps(cap.meta))
            self._note(cap)
        except Exception:  # noqa: BLE001 - the call goes on; the writer retries later
            self._internal_error("crash_safe write")

    # -- flushing ------------------------------------------------------------
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every call handed to the writer is stored; whether all made it."""
        deadline = time.monotonic() + timeout_s
        if self._queue or self._unsettled:
            self._ensure_writer()
            self._wake.set()
        while self._queue or self._unsettled or not self._idle.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._wake.set()
            self._idle.wait(min(left, 0.05))
        self.store.budget.give_back()  # all written: the counter file says what we used
        return True

    def shutdown(self, timeout_s: float = 30.0) -> bool:
        """Finish in-flight calls as crashed, flush, and stop the writer."""
        self._finish_inflight("crashed")
        ok = self.flush(timeout_s)
        self._stopping = True
        self._wake.set()
        self.store.close()  # the budget's lease back; late releases go to the file
        return ok


def _store_call(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a store write: whatever it raises comes out as ``StoreFailed``
    (the breaker's cue; an encoding error raised before it is not the store's)."""
    try:
        return fn(*args)
    except Exception as exc:
        raise StoreFailed(f"{type(exc).__name__}: {exc}") from exc


def _staged_bytes(held: _Held) -> int:
    """Staging bytes ``held`` holds (pinned buffers are counted by their size class)."""
    return held.plain_bytes + sum(buf.numel() for buf in held.pinned)


def _host_view(buf: torch.Tensor, nbytes: int, dtype: torch.dtype, shape: Any) -> torch.Tensor:
    """A pinned buffer's first ``nbytes`` as a ``dtype`` tensor of ``shape``."""
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return buf[:nbytes].view(dtype).view(shape)


def _assign(held: _Held, outs: list, meta: bool, paged: bool) -> None:
    """Put a held call's host copies in place: ``outs`` in the order ``_to_host`` made
    them (pages unless left on the device, then ids and fingerprints: together as the
    fused kernel's ``meta``, or apart)."""
    if meta:
        host_meta = outs[-1]
        held.ids, held.fps = host_meta[:, 0], host_meta[:, 1:]
        if held.dev is None:
            held.host = outs[0]
        return
    if held.dev is not None:
        held.ids, held.fps = outs
        return
    held.host = outs[0]
    held.ids = outs[1] if paged else None
    held.fps = outs[2] if len(outs) > 2 else None


class _StagedEvent:
    """The event ``stage_copies`` recorded after a call's copies (the extension's own:
    waited on with the GIL let go, destroyed with the last held copy that refers to it)."""

    __slots__ = ("handle", "module")

    def __init__(self, module: Any, handle: int) -> None:
        self.module, self.handle = module, handle

    def synchronize(self) -> None:
        self.module.event_wait(self.handle)

    def __del__(self) -> None:
        try:
            self.module.event_free(self.handle)
        except Exception:  # noqa: BLE001, S110 - at exit the extension may be gone
            pass


def _arguments(bound: inspect.BoundArguments | dict) -> tuple[list, Any]:
    """[(name, kind, value)] without ``self``, and ``self`` (or None)."""
    out = []
    obj = None
    if isinstance(bound, inspect.BoundArguments):
        params = bound.signature.parameters
        items = [(name, _KIND_NAMES[params[name].kind], value)
                 for name, value in bound.arguments.items()]
    else:
        items = [(name, "keyword_only", value) for name, value in bound.items()]
    for i, (name, kind, value) in enumerate(items):
        if i == 0 and name == "self":
            obj = value
            continue
        out.append((name, kind, value))
    return out, obj


def _paged_plan(obj: Any, instance_id: str | None, plan_numel: dict) -> tuple | None:
    """(indices buffer, count) for a paged-KV wrapper object, else None."""
    buf = getattr(obj, "_paged_kv_indices_buf", None) if obj is not None else None
    if not isinstance(buf, torch.Tensor) or buf.dim() != 1:
        return None
    n = plan_numel.get(instance_id or "", buf.numel())
    return buf, min(n, buf.numel())


def _estimate(src: torch.Tensor, paged: tuple | None) -> int:
    """Upper bound of the bytes a tensor's objects take (budget reservation)."""
    if paged is not None:  # pages of shape[1:] (no src[0]: a view costs the caller ~5 us)
        return paged[1] * math.prod(src.shape[1:]) * src.element_size() if src.shape[0] else 0
    return encode.span_numel(src.shape, src.stride()) * src.element_size()


def _size(parts: list) -> int:
    return sum(memoryview(p).nbytes for p in parts)
