"""Arguments and results -> span attributes, in two halves.

``snapshot`` runs on the caller's thread and only copies the cheap, immutable facts
(a tensor's dtype, device, shape and stride; scalars as they are), so the caller never
pays for string formatting.  A tensor's facts are ONE flat plain tuple
``(dtype, device, ndim, *shape, *stride)``: every container the caller allocates per
call lives until the background thread is done with it and so counts towards the
garbage collector's next pass, which at level 3 cost more than everything else.
``attributes`` runs in the background and turns those facts into the flat
``flashinfer.arg.<name>.*`` keys of DESIGN.md.
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


#: A tensor's snapshot is a plain ``tuple`` (every other snapshot kind is a scalar,
#: None, or one of the tuple subclasses below); ``tensor_facts`` unpacks it.
TensorFacts = tuple


def tensor_facts(snap: tuple) -> tuple[tuple[int, ...], Any, tuple[int, ...], Any, bool]:
    """(shape, dtype, stride, device, contiguous) of a tensor snapshot.  A tensor
    without strides (sparse layouts) has only its shape recorded and is not
    contiguous."""
    dtype, device, ndim = snap[0], snap[1], snap[2]
    shape = snap[3:3 + ndim]
    if len(snap) == 3 + ndim:
        return shape, dtype, (), device, False
    stride = snap[3 + ndim:]
    return shape, dtype, stride, device, is_contiguous(shape, stride)


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
        shape = value.shape
        try:
            return (value.dtype, value.device, len(shape), *shape, *value.stride())
        except RuntimeError:  # sparse and other layouts have no strides
            return (value.dtype, value.device, len(shape), *shape)
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


_described: dict[tuple[str, tuple], dict[str, Any]] = {}
_DESCRIBED_MAX = 4096


def put_attributes(out: dict[str, Any], prefix: str, snap: Any) -> None:
    """Write one snapshot's attributes into ``out`` (background thread)."""
    if type(snap) is tuple:
        # An engine passes the same shapes call after call: describe each once.
        key = (prefix, snap)
        attrs = _described.get(key)
        if attrs is None:
            shape, dtype, stride, device, contiguous = tensor_facts(snap)
            attrs = {f"{prefix}.shape": shape, f"{prefix}.dtype": _dtype_name(dtype),
                     f"{prefix}.stride": stride, f"{prefix}.device": _device_name(device),
                     f"{prefix}.contiguous": contiguous}
            if len(_described) >= _DESCRIBED_MAX:
                _described.clear()
            _described[key] = attrs
        out.update(attrs)
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
