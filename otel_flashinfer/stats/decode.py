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


def _bits_to_double(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits & MASK))[0]


def _unkey(key: int) -> float:
    """Inverse of the kernel's order-preserving ``ord_key``."""
    key &= MASK
    bits = key ^ SIGN if key & SIGN else ~key & MASK
    return _bits_to_double(bits)


def decode_row(words: Sequence[int], meta: RowMeta) -> dict[str, Any]:
    """One event's attributes.  min/max/mean are left out when nothing was seen (empty
    tensor); min/max are NaN when every value was NaN, mean is NaN with no finite value."""
    w = [int(x) & MASK for x in words]
    seen, nan, inf, finite = w[SEEN], w[NAN], w[INF], w[FINITE]
    attrs: dict[str, Any] = {"flashinfer.tensor": meta.name, "scope": meta.scope}
    attrs["numel"] = seen if meta.scope == SCOPE_PAGES else meta.numel
    if meta.scope == SCOPE_SAMPLED:
        attrs["sampled_numel"] = seen
    if seen:
        if w[MIN] or w[MAX]:
            attrs["min"] = _unkey(~w[MIN])
            attrs["max"] = _unkey(w[MAX])
        else:
            attrs["min"] = attrs["max"] = float("nan")
        attrs["mean"] = _bits_to_double(w[SUM]) / finite if finite else float("nan")
    attrs["nan_count"] = nan
    attrs["inf_count"] = inf
    return attrs


def decode_rows(rows: Sequence[Sequence[int]], metas: Sequence[RowMeta]) -> list[dict[str, Any]]:
    """Attributes of every row that has a meta (rows beyond ``metas`` are unused)."""
    return [decode_row(rows[i], meta) for i, meta in enumerate(metas)]


def is_nonfinite(events: Sequence[dict[str, Any]]) -> bool:
    """Whether any tensor held a NaN or an Inf."""
    return any(e.get("nan_count", 0) or e.get("inf_count", 0) for e in events)
