"""Which tensors of a call get statistics, in which output row and how (full, sampled,
referenced pages): pure planning on the caller's thread, no CUDA calls.

``_plan_flat`` builds the flat lists the kernel's fast path takes (``ITEM_INTS`` ints
per tensor); ``plan`` gives the same decisions as ``Job`` objects for the general path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .decode import SCOPE_FULL, SCOPE_PAGES, SCOPE_SAMPLED, RowMeta
from .layout import KERNEL_DTYPES

_SUPPORTED = {getattr(torch, name) for name in KERNEL_DTYPES if hasattr(torch, name)}


#: FlashInfer's ``kv_layout`` -> where a page's slot (token) axis is, counted from the
#: end of the page's dims: NHD pages are ``[..., page_size, heads, dim]``, HND pages
#: ``[..., heads, page_size, dim]``.
SLOT_DIMS = {"NHD": 3, "HND": 2}


@dataclass(frozen=True)
class PagedSpec:
    """A paged KV-cache argument: statistics cover only the pages that
    ``indices[indptr[0]:indptr[batch]]`` reference, read on the device.

    ``cache`` is ``[num_pages, ...]`` or a ``(k, v)`` pair of such tensors (one row).
    With ``last_page_len`` (int32 ``[batch]``) and ``slot_dim`` (``SLOT_DIMS``), the
    slots of each request's last page past its last token are left out: they hold
    whatever an earlier request left there, not this call's data.
    """

    name: str
    cache: Any
    indices: torch.Tensor
    indptr: torch.Tensor
    batch: int
    last_page_len: torch.Tensor | None = None
    slot_dim: int = 0


@dataclass
class Job:
    """One tensor read into output row ``row``."""

    row: int
    tensor: torch.Tensor
    step: int = 1
    indices: torch.Tensor | None = None
    indptr: torch.Tensor | None = None
    batch: int = 0
    last_page_len: torch.Tensor | None = None
    slot_dim: int = 0


#: An entry: ``(name, value)``, a ``PagedSpec``, or the same paged argument as a plain
#: tuple ``(name, cache, indices, indptr, batch, last_page_len, slot_dim)`` (what the
#: hooks build: no dataclass; the last two may be left off).
Entry = tuple[str, Any] | PagedSpec | tuple[Any, ...]

#: ints per tensor in the flat launch list (csrc ``kSlotItemInts``): tensor index, row,
#: step, indices index (-1: none), indptr index (-1: none), batch, last_page_len index
#: (-1: none), slot_dim.
ITEM_INTS = 8
_TENSOR = torch.Tensor
_FULL_OR_SAMPLED = (SCOPE_FULL, SCOPE_SAMPLED)


def _plan_flat(entries: Iterable[Entry], max_bytes: float, max_rows: int, row0: int = 0
               ) -> tuple[list[Any], list[int], list[tuple[str, str, int]], int]:
    """Entries -> (tensors, flat items, one ``(name, scope, numel)`` per row, left out).

    The one planner behind ``plan`` and the kernel's fast path: ``items`` holds
    ``ITEM_INTS`` ints per tensor read, rows numbered from ``row0``, index fields
    pointing into ``tensors``.  Non-tensors and dtypes without a statistic are skipped."""
    tensors: list[Any] = []
    items: list[int] = []
    metas: list[tuple[str, str, int]] = []
    left_out = 0
    supported = _SUPPORTED
    for entry in entries:
        last_page_len, slot_dim = None, 0
        if isinstance(entry, PagedSpec):
            name, cache, indices, indptr, batch = (entry.name, entry.cache, entry.indices,
                                                   entry.indptr, entry.batch)
            last_page_len, slot_dim = entry.last_page_len, entry.slot_dim
        elif len(entry) == 7:
            name, cache, indices, indptr, batch, last_page_len, slot_dim = entry
        elif len(entry) == 5:
            name, cache, indices, indptr, batch = entry
        else:
            name, t = entry
            if not isinstance(t, _TENSOR) or t.dtype not in supported:
                continue
            if len(metas) >= max_rows:
                left_out += 1
                continue
            numel = t.numel()
            step = 1
            if numel * 8 > max_bytes:  # no dtype is wider than 8 bytes
                item = t.element_size()
                if numel * item > max_bytes:
                    step = math.ceil(numel / max(1, int(max_bytes // item)))
            metas.append((name, _FULL_OR_SAMPLED[step > 1], numel))
            items += (len(tensors), row0 + len(metas) - 1, step, -1, -1, 0, -1, 0)
            tensors.append(t)
            continue
        parts = cache if isinstance(cache, (tuple, list)) else (cache,)
        parts = [p for p in parts if isinstance(p, _TENSOR) and p.dtype in supported]
        if not parts:
            continue
        if len(metas) >= max_rows:
            left_out += 1
            continue
        row = row0 + len(metas)
        metas.append((name, SCOPE_PAGES, 0))
        first = len(tensors)
        tensors += parts
        tensors.append(indices)
        tensors.append(indptr)
        ix = first + len(parts)
        lx = -1
        if isinstance(last_page_len, _TENSOR) and slot_dim > 0:
            lx = len(tensors)
            tensors.append(last_page_len)
        else:
            slot_dim = 0
        batch = int(batch)
        for k in range(len(parts)):
            items += (first + k, row, 1, ix, ix + 1, batch, lx, slot_dim)
    return tensors, items, metas, left_out


def _jobs_of(tensors: list[Any], items: list[int], row0: int = 0) -> list[Job]:
    jobs = []
    for k in range(0, len(items), ITEM_INTS):
        ti, row, step, ii, pi, batch, li, slot_dim = items[k:k + ITEM_INTS]
        jobs.append(Job(row - row0, tensors[ti], step, tensors[ii] if ii >= 0 else None,
                        tensors[pi] if pi >= 0 else None, batch,
                        tensors[li] if li >= 0 else None, slot_dim))
    return jobs


def _flat_of(jobs: Sequence[Job]) -> tuple[list[Any], list[int]]:
    tensors: list[Any] = []
    items: list[int] = []
    for job in jobs:
        items += (len(tensors), job.row, job.step, -1, -1, job.batch, -1, 0)
        tensors.append(job.tensor)
        if job.indices is not None:
            items[-5] = len(tensors)
            items[-4] = len(tensors) + 1
            tensors.append(job.indices)
            tensors.append(job.indptr)
            if job.last_page_len is not None and job.slot_dim > 0:
                items[-2] = len(tensors)
                items[-1] = job.slot_dim
                tensors.append(job.last_page_len)
    return tensors, items


def plan(entries: Iterable[Entry], max_bytes: float, max_rows: int
         ) -> tuple[list[Job], list[RowMeta], int]:
    """Entries -> (jobs, one meta per row, number of tensors left out for lack of rows).

    Non-tensors and dtypes without a statistic (complex, ...) are skipped."""
    tensors, items, metas, left_out = _plan_flat(entries, max_bytes, max_rows)
    return _jobs_of(tensors, items), [RowMeta(*m) for m in metas], left_out


def _kernel_can_run(jobs: Sequence[Job]) -> bool:
    for job in jobs:
        if job.indices is not None and (
            job.indices.dtype != torch.int32 or job.indptr is None
            or job.indptr.dtype != torch.int32 or not job.indices.is_contiguous()
            or not job.indptr.is_contiguous() or job.indices.device != job.tensor.device
            or job.indptr.device != job.tensor.device
            or (job.last_page_len is not None and (
                job.last_page_len.dtype != torch.int32 or not job.last_page_len.is_contiguous()
                or job.last_page_len.device != job.tensor.device
                or job.last_page_len.numel() < job.batch))
        ):
            return False
    return True


def _to_cpu(job: Job) -> Job:
    """Index buffers of a CPU cache may live anywhere; statistics of CPU tensors are CPU."""
    if job.indices is None or job.indices.device.type == "cpu":
        return job
    lpl = job.last_page_len.cpu() if job.last_page_len is not None else None
    return Job(job.row, job.tensor, job.step, job.indices.cpu(), job.indptr.cpu(), job.batch,
               lpl, job.slot_dim)
