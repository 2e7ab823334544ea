"""The statistics in plain torch ops: CPU tensors, and CUDA when the kernel cannot build.

Writes the same int64 row layout as csrc/ (see ``layout``) with device ops only, so a
CUDA fallback still never synchronises the host: no ``.item()``, no boolean indexing,
no data-dependent shapes (the referenced-pages mode masks instead of slicing).
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import FINITE, INF, MAX, MIN, NAN, ROW_WORDS, SEEN, SUM

_SIGN_I64 = -(1 << 63)  # SIGN as a signed int64 constant


def _key(d: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 key of float64 values (the kernel's ``ord_key``)."""
    b = d.view(torch.int64)
    return torch.where(b < 0, ~b, b | _SIGN_I64)


def _slot_limits(indptr: torch.Tensor, last_page_len: torch.Tensor, batch: int,
                 pos: torch.Tensor, page_size: int) -> torch.Tensor:
    """Filled slots of the page at each position ``pos`` of ``indices``: the request's
    ``last_page_len`` where it is that request's last page, else ``page_size``."""
    ends = indptr[1:batch + 1].to(torch.int64)
    request = torch.searchsorted(ends, pos, right=True).clamp_(max=max(batch - 1, 0))
    last = ends.index_select(0, request) - 1 == pos
    lens = last_page_len[:batch].to(device=pos.device, dtype=torch.int64)
    return torch.where(last, lens.index_select(0, request), page_size)


def _paged_values(cache: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
                  batch: int, last_page_len: torch.Tensor | None = None, slot_dim: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of every page ``indices[indptr[0]:indptr[batch]]`` names (ids outside the
    cache left out), and a validity mask; the bounds stay on the device (they change
    between graph replays).  With ``last_page_len`` and ``slot_dim``
    (``planning.SLOT_DIMS``) the slots of a request's last page past its last token are
    masked out, as the kernel does."""
    pos = torch.arange(indices.numel(), device=indices.device)
    lo = indptr[0].to(torch.int64)
    hi = indptr[batch].to(torch.int64)
    ids = indices.to(torch.int64)
    # A page id outside the cache names no data: it is left out, never read (the kernel
    # would fault on it, before the call whose bad indices a user is chasing).
    valid = (pos >= lo) & (pos < hi) & (ids >= 0) & (ids < cache.shape[0])
    pages = torch.where(valid, ids, 0)
    if cache.shape[0] == 0:
        empty = cache.new_zeros((0,), dtype=torch.float64)
        return empty, empty.bool()
    values = cache.index_select(0, pages.to(cache.device)).reshape(pages.numel(), -1)
    mask = valid.to(cache.device)[:, None].expand_as(values)
    page_dims = cache.shape[1:]
    if last_page_len is not None and batch > 0 and 0 < slot_dim <= len(page_dims):
        axis = len(page_dims) - slot_dim
        page_size = page_dims[axis]
        shape = [1] * len(page_dims)
        shape[axis] = page_size
        slots = torch.arange(page_size, device=cache.device).view(shape).expand(page_dims)
        limits = _slot_limits(indptr, last_page_len, batch, pos, page_size).to(cache.device)
        mask = mask & (slots.reshape(1, -1) < limits[:, None])
    return values.reshape(-1), mask.reshape(-1)


def row_of(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One int64 row (``ROW_WORDS``) over ``values`` (1-D), counting only ``mask``."""
    x = values.reshape(-1)
    if x.dtype != torch.float64:
        x = x.to(torch.float64)
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.reshape(-1)
    isnan = torch.isnan(x) & valid
    isinf = torch.isinf(x) & valid
    finite = valid & ~isnan & ~isinf
    has = valid & ~isnan
    inf64 = torch.full((), float("inf"), dtype=torch.float64, device=x.device)
    lo = torch.where(has, x, inf64).amin() if x.numel() else inf64
    hi = torch.where(has, x, -inf64).amax() if x.numel() else -inf64
    any_value = has.any()
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    row = torch.zeros(ROW_WORDS, dtype=torch.int64, device=x.device)
    row[MIN] = torch.where(any_value, ~_key(lo.reshape(1))[0], zero)
    row[MAX] = torch.where(any_value, _key(hi.reshape(1))[0], zero)
    row[SUM] = torch.where(finite, x, 0.0).sum().reshape(1).view(torch.int64)[0]
    row[FINITE] = finite.sum()
    row[NAN] = isnan.sum()
    row[INF] = isinf.sum()
    row[SEEN] = valid.sum()
    return row


#: dtypes whose CPU ``aminmax``/``sum`` are exact in their own type (float8 has neither).
_CPU_FAST = {torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
             torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool}


def _clean_cpu_row(x: torch.Tensor) -> torch.Tensor | None:
    """``row_of`` for a CPU tensor without NaN or Inf, in three passes over its own dtype
    (``row_of`` converts to float64 and masks, ~30x slower: 450 ms for 16M bf16 values,
    all of it on the caller's thread).  None: use ``row_of``.  On the CPU the host may
    read a result, which a CUDA tensor's path must never do."""
    if x.dtype not in _CPU_FAST or x.numel() == 0:
        return None
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    elif x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return None  # NaN/Inf: the masked path counts them
    lo, hi = torch.aminmax(x)
    n = x.numel()
    row = torch.zeros(ROW_WORDS, dtype=torch.int64)
    row[MIN] = ~_key(lo.to(torch.float64).reshape(1))[0]
    row[MAX] = _key(hi.to(torch.float64).reshape(1))[0]
    row[SUM] = x.sum(dtype=torch.float64).reshape(1).view(torch.int64)[0]
    row[FINITE] = n
    row[SEEN] = n
    return row


def _umax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Maximum of int64 words compared as unsigned (how the kernel's atomics compare)."""
    return torch.maximum(a ^ _SIGN_I64, b ^ _SIGN_I64) ^ _SIGN_I64


def merge_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Combine two rows as the kernel's atomics would (k and v of one cache)."""
    out = a + b  # counts
    out[MIN] = _umax(a[MIN], b[MIN])
    out[MAX] = _umax(a[MAX], b[MAX])
    sa = a[SUM:SUM + 1].view(torch.float64)
    sb = b[SUM:SUM + 1].view(torch.float64)
    out[SUM] = (sa + sb).view(torch.int64)[0]
    return out


def tensor_row(t: torch.Tensor, step: int = 1, indices: torch.Tensor | None = None,
               indptr: torch.Tensor | None = None, batch: int = 0,
               last_page_len: torch.Tensor | None = None, slot_dim: int = 0) -> torch.Tensor:
    """The row for one tensor in full, sampled (``step`` > 1) or referenced-pages mode."""
    if indices is not None and indptr is not None:
        values, mask = _paged_values(t, indices, indptr, batch, last_page_len, slot_dim)
        return row_of(values, mask)
    flat = t.reshape(-1)
    if step > 1:
        flat = flat[::step]
    if flat.device.type == "cpu":
        row = _clean_cpu_row(flat)
        if row is not None:
            return row
    return row_of(flat)


def fill_rows(out: torch.Tensor, jobs: list[Any]) -> None:
    """Fill ``out`` ([rows, ROW_WORDS] int64, same device) for ``jobs`` (``Job`` objects:
    row, tensor, step, indices, indptr, batch, last_page_len, slot_dim); rows shared by
    several jobs are merged."""
    out.zero_()
    rows: dict[int, torch.Tensor] = {}
    for job in jobs:
        r = tensor_row(job.tensor, job.step, job.indices, job.indptr, job.batch,
                       job.last_page_len, job.slot_dim).to(out.device)
        rows[job.row] = merge_rows(rows[job.row], r) if job.row in rows else r
    for index, r in rows.items():
        out[index].copy_(r)

