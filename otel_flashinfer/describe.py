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
        try:
            stride = value.stride()
        except RuntimeError:  # sparse and other layouts have no strides
            return TensorFacts((value.shape, value.dtype, (), value.device, False))
        # Contiguity is derived from shape and stride in the background (None here).
        return TensorFacts((value.shape, value.dtype, stride, value.device, None))
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


_names: dict[Any, str] = {}
_tensor_keys: dict[str, tuple[str, str, str, str, str]] = {}


def _dtype_name(dtype: Any) -> str:
    name = _names.get(dtype)
    if name is None:
        text = str(dtype)
        name = _names[dtype] = text[6:] if text.startswith("torch.") else text
    return name


def _device_name(device: Any) -> str:
    name = _names.get(device)
    if name is None:
        name = _names[device] = str(device)
    return name


def _keys(prefix: str) -> tuple[str, str, str, str, str]:
    """The five attribute keys of a tensor under ``prefix`` (cached: names repeat)."""
    keys = _tensor_keys.get(prefix)
    if keys is None:
        shape, dtype, stride, device, contiguous = (
            f"{prefix}.{k}" for k in ("shape", "dtype", "stride", "device", "contiguous"))
        keys = (shape, dtype, stride, device, contiguous)
        if len(_tensor_keys) < 65536:
            _tensor_keys[prefix] = keys
    return keys


def is_contiguous(shape: Any, stride: Any) -> bool:
    """torch's C-contiguity from shape and stride: size-1 dims and empty tensors are
    ignored, as ``Tensor.is_contiguous()`` does."""
    if 0 in shape:
        return True
    expected = 1
    for size, step in zip(reversed(tuple(shape)), reversed(tuple(stride)), strict=True):
        if size != 1:
            if step != expected:
                return False
            expected *= size
    return True


def put_attributes(out: dict[str, Any], prefix: str, snap: Any) -> None:
    """Write one snapshot's attributes into ``out`` (background thread)."""
    if isinstance(snap, TensorFacts):
        shape, dtype, stride, device, contiguous = snap
        k_shape, k_dtype, k_stride, k_device, k_contiguous = _keys(prefix)
        out[k_shape] = tuple(shape)
        out[k_dtype] = _dtype_name(dtype)
        out[k_stride] = tuple(stride)
        out[k_device] = _device_name(device)
        out[k_contiguous] = (is_contiguous(shape, stride) if contiguous is None
                             else bool(contiguous))
    elif snap is None:
        out[prefix] = "None"
    elif isinstance(snap, Opaque):
        out[f"{prefix}.type"] = str(snap)
    elif isinstance(snap, str):
        out[prefix] = snap if len(snap) <= MAX_STR else snap[: MAX_STR - 3] + "..."
    elif isinstance(snap, (bool, float)):
        out[prefix] = snap
    elif isinstance(snap, int):
        # OTel ints are 64-bit; larger ones would be dropped by the exporter.
        out[prefix] = snap if -(2**63) <= snap < 2**63 else str(snap)
    elif isinstance(snap, Items):
        out[f"{prefix}.len"] = snap[1]
        for i, item in enumerate(snap[2:]):
            put_attributes(out, f"{prefix}.{i}", item)
    elif isinstance(snap, Fields):
        kind, length, items = snap
        if kind == "dict":
            out[f"{prefix}.len"] = length
        else:
            out[f"{prefix}.type"] = kind
        for key, item in items:
            put_attributes(out, f"{prefix}.{key}", item)
    else:  # pragma: no cover - snapshot() only produces the kinds above
        out[f"{prefix}.type"] = type(snap).__qualname__


def iter_attributes(prefix: str, snap: Any) -> Iterator[tuple[str, Any]]:
    """Flatten one snapshot into (key, OTel attribute value) pairs (background)."""
    out: dict[str, Any] = {}
    put_attributes(out, prefix, snap)
    return iter(out.items())


def attributes(prefix: str, snap: Any) -> dict[str, Any]:
    """``put_attributes`` into a new dict."""
    out: dict[str, Any] = {}
    put_attributes(out, prefix, snap)
    return out


def result_attributes(snap: Any) -> dict[str, Any]:
    """Results under ``flashinfer.result.<i>``: a tuple's items by index, else item 0."""
    if isinstance(snap, Items) and snap[0] == "tuple":
        out: dict[str, Any] = {}
        for i, item in enumerate(snap[2:]):
            put_attributes(out, f"flashinfer.result.{i}", item)
        return out
    return attributes("flashinfer.result.0", snap)
