"""Tensor <-> stored object bytes, keeping the exact layout.

A tensor is stored as the smallest flat span of its storage that covers every
element it can address (``1 + sum((size-1)*stride)`` elements from its storage
offset), as a 1-D tensor.  Shape, stride and the offset into that span go to the
manifest, so ``flat.as_strided(shape, stride, offset)`` brings back the exact
layout (strides, overlaps, gaps) without pickle.  Dtypes safetensors cannot
name are stored as their raw bytes (``uint8``) and viewed back.

The object's name is the sha256 of its stored bytes (both encoders are
deterministic, so equal contents give equal names).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct

import torch

FORMATS = ("safetensors", "torch")

#: dtype name in manifests <-> torch dtype.  Names are torch's without the prefix.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
        "float8_e8m0fnu", "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: dtypes that safetensors stores natively; the rest go as raw bytes.
_ST_NATIVE = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
_TENSOR_NAME = "t"


class EncodeError(ValueError):
    """Stored bytes that do not decode to what the manifest says."""


def dtype_name(dtype: torch.dtype) -> str:
    """Manifest name of a torch dtype (``float16``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise EncodeError(f"dtype {dtype} cannot be recorded") from None


def span_numel(shape: tuple[int, ...] | list[int], stride: tuple[int, ...] | list[int]) -> int:
    """Elements of storage a (shape, stride) view can address, from its offset."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride, strict=True))


def flat_span(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of exactly the storage span ``tensor`` addresses (no copy)."""
    n = span_numel(tensor.shape, tensor.stride())
    return tensor.as_strided((n,), (1,), tensor.storage_offset())


def stored_dtype_name(dtype: torch.dtype) -> str:
    """The dtype an object holds for a tensor of ``dtype`` (raw bytes if not native)."""
    name = dtype_name(dtype)
    return name if name in _ST_NATIVE else "uint8"


def encode(flat: torch.Tensor, fmt: str) -> bytes:
    """Bytes of the stored object for a contiguous 1-D CPU tensor."""
    return b"".join(encode_parts(flat, fmt))


def encode_parts(flat: torch.Tensor, fmt: str) -> list:
    """The stored object as buffers to write in order (safetensors: header + the
    tensor's own memory, no copy of the payload: a view into a larger staging buffer
    is written as it is)."""
    if flat.dtype not in DTYPE_NAMES or dtype_name(flat.dtype) not in _ST_NATIVE:
        flat = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    flat = flat.contiguous()
    if fmt == "safetensors":
        nbytes = flat.numel() * flat.element_size()
        payload = flat.view(torch.uint8).numpy().data if nbytes else b""
        return [_st_header(flat.dtype, flat.numel(), nbytes), payload]
    if fmt == "torch":
        if flat.untyped_storage().nbytes() != flat.numel() * flat.element_size():
            flat = flat.clone()  # torch.save would write the whole underlying storage
        buf = io.BytesIO()
        torch.save({_TENSOR_NAME: flat}, buf)
        return [buf.getvalue()]
    raise EncodeError(f"unknown blob format {fmt!r}")


@functools.lru_cache(maxsize=1024)
def _st_header(dtype: torch.dtype, numel: int, nbytes: int) -> bytes:
    """The safetensors length prefix and header of a flat tensor: the same for every
    page of a cache and every step's q, so made once per (dtype, length)."""
    header = json.dumps({_TENSOR_NAME: {
        "dtype": _ST_NATIVE[dtype_name(dtype)], "shape": [numel],
        "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def sha256_parts(parts: list) -> str:
    """Hex sha256 of the concatenation of ``parts``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def sha256(data: bytes | memoryview) -> str:
    """Hex sha256 of stored bytes (the object's name)."""
    return hashlib.sha256(data).hexdigest()


def _safetensors_header(data: bytes) -> dict:
    """Parse and check a safetensors header before handing the bytes to the library."""
    if len(data) < 8:
        raise EncodeError("truncated safetensors object (no header length)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > 1 << 20:
        raise EncodeError(f"safetensors header length {hlen} exceeds the object")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError as exc:
        raise EncodeError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) - {"__metadata__"} != {_TENSOR_NAME}:
        raise EncodeError("safetensors object must hold exactly one tensor named 't'")
    return header[_TENSOR_NAME]


def decode(data: bytes, fmt: str, allow_pickle: bool = False) -> torch.Tensor:
    """The flat 1-D CPU tensor of a stored object.  A torch-format object is a pickle:
    read back (untrusted) only with ``allow_pickle``, and then by torch's restricted
    ``weights_only`` loader."""
    if fmt == "safetensors":
        from safetensors.torch import load

        _safetensors_header(data)
        try:
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - any parse error of untrusted bytes
            raise EncodeError(f"safetensors object does not load: {exc}") from None
    elif fmt == "torch":
        if not allow_pickle:
            raise EncodeError("object is in torch format (a pickle), refused by default; "
                              "pass --allow-pickle to read it with torch's weights_only "
                              "loader")
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError and any parse error
            raise EncodeError(
                f"torch object refused by weights_only load (no pickle allowed): {exc}"
            ) from None
    else:
        raise EncodeError(f"unknown blob format {fmt!r}")
    if not isinstance(tensors, dict) or set(tensors) != {_TENSOR_NAME}:
        raise EncodeError("object must hold exactly one tensor named 't'")
    flat = tensors[_TENSOR_NAME]
    if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
        raise EncodeError("object tensor must be 1-D")
    return flat


def rebuild(
    flat: torch.Tensor,
    dtype: str,
    shape: list[int],
    stride: list[int],
    storage_offset: int,
) -> torch.Tensor:
    """The recorded tensor from its stored flat span, checked against the bytes."""
    if dtype not in DTYPES:
        raise EncodeError(f"unknown dtype {dtype!r}")
    want = DTYPES[dtype]
    if flat.dtype != want:
        if stored_dtype_name(want) != "uint8" or flat.dtype != torch.uint8:
            raise EncodeError(f"object holds {flat.dtype}, manifest says {dtype}")
        itemsize = torch.empty(0, dtype=want).element_size()
        if flat.numel() % itemsize:
            raise EncodeError(f"{flat.numel()} bytes is not a whole number of {dtype}")
        flat = flat.view(want) if flat.numel() else torch.empty(0, dtype=want)
    need = storage_offset + span_numel(shape, stride)
    if any(s == 0 for s in shape):
        need = 0
    if need > flat.numel() or storage_offset < 0:
        raise EncodeError(
            f"shape {shape} stride {stride} offset {storage_offset} needs {need} elements, "
            f"object holds {flat.numel()}"
        )
    return flat.as_strided(tuple(shape), tuple(stride), flat.storage_offset() + storage_offset)
