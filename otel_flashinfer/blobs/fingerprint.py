"""Page fingerprints, computed where the pages are, so that level 10 hashes and stores
only the pages of a paged KV cache that it has not stored before.

A decode step writes one token into the last page of each sequence: of the hundreds of
pages a call references, a handful change.  Each call still copies every referenced page
to the host (an asynchronous copy, no CPU), but the writer threads used to encode and
sha256 every one of them (32 MB a call in the benchmark, most of level 10's whole cost).
A fingerprint per page, two lanes of a multiply-add hash (mod 2**64) over its 32-bit
halves with fixed random odd 64-bit weights, is a few kernels on the GPU.  Pages whose
fingerprint the writer has seen before reuse that page's object (``PageMemo``); the
others are hashed and stored as before, so every object is still named by the sha256
of its bytes.

Why halves, not the 64-bit words themselves: over whole words a change confined to
the top bit is 2**63 times an odd weight, i.e. always 2**63, so two such changes in a
page (two fp16 sign flips four elements apart) cancelled in both lanes and the page
was taken for the old one.  A half's change is nonzero and under 2**32 in size, so at
most 31 of its low bits are zero: each lane then misses a given change with
probability at most 2**-32 over its weights, and the two lanes together 2**-64, for
data not built to collide.  Any one changed half always changes both lanes.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from typing import Any

import torch

from . import store

LANES = 2
#: Fingerprints remembered per recorder (least recently used go first).
MEMO_ENTRIES = 1 << 16
_SEED = 0x0F1A5E
_weights: dict[tuple[str, int, int], torch.Tensor] = {}


def weights(device: torch.device, words: int) -> torch.Tensor:
    """The (LANES, words) int64 weights for pages of ``words`` halves, odd, fixed for the
    process (the memo that compares fingerprints is the process's own).  Made where they
    are used, by a kernel on the current stream: a copy from host memory would make the
    caller wait for the GPU.  Kept per stream, so that no stream reads them before the
    kernel that wrote them ran."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, words)
    w = _weights.get(key)
    if w is None:
        generator = torch.Generator(device=device).manual_seed(_SEED)
        w = torch.randint(-(2**62), 2**62, (LANES, words), generator=generator,
                          dtype=torch.int64, device=device).bitwise_or_(1)
        _weights[key] = w
    return w


def page_fingerprints(pages: torch.Tensor) -> torch.Tensor | None:
    """(n, LANES) int64 fingerprints of the ``n`` pages along dim 0, on their device and
    stream; None when a page is not a whole number of 8-byte words (then every page is
    hashed, as without fingerprints)."""
    n = pages.shape[0]
    flat = pages.reshape(n, -1) if n else pages.reshape(0, 0)
    nbytes = flat.shape[1] * flat.element_size()
    if n == 0 or nbytes == 0 or nbytes % 8 or not flat.is_contiguous():
        return None
    # Each 32-bit half widened to int64 (signed: a change stays under 2**32 in size).
    halves = flat.view(torch.uint8).view(torch.int32).to(torch.int64)
    w = weights(halves.device, halves.shape[1])
    # Lane by lane: one page-sized temporary at a time, wrapping int64 arithmetic.
    return torch.stack([(halves * w[lane]).sum(dim=1) for lane in range(LANES)], dim=1)


def gather_fused(module: Any, cache: torch.Tensor, indices: torch.Tensor,
                 n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pages, meta) from the extension's one-launch gather (``module``: the statistics
    extension, None until built): the pages that ``indices[:n]`` reference (clamped to
    the cache), and per page int64 (id, lane 0, lane 1), the lanes equal to
    ``page_fingerprints`` of those pages.  None where the kernel does not apply (no
    extension, a cache that is not contiguous, 8-byte aligned pages of whole 8-byte
    words, indices on another device or of another dtype): then the torch ops."""
    fused = getattr(module, "gather_fingerprints", None)
    if fused is None or cache.dim() < 2 or not cache.shape[0] or not cache.is_contiguous():
        return None
    if (indices.device != cache.device or indices.dim() != 1 or not indices.is_contiguous()
            or indices.dtype not in (torch.int32, torch.int64)):
        return None
    page_bytes = math.prod(cache.shape[1:]) * cache.element_size()  # no cache[0]: a view
    if not page_bytes or page_bytes % 8 or cache.data_ptr() % 8:
        return None  # the kernel reads 32-bit halves: a view at an odd offset cannot
    pages, meta = fused(cache, indices, int(n), weights(cache.device, page_bytes // 4))
    return pages, meta


class PageMemo:
    """Fingerprint -> the stored object of a page with those bytes, bounded (LRU); shared
    by the writer threads.  A key is ``(lane 0, lane 1, kind)``: ``kind`` numbers what
    a stored page depends on besides its bytes (``kind``)."""

    def __init__(self, entries: int = MEMO_ENTRIES) -> None:
        self.entries = max(1, entries)
        self._memo: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._kinds: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._born = time.monotonic()

    def kind(self, pages: torch.Tensor, fmt: str) -> int:
        """Dtype, page shape and format of the gathered [n, *page] ``pages``, as a small
        number (hashed once per call, not once per page)."""
        key = (str(pages.dtype), tuple(pages.shape[1:]), fmt)
        with self._lock:
            return self._kinds.setdefault(key, len(self._kinds))

    def clear(self) -> None:
        """Forget every stored page (the store may have lost them)."""
        with self._lock:
            self._memo.clear()
            self._born = time.monotonic()

    def lookup(self, keys: list[tuple]) -> list[Any]:
        """What each key's page was stored as, or None (one lock for a call's pages).
        Trusted for the store's ``KNOWN_FOR_S`` from when the memo was last emptied, as
        whole objects are: a store can lose objects (a retention rule, a bucket made
        again), and a manifest must not cite a page it no longer holds."""
        memo = self._memo
        with self._lock:  # the loops run in C: a call has hundreds of pages
            if time.monotonic() - self._born > store.KNOWN_FOR_S:
                memo.clear()
                self._born = time.monotonic()
            out = list(map(memo.get, keys))
            collections.deque(map(memo.move_to_end, itertools.compress(keys, out)), maxlen=0)
        return out

    def put(self, key: tuple, stored: Any) -> None:
        with self._lock:
            self._memo[key] = stored
            self._memo.move_to_end(key)
            while len(self._memo) > self.entries:
                self._memo.popitem(last=False)

    def __len__(self) -> int:
        return len(self._memo)
