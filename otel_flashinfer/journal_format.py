"""The crash journal's bytes: header and slot layout, argument encoding, and parsing.

Pure functions and precompiled structs only, so the layout can be tested without a
process to kill.  A journal file is one header followed by ``slot_count`` fixed-size
slots; a slot is live while the call it notes is running.  The state word of a slot
is written last, so a reader never sees a half-written live slot.

Header (``HEADER_SIZE`` bytes, little-endian)::

    magic 8s | version I | header_size I | slot_count I | slot_size I | pid I | flags I
    | start_ticks Q | created_ns q | crc I | pad I | boot_id 40s | hostname 64s
    ... | last_write_ns q at LAST_WRITE_OFFSET

``crc`` covers every static field (all but ``last_write_ns``).  ``flags`` has
``HEADER_LOCKED`` when the writer holds an exclusive ``flock`` on the file for as long
as it lives, which tells a recoverer on the same kernel whether it runs, whatever PID
namespace either is in (files without it were written before the lock existed).  Slot::

    flags I | trace_hi Q | trace_lo Q | span_id Q | parent_span_id Q | start_ns q
    | name_len H | args_len H | name 64s | state B | pad 3x | args (JSON, the rest)

The state byte ends the fixed part, so the one ``pack_into`` that notes a call
writes it last, and ending a call is a single byte store.

The arguments are a JSON object of ``flashinfer.arg.`` keys with the prefix cut off
(``{"q.shape":[8,32,128],"q.dtype":"float16","sm_scale":0.125}``), shapes and
dtypes of tensors and scalars only, cut item by item to fit the slot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from . import describe as _describe

MAGIC = b"OFIJRNL\x00"
VERSION = 1
HEADER_SIZE = 512
DEFAULT_SLOTS = 256
DEFAULT_SLOT_SIZE = 1024
NAME_MAX = 64

STATE_FREE = 0
STATE_LIVE = 1
FLAG_PARENT = 1
#: Header flag: the writer holds ``flock(LOCK_EX)`` on the file while it lives.
HEADER_LOCKED = 1

HEADER = struct.Struct("<8sIIIIIIQqII40s64s")
LAST_WRITE = struct.Struct("<q")
LAST_WRITE_OFFSET = 256
#: The fixed part of a slot, state byte last.
BODY = struct.Struct(f"<IQQQQqHH{NAME_MAX}sB")
STATE_OFFSET = BODY.size - 1
ARGS_OFFSET = BODY.size + 3
_CRC_END = HEADER.size
_M64 = (1 << 64) - 1

#: Key for "some arguments did not fit": recovery turns it into an attribute.
TRUNCATED_KEY = "#truncated"
ARG_PREFIX = "flashinfer.arg."
#: What the journal keeps of a tensor: enough to tell which call it was.
_KEEP_TENSOR = (".shape", ".dtype")
_DROP_SUFFIX = (".stride", ".device", ".contiguous")


class JournalCorrupt(ValueError):
    """A journal whose bytes do not parse; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The static facts of a journal, plus when it was last written."""

    slot_count: int
    slot_size: int
    pid: int
    start_ticks: int
    created_ns: int
    boot_id: str
    hostname: str
    last_write_ns: int
    flags: int = 0


@dataclasses.dataclass(frozen=True)
class SlotNote:
    """One live slot: a call that had begun and not ended."""

    index: int
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    name: str
    args: bytes


def pack_header(buf: Any, *, slot_count: int, slot_size: int, pid: int, start_ticks: int,
                created_ns: int, boot_id: str, hostname: str, flags: int = 0) -> None:
    """Write a header (with its crc) at offset 0 of ``buf``."""
    boot = boot_id.encode("ascii", "replace")[:40]
    host = hostname.encode("utf-8", "replace")[:64]
    fields = [MAGIC, VERSION, HEADER_SIZE, slot_count, slot_size, pid, flags, start_ticks,
              created_ns, 0, 0, boot, host]
    raw = HEADER.pack(*fields)
    fields[9] = zlib.crc32(raw)
    HEADER.pack_into(buf, 0, *fields)
    LAST_WRITE.pack_into(buf, LAST_WRITE_OFFSET, created_ns)


def file_size(slot_count: int, slot_size: int) -> int:
    return HEADER_SIZE + slot_count * slot_size


def parse_header(data: bytes, size: int | None = None, allow_short: bool = False) -> Header:
    """The header of a journal's bytes; ``JournalCorrupt`` if it is not one, is of
    another version, or the file (``size`` bytes, default ``len(data)``) is shorter
    than its header says (truncated; with ``allow_short`` the slots it still holds are
    read, ``iter_live``)."""
    size = len(data) if size is None else size
    if len(data) < HEADER_SIZE:
        raise JournalCorrupt(f"truncated: {len(data)} bytes, shorter than the header")
    fields = list(HEADER.unpack_from(data, 0))
    magic, version, header_size, slot_count, slot_size, pid, flags, ticks, created, crc = \
        fields[:10]
    if magic != MAGIC:
        raise JournalCorrupt(f"bad magic {magic!r}")
    if version != VERSION:
        raise JournalCorrupt(f"unknown version {version}")
    fields[9] = 0
    if zlib.crc32(HEADER.pack(*fields)) != crc:
        raise JournalCorrupt("header checksum mismatch")
    if header_size != HEADER_SIZE or slot_size < ARGS_OFFSET or not 0 < slot_count <= 1 << 20:
        raise JournalCorrupt(f"bad geometry: header {header_size}, {slot_count} slots of "
                             f"{slot_size} bytes")
    expected = file_size(slot_count, slot_size)
    if size < expected and not allow_short:
        raise JournalCorrupt(f"truncated: {size} bytes, expected {expected}")
    (last_write,) = LAST_WRITE.unpack_from(data, LAST_WRITE_OFFSET)
    return Header(slot_count, slot_size, pid, ticks, created,
                  fields[11].rstrip(b"\x00").decode("ascii", "replace"),
                  fields[12].rstrip(b"\x00").decode("utf-8", "replace"), last_write, flags)


def pack_slot(buf: Any, offset: int, *, trace_id: int, span_id: int,
              parent_span_id: int | None, start_ns: int, name: bytes, args: bytes = b"",
              slot_size: int = DEFAULT_SLOT_SIZE) -> None:
    """Write one live slot at ``offset`` (state last); the slow, readable twin of
    ``Journal.begin`` for tests and tools."""
    args = args[: slot_size - ARGS_OFFSET]
    name = name[:NAME_MAX]
    buf[offset + ARGS_OFFSET: offset + ARGS_OFFSET + len(args)] = args
    BODY.pack_into(buf, offset, FLAG_PARENT if parent_span_id else 0, trace_id >> 64,
                   trace_id & _M64, span_id, parent_span_id or 0, start_ns, len(name),
                   len(args), name, STATE_LIVE)


#: Start times past this (about the year 2116) are not a clock's: a torn slot.
MAX_TIME_NS = 1 << 62


def iter_live(data: bytes, header: Header, bad: list[str] | None = None
              ) -> Iterator[SlotNote]:
    """Live slots of a journal's bytes.  A slot that cannot be one of ours (unknown
    state, lengths past the slot, a zero id, a start time no clock gives) raises
    ``JournalCorrupt``, or with ``bad`` is said there and skipped, so that one torn
    slot does not cost the others; so are the slots a truncated file lacks."""
    size = header.slot_size
    room = size - ARGS_OFFSET
    present = min(header.slot_count, max(len(data) - HEADER_SIZE, 0) // size)
    if present < header.slot_count:
        reason = f"truncated after slot {present}: {header.slot_count - present} slots missing"
        if bad is None:
            raise JournalCorrupt(reason)
        bad.append(reason)
    for index in range(present):
        offset = HEADER_SIZE + index * size
        state = data[offset + STATE_OFFSET]
        if state == STATE_FREE:
            continue
        flags, hi, lo, span_id, parent, start, name_len, args_len, name, _ = \
            BODY.unpack_from(data, offset)
        reason = None
        if state != STATE_LIVE:
            reason = f"slot {index}: unknown state {state:#x}"
        elif name_len > NAME_MAX or args_len > room or flags & ~FLAG_PARENT or span_id == 0 \
                or (hi | lo) == 0:
            reason = f"slot {index}: inconsistent lengths or ids"
        elif not 0 < start < MAX_TIME_NS:
            reason = f"slot {index}: start time {start} is no clock's"
        if reason is not None:
            if bad is None:
                raise JournalCorrupt(reason)
            bad.append(reason)
            continue
        args = bytes(data[offset + ARGS_OFFSET: offset + ARGS_OFFSET + args_len])
        yield SlotNote(index, (hi << 64) | lo, span_id,
                       parent if flags & FLAG_PARENT else None, start,
                       name[:name_len].decode("utf-8", "replace"), args)


# ---- arguments ---------------------------------------------------------------------------

def _scalar_json(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value) if -(2**63) <= value < 2**63 else json.dumps(str(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else json.dumps(repr(value))
    text = str(value)
    if len(text) > _describe.MAX_STR:
        text = text[: _describe.MAX_STR - 3] + "..."
    return json.dumps(text)


def snapshot_pieces(name: str, snap: Any) -> list[str]:
    """``"key":value`` JSON members for one argument snapshot: tensors' shape and dtype,
    scalars, lengths and type names of containers (what tells calls apart)."""
    out = []
    for key, value in _describe.iter_attributes(name, snap):
        if key.endswith(_DROP_SUFFIX):
            continue
        if isinstance(value, (list, tuple)):
            text = "[" + ",".join(_scalar_json(v) for v in value) + "]"
        else:
            text = _scalar_json(value)
        out.append(f"{json.dumps(key)}:{text}")
    return out


class ArgEncoder:
    """Argument snapshots -> the bounded JSON bytes of one slot.

    Two bounded caches keep the caller's cost low: whole calls by (plan, snapshots),
    so an engine calling a kernel again with the same shapes pays one hash and one
    lookup; and tensor descriptions by (name, facts) for the calls that differ only
    in a scalar.  Because ``1 == True == 1.0``, a cached call with number arguments
    also compares their types on a hit; calls with containers (whose items could hide
    such a difference) skip the call cache.  Not locked: two threads that miss
    together compute the same bytes.
    """

    def __init__(self, limit: int, cache_size: int = 4096) -> None:
        self.limit = limit
        self.cache_size = cache_size
        self._calls: dict[tuple[Any, ...], bytes] = {}
        self._tensors: dict[tuple[str, Any], str] = {}
        self._keys: dict[str, str] = {}

    def encode(self, arg_snaps: Any, kw_snaps: Any = None, plan: Any = None) -> bytes:
        """Positional snapshots named by ``plan`` (an ``ArgPlan``; without one, by
        position), then keyword snapshots.  A hit returns the cached bytes object
        itself (the journal skips copying bytes a slot already holds)."""
        args = tuple(arg_snaps) if arg_snaps else ()
        kw = tuple(kw_snaps.items()) if kw_snaps else ()
        key = (plan, args, kw)
        calls = self._calls
        try:
            entry = calls.get(key)
        except TypeError:  # an unhashable snapshot: describe the call without caching
            return self._encode(args, kw, plan)
        if entry is not None:
            data, numbers = entry
            # Equal numbers of different types (1, True, 1.0) encode differently: an
            # entry made from a call with numbers keeps (position, type) of each.
            for position, kind in numbers:
                value = args[position] if position < len(args) else kw[position - len(args)][1]
                if type(value) is not kind:
                    break
            else:
                return data
        data = self._encode(args, kw, plan)
        types = _types(args, kw)
        if _Items not in types and _Fields not in types:
            if len(calls) >= self.cache_size:
                calls.clear()
            calls[key] = (data, tuple((i, t) for i, t in enumerate(types) if t in _NUMBERS))
        return data

    def _encode(self, args: tuple[Any, ...], kw: tuple[tuple[str, Any], ...],
                plan: Any) -> bytes:
        pieces: list[str] = []
        piece = self._piece
        names = plan.names if plan is not None else ()
        count = len(names)
        for i, snap in enumerate(args):
            if i < count:
                name = names[i]
            elif plan is not None:
                name = f"{plan.varargs or 'arg'}.{i - count}"
            else:
                name = str(i)
            pieces.append(piece(name, snap))
        for name, snap in kw:
            pieces.append(piece(name, snap))
        return join_bounded([p for p in pieces if p], self.limit)

    def _piece(self, name: str, snap: Any) -> str:
        kind = type(snap)
        if kind is tuple:  # a tensor's facts
            key = (name, snap)
            piece = self._tensors.get(key)
            if piece is None:
                if len(self._tensors) >= self.cache_size:
                    self._tensors.clear()
                piece = self._tensors[key] = ",".join(snapshot_pieces(name, snap))
            return piece
        if snap is None or kind in _SCALAR_TYPES:
            prefix = self._keys.get(name)
            if prefix is None:
                if len(self._keys) >= self.cache_size:
                    self._keys.clear()
                prefix = self._keys[name] = json.dumps(name) + ":"
            return prefix + _scalar_json("None" if snap is None else snap)
        return ",".join(snapshot_pieces(name, snap))


_Items = _describe.Items
_Fields = _describe.Fields
_NUMBERS = (bool, int, float)


def _types(args: tuple[Any, ...], kw: tuple[tuple[str, Any], ...]) -> tuple[type, ...]:
    types = tuple(map(type, args))
    if kw:
        types += tuple(type(value) for _, value in kw)
    return types
_SCALAR_TYPES = (bool, int, float, str)


def join_bounded(pieces: list[str], limit: int) -> bytes:
    """``{piece,piece,...}`` as UTF-8, dropping whole trailing pieces (and saying so)
    when it would exceed ``limit`` bytes, so the result is always valid JSON."""
    data = ("{" + ",".join(pieces) + "}").encode("utf-8")
    if len(data) <= limit:
        return data
    marker = f'"{TRUNCATED_KEY}":true'
    budget = limit - 2 - len(marker)
    kept: list[str] = []
    used = 0
    for piece in pieces:
        size = len(piece.encode("utf-8")) + 1
        if used + size > budget:
            break
        kept.append(piece)
        used += size
    kept.append(marker)
    data = ("{" + ",".join(kept) + "}").encode("utf-8")
    return data if len(data) <= limit else b"{}"


def decode_args(data: bytes) -> dict[str, Any]:
    """A slot's argument bytes -> ``flashinfer.arg.*`` attributes (plus
    ``flashinfer.crash.args_truncated`` when some did not fit)."""
    if not data:
        return {}
    parsed = json.loads(data.decode("utf-8"))
    if not isinstance(parsed, dict):
        raise ValueError("arguments are not a JSON object")
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        if key == TRUNCATED_KEY:
            out["flashinfer.crash.args_truncated"] = True
        elif isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        ):
            out[ARG_PREFIX + key] = value
    return out
