"""Every ``OTEL_FLASHINFER_*`` knob, defined once and parsed once into a frozen Settings.

Our variables use their own prefix so that setting them never switches on FlashInfer's
own logger (which reads ``FLASHINFER_*``).  A value that does not parse is an error
naming the variable and the value: a silent fallback would hide a typo until the
trace someone needed turns out to be missing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

#: 0, 1, 3, 5 or 10, as FlashInfer's FLASHINFER_LOGLEVEL (0 installs no wrapper at all).
OTEL_FLASHINFER_LEVEL = "OTEL_FLASHINFER_LEVEL"
#: Comma-separated fnmatch patterns on the API name; only matching APIs are traced.
OTEL_FLASHINFER_INCLUDE = "OTEL_FLASHINFER_INCLUDE"
#: Comma-separated fnmatch patterns on the API name, applied after the include list.
OTEL_FLASHINFER_EXCLUDE = "OTEL_FLASHINFER_EXCLUDE"
#: Where level-10 payloads go: a local path or any fsspec URL.
OTEL_FLASHINFER_BLOB_URL = "OTEL_FLASHINFER_BLOB_URL"
#: Total level-10 payload budget per process, in GB.
OTEL_FLASHINFER_BLOB_MAX_GB = "OTEL_FLASHINFER_BLOB_MAX_GB"
#: Number of calls whose level-10 payloads are kept.
OTEL_FLASHINFER_BLOB_MAX_COUNT = "OTEL_FLASHINFER_BLOB_MAX_COUNT"
#: ``safetensors`` (no pickle) or ``torch``.
OTEL_FLASHINFER_BLOB_FORMAT = "OTEL_FLASHINFER_BLOB_FORMAT"
#: Trace one CUDA graph replay in N.
OTEL_FLASHINFER_REPLAY_EVERY = "OTEL_FLASHINFER_REPLAY_EVERY"
#: With ``OTEL_FLASHINFER_REPLAY_EVERY=auto``: the share of replay time tracing may cost.
OTEL_FLASHINFER_REPLAY_BUDGET = "OTEL_FLASHINFER_REPLAY_BUDGET"
#: Tensors above this many MB get level-5 statistics over a strided sample.
OTEL_FLASHINFER_STATS_MAX_MB = "OTEL_FLASHINFER_STATS_MAX_MB"
#: Folder of the crash journal; empty turns the journal off.
OTEL_FLASHINFER_JOURNAL_DIR = "OTEL_FLASHINFER_JOURNAL_DIR"
#: 1: level-10 inputs are written synchronously before the kernel runs.
OTEL_FLASHINFER_CRASH_SAFE = "OTEL_FLASHINFER_CRASH_SAFE"
#: Local OTLP/JSON-lines file used when no exporter or endpoint is configured.
OTEL_FLASHINFER_TRACES_FILE = "OTEL_FLASHINFER_TRACES_FILE"
#: Spans waiting to be built in the background; beyond it the oldest are dropped and counted.
OTEL_FLASHINFER_QUEUE_SIZE = "OTEL_FLASHINFER_QUEUE_SIZE"
#: 1 (default): from level 3, eager CUDA calls record their GPU time; 0 turns it off.
OTEL_FLASHINFER_GPU_TIMING = "OTEL_FLASHINFER_GPU_TIMING"
#: 1 (default): spans are encoded by our native OTLP encoder and handed to the SDK
#: exporters' transports as bytes, where the provider's setup allows it; 0 keeps every
#: span on the SDK's own path (``export.plan`` says which setups are fast).
OTEL_FLASHINFER_NATIVE_EXPORT = "OTEL_FLASHINFER_NATIVE_EXPORT"
#: 1 (default): wrappers run on the C hot path where it is built; 0 installs the
#: pure-Python wrappers, which ``torch.compile`` traces through (it inlines the original
#: function there; Dynamo cannot trace the C wrapper type), at a higher cost per call.
OTEL_FLASHINFER_C_HOT_PATH = "OTEL_FLASHINFER_C_HOT_PATH"

#: Comma-separated fnmatch patterns: which traced calls store level-10 payloads
#: (empty: every call); the others keep spans and statistics and say
#: ``flashinfer.blob.skipped = "filtered"``.
OTEL_FLASHINFER_BLOB_INCLUDE = "OTEL_FLASHINFER_BLOB_INCLUDE"
#: Comma-separated fnmatch patterns applied after ``_BLOB_INCLUDE``.
OTEL_FLASHINFER_BLOB_EXCLUDE = "OTEL_FLASHINFER_BLOB_EXCLUDE"
#: 0 turns the installed start-up hook (``otel_flashinfer_autostart.pth``) off:
#: ``OTEL_FLASHINFER_LEVEL`` then takes effect only through ``instrument()``,
#: ``otel-flashinfer run`` or ``opentelemetry-instrument``.  Read by the hook itself,
#: before this module can be imported, so it is not a Settings field.
OTEL_FLASHINFER_AUTOSTART = "OTEL_FLASHINFER_AUTOSTART"

#: Where the statistics kernel and the event pool are compiled and cached.
OTEL_FLASHINFER_CACHE_DIR = "OTEL_FLASHINFER_CACHE_DIR"

LEVELS = (0, 1, 3, 5, 10)
BLOB_FORMATS = ("safetensors", "torch")
#: ``replay_every`` for ``OTEL_FLASHINFER_REPLAY_EVERY=auto``.
REPLAY_AUTO = 0


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and the value."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The parsed configuration; one instance per ``instrument()``."""

    level: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    blob_url: str = "./flashinfer_blobs"
    blob_max_gb: float = 20.0
    blob_max_count: int = 1000
    blob_format: str = "safetensors"
    #: Trace one replay in N; ``REPLAY_AUTO`` (0, from ``auto``): as many as
    #: ``replay_budget`` allows (``graph_sampling``).
    replay_every: int = 1
    replay_budget: float = 0.01
    stats_max_mb: float = 64.0
    journal_dir: str = "./flashinfer_journal"
    crash_safe: bool = False
    traces_file: str = "./flashinfer_traces.jsonl"
    queue_size: int = 65536
    gpu_timing: bool = True
    native_export: bool = True
    c_hot_path: bool = True
    blob_include: tuple[str, ...] = ()
    blob_exclude: tuple[str, ...] = ()


def _level(text: str) -> int:
    if not text.strip():
        return 0  # set but empty is off, as the start-up hook reads it
    value = int(text)
    if value not in LEVELS:
        raise ValueError(f"must be one of {', '.join(map(str, LEVELS))}")
    return value


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("must be a positive finite number")
    return value


def _at_most(parse: Callable[[str], Any], limit: float, unit: str) -> Callable[[str], Any]:
    """``parse``, refusing values past ``limit``: budgets are kept in signed 64-bit
    counters (bytes, calls), which a larger value would overflow on every call."""

    def bounded(text: str) -> Any:
        value = parse(text)
        if value > limit:
            raise ValueError(f"must be at most {limit:,.0f} {unit}")
        return value

    return bounded


def _replay_every(text: str) -> int:
    if text.strip().lower() == "auto":
        return REPLAY_AUTO
    try:
        value = int(text)
    except ValueError:
        raise ValueError("is not a number or auto") from None
    if value < 1:
        raise ValueError("must be a whole number >= 1, or auto")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be a share of time in (0, 1], e.g. 0.01 for 1%")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number >= 0")
    return value


def _blob_format(text: str) -> str:
    value = text.strip().lower()
    if value not in BLOB_FORMATS:
        raise ValueError(f"must be one of {', '.join(BLOB_FORMATS)}")
    return value


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    # Empty is not off: a flag that defaults to on (GPU_TIMING) would go off unseen.
    raise ValueError("must be 0 or 1 (or true/false)")


def _blob_url(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    # fsspec chains filesystems with "::" ("simplecache::s3://bucket/x"): every link
    # names a protocol, and only the last carries a path.
    links = value.split("::")
    for i, link in enumerate(links):
        if "://" in link:
            scheme = link.split("://", 1)[0]
        elif i < len(links) - 1:
            scheme = link
        else:
            continue  # a plain local path
        if not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
            raise ValueError(f"has an invalid URL scheme {scheme!r}")
        _check_protocol(scheme)
    return value


def _check_protocol(scheme: str) -> None:
    """An unknown protocol is the variable's error now, not a traceback at the first
    blob.  A known one whose package is missing (gs:// without gcsfs) passes here: the
    store names the package when it opens.  Protocols registered at run time
    (``fsspec.register_implementation``) are known too."""
    try:
        import fsspec
    except ImportError:  # level 10 names the missing package when it starts
        return
    # Names only, no import: the lazily known ones and those registered as classes.
    known = set(fsspec.available_protocols()) | set(fsspec.registry)
    if scheme not in known:  # fsspec's lookup is case-sensitive too
        raise ValueError(
            f"has a URL scheme {scheme!r} that fsspec does not know "
            "(a local folder, file://, s3://, gs://, memory:// and the other "
            "fsspec protocols work)")


def _text(text: str) -> str:
    return text.strip()


def _path(text: str) -> str:
    """A file to write: empty would fail at the first span, dropping every one."""
    value = text.strip()
    if not value:
        raise ValueError("must not be empty (a file path)")
    return value


# field name -> (env var, parser)
_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "level": (OTEL_FLASHINFER_LEVEL, _level),
    "include": (OTEL_FLASHINFER_INCLUDE, _patterns),
    "exclude": (OTEL_FLASHINFER_EXCLUDE, _patterns),
    "blob_url": (OTEL_FLASHINFER_BLOB_URL, _blob_url),
    # 1 EB and 10^15 calls: past any store, far below 2^63 bytes or calls
    "blob_max_gb": (OTEL_FLASHINFER_BLOB_MAX_GB, _at_most(_positive_float, 1e9, "GB")),
    "blob_max_count": (OTEL_FLASHINFER_BLOB_MAX_COUNT,
                       _at_most(_positive_int, 10**15, "calls")),
    "blob_format": (OTEL_FLASHINFER_BLOB_FORMAT, _blob_format),
    "replay_every": (OTEL_FLASHINFER_REPLAY_EVERY, _replay_every),
    "replay_budget": (OTEL_FLASHINFER_REPLAY_BUDGET, _share),
    "stats_max_mb": (OTEL_FLASHINFER_STATS_MAX_MB, _at_most(_positive_float, 1e9, "MB")),
    "journal_dir": (OTEL_FLASHINFER_JOURNAL_DIR, _text),
    "crash_safe": (OTEL_FLASHINFER_CRASH_SAFE, _flag),
    "traces_file": (OTEL_FLASHINFER_TRACES_FILE, _path),
    "queue_size": (OTEL_FLASHINFER_QUEUE_SIZE, _positive_int),
    "gpu_timing": (OTEL_FLASHINFER_GPU_TIMING, _flag),
    "native_export": (OTEL_FLASHINFER_NATIVE_EXPORT, _flag),
    "c_hot_path": (OTEL_FLASHINFER_C_HOT_PATH, _flag),
    "blob_include": (OTEL_FLASHINFER_BLOB_INCLUDE, _patterns),
    "blob_exclude": (OTEL_FLASHINFER_BLOB_EXCLUDE, _patterns),
}

_PATTERN_FIELDS = ("include", "exclude", "blob_include", "blob_exclude")

ENV_VARS: tuple[str, ...] = tuple(env for env, _ in _FIELDS.values())


def _parse(field: str, raw: Any, source: str) -> Any:
    _, parser = _FIELDS[field]
    if not isinstance(raw, str):
        if field in _PATTERN_FIELDS and isinstance(raw, (list, tuple)):
            raw = ",".join(map(str, raw))
        elif isinstance(raw, bool):
            raw = "1" if raw else "0"
        else:
            raw = str(raw)
    try:
        return parser(raw)
    except ValueError as exc:
        reason = str(exc)
        if reason.startswith(("invalid literal", "could not convert")):
            reason = "is not a number"
        raise ConfigError(f"{source}={raw!r}: {reason}") from None


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read ``OTEL_FLASHINFER_*`` from ``environ`` (default ``os.environ``); keyword
    arguments (field names of Settings, e.g. ``level=5``) take precedence."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field, (var, _) in _FIELDS.items():
        if var in env:
            raw = env[var]
            # Empty is unset (OpenTelemetry's rule for its variables), but for the
            # journal, whose empty value is documented as off.
            if not raw.strip() and field != "journal_dir":
                continue
            values[field] = _parse(field, raw, var)
    for field, raw in overrides.items():
        if raw is None:
            continue
        if field not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"unknown setting {field!r} (known: {known})")
        values[field] = _parse(field, raw, f"{field} (argument)")
    return Settings(**values)


def autostart_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``OTEL_FLASHINFER_AUTOSTART`` (default on); ConfigError naming a bad value."""
    env = os.environ if environ is None else environ
    raw = env.get(OTEL_FLASHINFER_AUTOSTART, "1")
    if not raw.strip():
        return True
    try:
        return _flag(raw)
    except ValueError as exc:
        raise ConfigError(f"{OTEL_FLASHINFER_AUTOSTART}={raw!r}: {exc}") from None


def jit_cache_root(environ: Mapping[str, str] | None = None) -> str:
    """Folder for our compiled extensions (``OTEL_FLASHINFER_CACHE_DIR``, else
    ``~/.cache/otel_flashinfer``); read where it is used, since builds start lazily."""
    env = os.environ if environ is None else environ
    return env.get(OTEL_FLASHINFER_CACHE_DIR) or os.path.join(
        os.path.expanduser("~"), ".cache", "otel_flashinfer")
