"""``flashinfer.gpu.time_ns``: how long a call's kernels took on the GPU, read without
a host sync.

A span's host times cover the launch only.  From level 3, each eager call on a CUDA
tensor records a pooled CUDA event before and after it on the caller's stream
(``csrc/event_pool.cpp``: about one ``cudaEventRecord`` each, no allocation); the
pipeline's worker polls the end event and reads the elapsed time once it completed.
A failed event (an illegal address in that call's kernels) marks the span with
``flashinfer.cuda_error`` instead of a number, pointing at the launch that failed.

The extension compiles in a background thread on first use; until it is ready, or
where no compiler exists, spans say ``flashinfer.gpu.time_unavailable``.

At level 5 the C++ statistics hooks time a call themselves (the GPU clock stamped by
its two statistics launches, ``stats.pending``), and the hot path records no events.
"""

from __future__ import annotations

import hashlib
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from . import capture_guard, cuda_errors, health, threads
from .config import jit_cache_root
from .jit_lock import build_lock
from .pipeline import TIME_ATTR, UNAVAILABLE_ATTR, CallRecord

_ext: Any = None
_state = "unloaded"  # unloaded | compiling | ready | failed
_lock = threading.Lock()


def _source() -> Path:
    installed = Path(__file__).resolve().parent / "_csrc" / "event_pool.cpp"
    if installed.exists():
        return installed
    try:
        path = Path(str(resources.files("otel_flashinfer._csrc") / "event_pool.cpp"))
        if path.exists():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "csrc" / "event_pool.cpp"


def cache_dir(tag: str, source: Path) -> Path:
    """Build folder keyed by the hash of the source and the headers next to it, like
    FlashInfer's JIT cache."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):
        digest.update(header.read_bytes())
    digest = digest.hexdigest()[:16]
    path = Path(jit_cache_root()) / f"{tag}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile() -> None:
    global _ext, _state
    try:
        from torch.utils.cpp_extension import load

        source = _source()
        build_dir = cache_dir("event_pool", source)
        with build_lock(build_dir):
            ext = load(name="otel_flashinfer_event_pool", sources=[str(source)],
                       build_directory=str(build_dir), with_cuda=True,
                       extra_cflags=["-O2"], verbose=False)
        if getattr(ext, "NOT_READY", None) != NOT_READY:
            raise RuntimeError("the event pool's NOT_READY differs from gpu_timing's")
        # Events are created here, in the background, not on the first traced calls.
        with capture_guard.gpu_queries(block=True):
            ext.prewarm()
        _ext = ext
        _state = "ready"
        from . import native

        native.register_api(ext.hotpath_api)
    except Exception as exc:  # noqa: BLE001 - no compiler: spans say so
        _state = "failed"
        health.report("gpu_timing_unavailable", "could not build the CUDA event pool; "
                      "GPU times are not recorded", exc)


def start_loading(block: bool = False) -> None:
    """Build/load the extension in the background (or now, with ``block``)."""
    global _state
    with _lock:
        if _state != "unloaded":
            return
        _state = "compiling"
    if block:
        _compile()
    else:
        threads.start(threading.Thread(target=_compile, name="otel_flashinfer-jit", daemon=True))


def wait_ready(timeout_s: float = 600.0) -> bool:
    """For tests and benchmarks: wait until the extension is built."""
    import time

    start_loading()
    deadline = time.monotonic() + timeout_s
    while _state == "compiling" and time.monotonic() < deadline:
        time.sleep(0.05)
    return _state == "ready"


#: ``resolve``'s answer while the end event is pending (csrc/event_pool.cpp kNotReady).
NOT_READY = -(1 << 40)


class GpuTime:
    """Pending GPU time of one call (or one graph replay) between two pooled events.

    One ``resolve`` (a single cudaEventElapsedTime) per poll: each CUDA call the
    background thread makes takes the driver lock the engine's launches also need."""

    __slots__ = ("end", "result", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.result = NOT_READY

    def ready(self) -> bool:
        if self.result == NOT_READY:
            self.result = _ext.resolve(self.start, self.end)
        return self.result != NOT_READY

    def apply(self, record: CallRecord) -> None:
        ext = _ext
        try:
            result = self.result
            if result == NOT_READY:
                result = ext.resolve(self.start, self.end)
            if result >= 0:
                record.attributes[TIME_ATTR] = result
                return
            if result == NOT_READY:  # applied without waiting (never by the pipeline)
                record.attributes[UNAVAILABLE_ATTR] = "not_ready"
                return
            status = ext.query(self.end)  # rare: a failed stream, or untimeable events
            if status < 0:
                cuda_errors.mark(record.attributes, ext.error_name(status))
                record.attributes[UNAVAILABLE_ATTR] = "cuda_error"
            else:
                record.attributes[UNAVAILABLE_ATTR] = "elapsed_failed"
        finally:
            ext.release(self.start)
            ext.release(self.end)

    def abandon(self, record: CallRecord, reason: str) -> None:
        record.attributes[UNAVAILABLE_ATTR] = reason
        _ext.release(self.start)
        _ext.release(self.end)


_REASONS = {-1: "event_pool_full", -3: "event_record_failed"}


class Timer:
    """Event-pair timing on the current stream; used per call and per graph replay."""

    def begin(self) -> int:
        ext = _ext  # set once the pool is built, before _state says "ready"
        return ext.record() if ext is not None else -2

    def end(self, start: int) -> Any:
        """A Pending for the pair begun at ``start`` (graph replays)."""
        handle = self.end_handle(start)
        return GpuTime(handle >> 16, handle & 0xFFFF) if type(handle) is int else handle

    def end_handle(self, start: int) -> int | Unavailable:
        """The pair begun at ``start`` packed into one int (``start << 16 | end``), or
        why there is none.  Traced calls keep the int (``CallRecord.gpu``): it leaves no
        object behind for the garbage collector."""
        if start == -2:
            return Unavailable("compiling" if _state == "compiling" else "no_extension")
        if start < 0:
            return Unavailable(_REASONS.get(start, "event_pool_full"))
        end = _ext.record()
        if end < 0:
            _ext.release(start)
            return Unavailable(_REASONS.get(end, "event_pool_full"))
        return start << 16 | end


class Unavailable:
    """A GPU time that will not come, and why (never a wrong number)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def ready(self) -> bool:
        return True

    def apply(self, record: CallRecord) -> None:
        record.attributes[UNAVAILABLE_ATTR] = self.reason

    def abandon(self, record: CallRecord, reason: str) -> None:
        self.apply(record)


timer = Timer()


class _Handles:
    """Resolves ``CallRecord.gpu`` (``Timer.end_handle``) for the pipeline
    (``pipeline.Pipeline.gpu_times``), which asks ``ready`` and then ``apply`` for the
    same handle: the last answer is kept so that a call costs one driver call."""

    def __init__(self) -> None:
        self._last: tuple[int, int] = (-1, NOT_READY)

    def ready(self, handle: int) -> bool:
        result = _ext.resolve(handle >> 16, handle & 0xFFFF)
        self._last = (handle, result)  # one tuple: read back whole by apply
        return result != NOT_READY

    def apply(self, record: CallRecord, handle: int) -> None:
        pending = GpuTime(handle >> 16, handle & 0xFFFF)
        last_handle, result = self._last
        if last_handle == handle:
            pending.result = result
        pending.apply(record)

    def abandon(self, record: CallRecord, handle: int, reason: str) -> None:
        GpuTime(handle >> 16, handle & 0xFFFF).abandon(record, reason)


HANDLES = _Handles()


def _on_cuda(args: tuple[Any, ...], kwargs: dict[str, Any], tensor_type: type) -> bool:
    for value in args:
        if isinstance(value, tensor_type):
            if value.is_cuda:
                return True
        elif isinstance(value, (tuple, list)) and value and isinstance(value[0], tensor_type):
            if value[0].is_cuda:
                return True
    for value in kwargs.values():
        if isinstance(value, tensor_type) and value.is_cuda:
            return True
    return False


class NativeTimer:
    """What the C hot path (``native``) asks of Python for GPU timing: it records the
    events itself once the pool is built, and comes here only for what will not come."""

    def __init__(self, tensor_type: type) -> None:
        self._tensor_type = tensor_type

    def unavailable(self, code: int) -> Unavailable:
        return Unavailable(_REASONS.get(code, "event_pool_full"))

    def unready(self, record: CallRecord, args: tuple, kwargs: dict) -> None:
        """A CUDA call while the pool compiles (or after it failed)."""
        if _on_cuda(args, kwargs, self._tensor_type):
            record.add_pending(Unavailable("compiling" if _state == "compiling"
                                           else "no_extension"))


def make_hooks() -> tuple[Any, Any] | None:
    """(before, after) for the span wrapper, or None where CUDA is absent."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    start_loading()
    tensor_type = torch.Tensor
    from . import graphs

    begin, end_handle = timer.begin, timer.end_handle

    def before(record: CallRecord, plan: Any, args: tuple, kwargs: dict) -> Any:
        if graphs._capturing is not None and graphs.capture_state() is not None:
            return None
        return begin() if _on_cuda(args, kwargs, tensor_type) else None

    def after(record: CallRecord, state: Any, result: Any, error: Any) -> None:
        if state is None:
            return
        handle = end_handle(state)
        if type(handle) is int:
            record.gpu = handle
        else:
            record.add_pending(handle)

    before.native = NativeTimer(tensor_type)  # type: ignore[attr-defined]
    return before, after
