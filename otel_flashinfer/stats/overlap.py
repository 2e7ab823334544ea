"""Captured calls whose inputs' statistics run beside the call, on a forked branch.

Inside a CUDA graph a branch costs no host time per replay, and an attention call reads
its KV cache at well under the GPU's bandwidth (a decode: about 1.8 of the H200's
4.8 TB/s).  The inputs' statistics read the same bytes, so on the call's stream they
about double a captured decode; beside it they mostly hide in the bandwidth the call
leaves.  That is only right for a call that writes none of the inputs it is given:
the allow-list below names the FlashInfer APIs that read their inputs only, and a call
handed an output buffer (``out``, ``lse``) stays on its stream.  Eager calls never fork:
the two events a fork needs cost the caller more than the launch it moves.

The branch is a stream of our own per device and capturing thread, made before a capture
begins (``prepare``): making one while a capture runs could be an unsafe call for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from . import kernel as _kernel

__all__ = ["BRANCH_SM_SHARE", "MIN_BYTES", "READ_ONLY_APIS", "branch", "branch_sms",
           "may_fork", "prepare"]

#: FlashInfer APIs (span names) that read every tensor they are given, apart from the
#: output buffers in ``WRITTEN_ARGS``.
READ_ONLY_APIS = frozenset({
    "BatchDecodeWithPagedKVCacheWrapper.run",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.run",
    "BatchPrefillWithPagedKVCacheWrapper.run",
    "BatchPrefillWithRaggedKVCacheWrapper.run",
    "single_decode_with_kv_cache",
    "single_prefill_with_kv_cache",
})
#: Arguments that are written by the call when given.
WRITTEN_ARGS = frozenset({"out", "lse", "output"})
#: Below this many input bytes the call's own launch costs more than the branch saves.
MIN_BYTES = 1 << 20

#: The share of the GPU's multiprocessors a branch's launch is sized for (its wave of
#: blocks; 1.0: all, as on the call's stream).  A smaller wave leaves room for the call's
#: own blocks beside it; what share is best is measured on the device
#: (``bench_graph_step.py --branch-share``), so it is a module setting, not a variable.
BRANCH_SM_SHARE = 1.0

#: Branch streams made at most (one per device and capturing thread; never destroyed).
MAX_BRANCHES = 64

_lock = threading.Lock()
_branches: dict[tuple[int, int], Any] = {}


def may_fork(api: str | None, names: Iterable[str], nbytes: int) -> bool:
    """Whether a captured call's inputs' statistics may run beside it (pure)."""
    if api not in READ_ONLY_APIS or nbytes < MIN_BYTES:
        return False
    return not any(name.split(".", 1)[0] in WRITTEN_ARGS for name in names)


def prepare(device: int | None = None) -> None:
    """Make this thread's branch stream on ``device`` (the current one) before a capture
    begins.  A stream of our own (the statistics extension's ``new_stream``), not one of
    torch's pool, which anyone may be handed; one per capturing thread, so that two
    captures at once never share a branch (that would merge them).  Never raises:
    without a branch, calls stay on their stream."""
    try:
        index = torch.cuda.current_device() if device is None else int(device)
        key = (index, threading.get_ident())
        if key in _branches or len(_branches) >= MAX_BRANCHES:
            return
        stream = _kernel.new_stream(index)  # not waited for: until built, nothing forks
        if stream is None:
            return
        with _lock:
            _branches.setdefault(key, stream)
    except Exception:  # noqa: BLE001 - no branch: the statistics stay on the call's stream
        return


def branch(device: int) -> Any:
    """This thread's branch stream on ``device``, or None when ``prepare`` made none
    (under a capture nothing is made: a new stream could invalidate it)."""
    return _branches.get((device, threading.get_ident()))


def branch_sms(sm_count: int, share: float | None = None) -> int:
    """Multiprocessors a branch's launch is sized for on a device of ``sm_count``: 0 (all)
    at a share of 1 or more, else at least one (pure)."""
    share = BRANCH_SM_SHARE if share is None else share
    if share >= 1.0 or sm_count <= 0:
        return 0
    return max(1, round(sm_count * max(share, 0.0)))
