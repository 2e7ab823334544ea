"""Rows of the statistics buffer -> ``flashinfer.tensor_stats`` event attributes (pure).

Kept free of torch and OpenTelemetry so it runs anywhere and is tested on plain ints.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .layout import FINITE, INF, MASK, MAX, MIN, NAN, SEEN, SIGN, SUM

EVENT_NAME = "flashinfer.tensor_stats"
NONFINITE_ATTR = "flashinfer.nonfinite"
DROPPED_ATTR = "flashinfer.stats.dropped"

SCOPE_FULL = "full"
SCOPE_SAMPLED = "sampled"
SCOPE_PAGES = "referenced_pages"


@dataclass(frozen=True)
class RowMeta:
    """What the host knows about a row when launching: the argument name, the scope,
    and the tensor's full numel (the kernel reports how many elements it covered)."""

    name: str
    scope: str = SCOPE_FULL
    numel: int = 0


_ROW = struct.Struct("<QQdQQQQQ")  # one row as the kernel wrote it (csrc tensor_stats.h)
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
ROW_BYTES = _ROW.size
_NAN = float("nan")


def _bits_to_double(bits: int) -> float:
    return _F64.unpack(_U64.pack(bits & MASK))[0]


def _unkey(key: int) -> float:
    """Inverse of the kernel's order-preserving ``ord_key``."""
    key &= MASK
    bits = key ^ SIGN if key & SIGN else ~key & MASK
    return _bits_to_double(bits)


def _attrs(min_key: int, max_key: int, total: float, finite: int, nan: int, inf: int,
           seen: int, meta: Any) -> dict[str, Any]:
    """One event's attributes from a row's unsigned words (``total``: the finite sum).
    min/max/mean are left out when nothing was seen (empty tensor); min/max are NaN
    when every value was NaN, mean is NaN with no finite value."""
    name, scope, numel = meta if type(meta) is tuple else (meta.name, meta.scope, meta.numel)
    attrs: dict[str, Any] = {"flashinfer.tensor": name, "scope": scope}
    attrs["numel"] = seen if scope == SCOPE_PAGES else numel
    if scope == SCOPE_SAMPLED:
        attrs["sampled_numel"] = seen
    if seen:
        if min_key or max_key:
            attrs["min"] = _unkey(~min_key)
            attrs["max"] = _unkey(max_key)
        else:
            attrs["min"] = attrs["max"] = _NAN
        attrs["mean"] = total / finite if finite else _NAN
    attrs["nan_count"] = nan
    attrs["inf_count"] = inf
    return attrs


def decode_row(words: Sequence[int], meta: RowMeta) -> dict[str, Any]:
    """One event's attributes from a row of ``ROW_WORDS`` ints (signed or not)."""
    w = [int(x) & MASK for x in words]
    return _attrs(w[MIN], w[MAX], _bits_to_double(w[SUM]), w[FINITE], w[NAN], w[INF],
                  w[SEEN], meta)


def decode_rows(rows: Sequence[Sequence[int]], metas: Sequence[Any]) -> list[dict[str, Any]]:
    """Attributes of every row that has a meta (rows beyond ``metas`` are unused)."""
    return [decode_row(rows[i], meta) for i, meta in enumerate(metas)]


def decode_buffer(buf: Any, metas: Sequence[Any], offset: int = 0) -> list[dict[str, Any]]:
    """``decode_rows`` straight from the rows' bytes (a pinned slot's memory), one
    ``struct`` unpack per row: the background resolver runs this for every level-5
    call, and going through ``Tensor.tolist`` cost it more than the rest of the span.
    ``metas`` may be ``RowMeta`` or plain ``(name, scope, numel)`` tuples."""
    unpack = _ROW.unpack_from
    out = []
    for i, meta in enumerate(metas):
        min_key, max_key, total, finite, nan, inf, seen, _ = unpack(buf, offset + i * ROW_BYTES)
        out.append(_attrs(min_key, max_key, total, finite, nan, inf, seen, meta))
    return out


class RawStats(tuple):
    """``(rows, metas, offset, ts_ns)``: a call's statistics rows still as the kernel
    wrote them (a copy of the pinned slot from ``offset``), one meta per row.  The
    native span encoder turns them into ``flashinfer.tensor_stats`` events (and
    ``flashinfer.nonfinite``) itself, as ``decode_buffer`` would, with no Python per
    row; only that path is handed them (``StatsPending.apply_raw``)."""

    __slots__ = ()


def is_nonfinite(events: Sequence[dict[str, Any]]) -> bool:
    """Whether any tensor held a NaN or an Inf."""
    return any(e.get("nan_count", 0) or e.get("inf_count", 0) for e in events)
