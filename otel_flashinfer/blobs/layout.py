"""Where things live in a blob store (pure functions, no I/O).

Layout under the store root (a local folder or any fsspec URL)::

    <root>/objects/<sha256[:2]>/<sha256>.<ext>
        one object per distinct payload, named by the sha256 of its stored bytes
        (``ext`` is ``safetensors`` or ``pt``).  Same bytes, same name: a tensor or
        KV page stored by any call of any process is stored once.
    <root>/traces/<trace_id_hex32>/<start_ns:020d>-<span_id_hex16>.json
        one manifest per call.  The trace id alone names a prefix, so finding a
        trace's manifests is one prefix listing (cheap on S3 / GCS, one readdir
        locally); the zero-padded start time sorts them in call order.
    <root>/processes/<pid>-<start_hex>/info.json
        who wrote: pid, service name, host, when the process started recording.
    <root>/processes/<pid>-<start_hex>/calls/<start_ns:020d>-<span>-<trace>-<bytes>-<api>
        one empty object per stored call: listing one prefix gives a process'
        calls in call order with their trace, API and stored bytes, without
        reading a manifest (``pull --process/--service``, ``ls``).
    <root>/instances/<pid>-<start_hex>/<id(self)>/<start_ns:020d>-<span>-<trace>-<method>
        one empty object per ``__init__``/``plan*`` call of an object: the chain
        that a ``run`` recorded in another trace needs to replay (``pull``).
    <root>/.usage/counter
        (local stores only) the fcntl-locked budget counter shared by every process
        writing to the store.

Keys are always relative, built only from hex digits, digits and fixed words, so
that a key read back from an untrusted manifest can be checked with
``check_object_key`` before it is joined to any path.
"""

from __future__ import annotations

import functools
import re

OBJECTS = "objects"
TRACES = "traces"
USAGE_DIR = ".usage"

EXTENSIONS = {"safetensors": "safetensors", "torch": "pt"}

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_OBJECT_KEY_RE = re.compile(r"^objects/([0-9a-f]{2})/([0-9a-f]{64})\.(safetensors|pt)$")
_MANIFEST_NAME_RE = re.compile(r"^([0-9]{20})-([0-9a-f]{16})\.json$")
_TRACE_RE = re.compile(r"^[0-9a-f]{32}$")
_SPAN_RE = re.compile(r"^[0-9a-f]{16}$")
_PROCESS_RE = re.compile(r"^([0-9]{1,10})-([0-9a-f]{1,16})$")
_OBJECT_ID_RE = re.compile(r"^[0-9]{1,24}$")
_CALL_ENTRY_RE = re.compile(
    r"^([0-9]{20})-([0-9a-f]{16})-([0-9a-f]{32})-([0-9]{1,20})-([A-Za-z0-9_.]{1,200})$")
_CHAIN_ENTRY_RE = re.compile(
    r"^([0-9]{20})-([0-9a-f]{16})-([0-9a-f]{32})-(__init__|plan[A-Za-z0-9_]{0,64})$")
PROCESSES = "processes"
INSTANCES = "instances"
INFO = "info.json"


def trace_hex(trace_id: int | str) -> str:
    """A trace id as 32 lowercase hex digits (accepts an int or a hex string)."""
    if isinstance(trace_id, str):
        text = trace_id.strip().lower()
        text = text.removeprefix("0x")
        if not text or not _TRACE_RE.fullmatch(text.zfill(32)) or len(text) > 32:
            raise ValueError(f"trace id {trace_id!r} is not 32 hex digits")
        if not text.strip("0"):
            raise ValueError(f"trace id {trace_id!r} is all zeros: no trace has it")
        return text.zfill(32)
    if not 0 < trace_id < 1 << 128:
        raise ValueError(f"trace id {trace_id!r} out of range")
    return f"{trace_id:032x}"


def span_hex(span_id: int | str) -> str:
    """A span id as 16 lowercase hex digits (accepts an int or a hex string)."""
    if isinstance(span_id, str):
        text = span_id.strip().lower()
        text = text.removeprefix("0x")
        if not text or len(text) > 16 or not _SPAN_RE.fullmatch(text.zfill(16)):
            raise ValueError(f"span id {span_id!r} is not 16 hex digits")
        if not text.strip("0"):
            raise ValueError(f"span id {span_id!r} is all zeros: no span has it")
        return text.zfill(16)
    if not 0 < span_id < 1 << 64:
        raise ValueError(f"span id {span_id!r} out of range")
    return f"{span_id:016x}"


def object_key(sha256_hex: str, fmt: str) -> str:
    """Relative key of the object whose stored bytes hash to ``sha256_hex``."""
    if not _HASH_RE.fullmatch(sha256_hex):
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    return f"{OBJECTS}/{sha256_hex[:2]}/{sha256_hex}.{EXTENSIONS[fmt]}"


def check_object_key(key: str, sha256_hex: str, fmt: str) -> None:
    """Refuse an object key that is not exactly the one ``object_key`` builds."""
    if not isinstance(key, str) or not _OBJECT_KEY_RE.fullmatch(key):
        raise ValueError(f"object key {key!r} is not objects/<2 hex>/<sha256>.<ext>")
    if key != object_key(sha256_hex, fmt):
        raise ValueError(f"object key {key!r} does not match hash {sha256_hex} / format {fmt}")


def trace_prefix(trace_id: int | str) -> str:
    """Relative prefix that holds every manifest of one trace."""
    return f"{TRACES}/{trace_hex(trace_id)}"


def manifest_name(start_ns: int, span_id: int | str) -> str:
    """File name of a call's manifest inside its trace prefix."""
    if not 0 <= start_ns < 10**20:
        raise ValueError(f"start_ns {start_ns!r} out of range")
    return f"{start_ns:020d}-{span_hex(span_id)}.json"


def manifest_key(trace_id: int | str, start_ns: int, span_id: int | str) -> str:
    """Relative key of a call's manifest."""
    return f"{trace_prefix(trace_id)}/{manifest_name(start_ns, span_id)}"


def parse_manifest_name(name: str) -> tuple[int, str]:
    """(start_ns, span_hex) from a manifest file name; ValueError if it is not one."""
    match = _MANIFEST_NAME_RE.fullmatch(name)
    if not match:
        raise ValueError(f"{name!r} is not a manifest name <start_ns>-<span_id>.json")
    return int(match.group(1)), match.group(2)


def process_name(pid: int, start_ns: int) -> str:
    """A recording process' folder name: its pid and when it started recording (pid
    numbers are reused, across hosts and over time)."""
    return f"{int(pid)}-{int(start_ns):x}"


def check_process(name: str) -> str:
    """``name`` if it is a process folder name, else ValueError."""
    if not isinstance(name, str) or not _PROCESS_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a process name <pid>-<hex start>")
    return name


def process_pid(name: str) -> int:
    """The pid part of a process folder name."""
    return int(check_process(name).split("-", 1)[0])


def process_info_key(process: str) -> str:
    return f"{PROCESSES}/{check_process(process)}/{INFO}"


def process_calls_prefix(process: str) -> str:
    return f"{PROCESSES}/{check_process(process)}/calls"


@functools.lru_cache(maxsize=1024)
def api_token(api: str) -> str:
    """An API name as it may appear in a key: ``[A-Za-z0-9_.]``, at most 200 long (made
    once per name: the writer names an index entry with it for every call)."""
    text = "".join(c if (c.isascii() and (c.isalnum() or c in "_.")) else "_" for c in api)
    return text[:200] or "_"


def call_entry_name(start_ns: int, span_id: int | str, trace_id: int | str, nbytes: int,
                    api: str) -> str:
    """Name of a call's entry in its process' listing (parsed by ``parse_call_entry``)."""
    if not 0 <= start_ns < 10**20:
        raise ValueError(f"start_ns {start_ns!r} out of range")
    return (f"{start_ns:020d}-{span_hex(span_id)}-{trace_hex(trace_id)}-{max(0, int(nbytes))}"
            f"-{api_token(api)}")


def parse_call_entry(name: str) -> dict:
    """{start_ns, span_id, trace_id, bytes, api} of a call entry; ValueError if not one."""
    match = _CALL_ENTRY_RE.fullmatch(name)
    if not match:
        raise ValueError(f"{name!r} is not a call entry")
    start, span, trace, nbytes, api = match.groups()
    return {"start_ns": int(start), "span_id": span, "trace_id": trace, "bytes": int(nbytes),
            "api": api}


def object_id(instance_id: str) -> str:
    """The ``id(self)`` part of an instance id ``<pid>:<id>``; ValueError otherwise."""
    if not isinstance(instance_id, str) or instance_id.count(":") != 1:
        raise ValueError(f"instance id {instance_id!r} is not <pid>:<id>")
    pid, oid = instance_id.split(":")
    if not pid.isdigit() or not _OBJECT_ID_RE.fullmatch(oid):
        raise ValueError(f"instance id {instance_id!r} is not <pid>:<id>")
    return oid


def instance_prefix(process: str, instance_id: str) -> str:
    """Where the ``__init__``/``plan`` entries of one object of one process are."""
    return f"{INSTANCES}/{check_process(process)}/{object_id(instance_id)}"


def chain_entry_name(start_ns: int, span_id: int | str, trace_id: int | str,
                     method: str) -> str:
    """Name of an ``__init__``/``plan*`` entry (parsed by ``parse_chain_entry``)."""
    if not 0 <= start_ns < 10**20:
        raise ValueError(f"start_ns {start_ns!r} out of range")
    name = f"{start_ns:020d}-{span_hex(span_id)}-{trace_hex(trace_id)}-{method}"
    if not _CHAIN_ENTRY_RE.fullmatch(name):
        raise ValueError(f"{method!r} is not __init__ or plan*")
    return name


def parse_chain_entry(name: str) -> dict:
    """{start_ns, span_id, trace_id, method} of a chain entry; ValueError if not one."""
    match = _CHAIN_ENTRY_RE.fullmatch(name)
    if not match:
        raise ValueError(f"{name!r} is not an __init__/plan entry")
    start, span, trace, method = match.groups()
    return {"start_ns": int(start), "span_id": span, "trace_id": trace, "method": method}


def join(root: str, key: str) -> str:
    """Join a store root (path or URL) and a relative key with one slash."""
    return root.rstrip("/") + "/" + key
