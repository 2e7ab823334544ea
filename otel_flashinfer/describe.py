"""Arguments and results -> span attributes, in two halves.

``snapshot`` runs on the caller's thread and only copies the cheap, immutable facts
(a tensor's shape, dtype, stride, device and contiguity; scalars as they are), so the
caller never pays for string formatting.  ``attributes`` runs in the background and
turns those facts into the flat ``flashinfer.arg.<name>.*`` keys of DESIGN.md.
Both are pure functions of their inputs and run without a GPU.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Iterator, Mapping
from typing import Any

#: Containers deeper than this are described by their type only.
MAX_DEPTH = 3
#: Items of one container that get their own keys; the rest are counted in ``.len``.
MAX_ITEMS = 8
#: Strings longer than this are cut (Tempo cuts attributes at 2 KB).
MAX_STR = 256

_SCALARS = (bool, int, float, str)


class TensorFacts(tuple):
    """(shape, dtype, stride, device, contiguous): what level 3 records of a tensor."""

    __slots__ = ()


class Items(tuple):
    """A snapshot of a tuple/list: (kind, length, item snapshots...)."""

    __slots__ = ()


class Fields(tuple):
    """A snapshot of a dict or dataclass: (kind, length, ((key, snapshot), ...))."""

    __slots__ = ()


class Opaque(str):
    """An object we do not look inside: its type name."""

    __slots__ = ()


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


_Tensor: Any = None


def snapshot(value: Any, depth: int = 0) -> Any:
    """Copy what describes ``value`` without formatting anything (caller's thread)."""
    global _Tensor
    if value is None or isinstance(value, _SCALARS):
        return value
    if _Tensor is None:
        _Tensor = _torch_tensor_type() or ()
    if _Tensor and isinstance(value, _Tensor):
        if value.layout is _strided():
            return TensorFacts(
                (value.shape, value.dtype, value.stride(), value.device, value.is_contiguous())
            )
        return TensorFacts((value.shape, value.dtype, (), value.device, False))
    if isinstance(value, enum.Enum):
        return Opaque(f"{type(value).__name__}.{value.name}")
    if depth >= MAX_DEPTH:
        return Opaque(type(value).__qualname__)
    if isinstance(value, (tuple, list)):
        head = [snapshot(v, depth + 1) for v in value[:MAX_ITEMS]]
        return Items((type(value).__name__, len(value), *head))
    if isinstance(value, Mapping):
        items = []
        for i, (k, v) in enumerate(value.items()):
            if i >= MAX_ITEMS:
                break
            items.append((str(k), snapshot(v, depth + 1)))
        return Fields(("dict", len(value), tuple(items)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        items = [(f.name, snapshot(getattr(value, f.name, None), depth + 1))
                 for f in fields[:MAX_ITEMS]]
        return Fields((type(value).__qualname__, len(fields), tuple(items)))
    return Opaque(type(value).__qualname__)


_STRIDED: Any = None


def _strided() -> Any:
    global _STRIDED
    if _STRIDED is None:
        _STRIDED = sys.modules["torch"].strided
    return _STRIDED


def _dtype_name(dtype: Any) -> str:
    text = str(dtype)
    return text[6:] if text.startswith("torch.") else text


def iter_attributes(prefix: str, snap: Any) -> Iterator[tuple[str, Any]]:
    """Flatten one snapshot into (key, OTel attribute value) pairs (background)."""
    if snap is None:
        yield prefix, "None"
    elif isinstance(snap, TensorFacts):
        shape, dtype, stride, device, contiguous = snap
        yield f"{prefix}.shape", tuple(shape)
        yield f"{prefix}.dtype", _dtype_name(dtype)
        yield f"{prefix}.stride", tuple(stride)
        yield f"{prefix}.device", str(device)
        yield f"{prefix}.contiguous", bool(contiguous)
    elif isinstance(snap, Opaque):
        yield f"{prefix}.type", str(snap)
    elif isinstance(snap, str):
        yield prefix, snap if len(snap) <= MAX_STR else snap[: MAX_STR - 3] + "..."
    elif isinstance(snap, (bool, float)):
        yield prefix, snap
    elif isinstance(snap, int):
        # OTel ints are 64-bit; larger ones would be dropped by the exporter.
        yield prefix, snap if -(2**63) <= snap < 2**63 else str(snap)
    elif isinstance(snap, Items):
        kind, length, *items = snap
        yield f"{prefix}.len", length
        for i, item in enumerate(items):
            yield from iter_attributes(f"{prefix}.{i}", item)
    elif isinstance(snap, Fields):
        kind, length, items = snap
        if kind == "dict":
            yield f"{prefix}.len", length
        else:
            yield f"{prefix}.type", kind
        for key, item in items:
            yield from iter_attributes(f"{prefix}.{key}", item)
    else:  # pragma: no cover - snapshot() only produces the kinds above
        yield f"{prefix}.type", type(snap).__qualname__


def attributes(prefix: str, snap: Any) -> dict[str, Any]:
    """``iter_attributes`` as a dict."""
    return dict(iter_attributes(prefix, snap))


def result_attributes(snap: Any) -> dict[str, Any]:
    """Results under ``flashinfer.result.<i>``: a tuple's items by index, else item 0."""
    if isinstance(snap, Items) and snap[0] == "tuple":
        out: dict[str, Any] = {}
        for i, item in enumerate(snap[2:]):
            out.update(iter_attributes(f"flashinfer.result.{i}", item))
        return out
    return attributes("flashinfer.result.0", snap)


def has_cuda_tensor(snaps: Any) -> bool:
    """Whether any snapshot (recursively) is a tensor on a CUDA device."""
    for snap in snaps:
        if isinstance(snap, TensorFacts):
            if snap[3].type == "cuda":
                return True
        elif isinstance(snap, Items):
            if has_cuda_tensor(snap[2:]):
                return True
        elif isinstance(snap, Fields):
            if has_cuda_tensor(s for _, s in snap[2]):
                return True
    return False
