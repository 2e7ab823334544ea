"""Finds, builds and caches the statistics kernel (csrc/), never raising into the caller.

Built with ``torch.utils.cpp_extension.load`` into
``~/.cache/otel_flashinfer/torch_ext/<source hash>_<torch>_<cuda>_sm<arch>/`` (the same
keying FlashInfer's JIT cache uses), only for the local GPU's architecture.  A build
takes tens of seconds, so the first caller only starts it on a background thread
and gets ``None`` (the torch-op path) until it has finished; ``get(wait=True)``
blocks instead (tests, benchmarks, ``warmup``).  A missing compiler or a failed
build is reported once and leaves the torch-op path in place for good.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .. import health, threads
from ..config import jit_cache_root
from ..jit_lock import build_lock

SOURCES = ("tensor_stats.cpp", "stats_hooks.cpp", "tensor_stats_kernel.cu",
           "page_fingerprint.cu", "blob_staging.cpp", "gate_nodes.cpp", "lean_graph.cpp")
HEADERS = ("tensor_stats.h", "stats_launch.h", "stats_api.h", "py_defer.h", "lean_rules.h")

_lock = threading.Lock()
_done = threading.Event()
_module: ModuleType | None = None
_thread: threading.Thread | None = None
_failed = False
_ready_callbacks: list[Callable[[ModuleType], None]] = []


def source_dir() -> Path | None:
    """csrc/ as installed (package ``otel_flashinfer._csrc``) or next to the package."""
    installed = Path(__file__).resolve().parents[1] / "_csrc"
    if (installed / SOURCES[0]).is_file():
        return installed
    try:
        from importlib.resources import files

        base = files("otel_flashinfer._csrc")
        path = Path(str(base))
        if (path / SOURCES[0]).is_file():
            return path
    except (ImportError, ModuleNotFoundError, TypeError, ValueError):
        pass
    repo = Path(__file__).resolve().parents[2] / "csrc"
    return repo if (repo / SOURCES[0]).is_file() else None


def cache_root() -> Path:
    """Where builds are kept; ``OTEL_FLASHINFER_CACHE_DIR`` overrides the default."""
    return Path(jit_cache_root()) / "torch_ext"


def _build() -> ModuleType | None:
    import torch
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        health.report("stats_kernel_unavailable", "statistics kernel sources not found")
        return None
    if cpp_extension.CUDA_HOME is None or not torch.cuda.is_available():
        health.report("stats_kernel_unavailable", "no CUDA compiler; statistics use torch ops")
        return None
    major, minor = torch.cuda.get_device_capability()
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update((src / name).read_bytes())
    tag = f"{digest.hexdigest()[:16]}_{torch.__version__}_{torch.version.cuda}_sm{major}{minor}"
    build_dir = cache_root() / tag.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        with build_lock(build_dir):
            return cpp_extension.load(
                name=f"otel_fi_stats_{digest.hexdigest()[:12]}",
                sources=[str(src / name) for name in SOURCES],
                extra_include_paths=[str(src)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-std=c++17"],
                build_directory=str(build_dir),
                verbose=False,
            )
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch


def _worker() -> None:
    global _module, _failed
    try:
        _module = _build()
        _failed = _module is None
    except Exception as exc:  # noqa: BLE001 - a build failure must not reach the engine
        _failed = True
        health.report("stats_kernel_build_failed", "statistics kernel did not build", exc)
    finally:
        # Listeners run before ``get`` reports the module, so whoever waited for it
        # finds them done; one that registers meanwhile is run in the next pass.
        while True:
            with _lock:
                callbacks = list(_ready_callbacks)
                _ready_callbacks.clear()
                if not callbacks:
                    _done.set()
                    break
            if _module is not None:
                for callback in callbacks:
                    _call(callback, _module)


def _call(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # noqa: BLE001 - a listener's failure stays its own
        health.report("stats_errors", "a statistics-kernel listener failed", exc)


def when_ready(callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` once the extension is built: now if it already is, else on
    the build thread; never when it cannot be built."""
    with _lock:
        if not _done.is_set():
            _ready_callbacks.append(callback)
            return
    if _module is not None:
        _call(callback, _module)


def get(wait: bool = False, timeout: float | None = None) -> ModuleType | None:
    """The compiled extension, or ``None`` while building / when it cannot be built."""
    global _thread
    if _done.is_set():
        return _module
    with _lock:
        if _thread is None and not _done.is_set():
            _thread = threads.start(
                threading.Thread(target=_worker, name="otel-fi-stats-build", daemon=True))
    if wait:
        _done.wait(timeout)
    return _module if _done.is_set() else None


def new_stream(device: int) -> Any:
    """A CUDA stream of our own on ``device`` (the extension's ``new_stream``, never
    destroyed), or None until the extension is built.  torch's pool streams go to
    anyone: work we queue there could share a stream with the application's."""
    module = get()
    make = getattr(module, "new_stream", None)
    if make is None:
        return None
    import torch

    return torch.cuda.ExternalStream(make(int(device)), device=torch.device("cuda", device))


def warmup() -> None:
    """Start building in the background (call from ``instrument()`` at level 5)."""
    get(wait=False)


def disabled() -> bool:
    """True once the kernel is known to be unavailable (torch ops for good)."""
    return _done.is_set() and _failed
