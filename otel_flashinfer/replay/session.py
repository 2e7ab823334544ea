"""``pull --process PID | --service NAME [--since T] [--until T]`` and ``ls``.

A whole process (or every process of a service) in a time window becomes one
bundle, in call order, like FlashInfer's dump folder: calls that were never
under one parent span each have their own trace, so a trace id cannot name them.
The store's per-process listing (``blobs.index``) gives the calls without reading
every trace; the ``__init__``/``plan`` of objects made before ``--since`` come
along as for a trace pull.
"""

from __future__ import annotations

import datetime as _dt

from ..blobs import index, layout
from ..blobs.store import BlobStore
from .pull import Bundle, BundleError, complete_chains, read_manifest, write_bundle

TIME_HELP = "ISO 8601 (2026-12-04T13:00:00, with Z or +01:00; without: local time) " \
            "or Unix seconds"


def parse_time(text: str, option: str) -> int:
    """A ``--since``/``--until`` value -> ns since the epoch; BundleError naming it."""
    value = (text or "").strip()
    try:
        if value.replace(".", "", 1).isdigit():
            return int(float(value) * 1e9)
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        return int(parsed.timestamp() * 1e9)
    except (ValueError, OverflowError, OSError):
        raise BundleError(f"{option} {text!r}: not a time ({TIME_HELP})") from None


def select_processes(store: BlobStore, process: str | None, service: str | None
                     ) -> list[str]:
    """Process folders named by ``--process`` (a pid, or ``pid-hex`` as ``ls`` prints
    it) or ``--service``; BundleError naming what matched nothing."""
    known = index.list_processes(store)
    if process is not None:
        text = process.strip()
        if text.isascii() and text.isdigit():  # "²" is a digit to isdigit, not to int
            chosen = [p for p in known if layout.process_pid(p) == int(text)]
        else:
            try:
                layout.check_process(text)
            except ValueError:
                raise BundleError(f"--process {process!r}: not a pid or a process name "
                                  "<pid>-<hex> as `otel-flashinfer ls` prints it") from None
            chosen = [p for p in known if p == text]
        if not chosen:
            raise BundleError(f"process {process} has no recorded calls in {store.url} "
                              f"(known: {', '.join(known) or 'none'})")
        return chosen
    if service is not None:
        chosen = [p for p in known if index.read_info(store, p)["service"] == service]
        if not chosen:
            services = sorted({index.read_info(store, p)["service"] for p in known} - {""})
            raise BundleError(f"service {service!r} has no recorded calls in {store.url} "
                              f"(known: {', '.join(services) or 'none'})")
        return chosen
    raise BundleError("give --process PID or --service NAME")


def pull_session(
    blob_url: str,
    out_dir: str,
    *,
    process: str | None = None,
    service: str | None = None,
    since: str | None = None,
    until: str | None = None,
    workers: int = 16,
    progress: bool | None = None,
    allow_pickle: bool = False,
) -> Bundle:
    """One bundle of every recorded call of a process or service in a time window."""
    lo = parse_time(since, "--since") if since is not None else None
    hi = parse_time(until, "--until") if until is not None else None
    if lo is not None and hi is not None and hi < lo:
        raise BundleError(f"--until {until!r} is before --since {since!r}")
    store = BlobStore(blob_url, check_writable=False)
    processes = select_processes(store, process, service)
    entries = [e for p in processes for e in index.list_calls(store, p)
               if (lo is None or e["start_ns"] >= lo) and (hi is None or e["start_ns"] <= hi)]
    who = f"process {process}" if process is not None else f"service {service!r}"
    if not entries:
        window = f" between {since or 'the start'} and {until or 'the end'}" \
            if (since or until) else ""
        raise BundleError(f"no recorded calls of {who}{window} in {blob_url}")
    manifests = complete_chains(store, [(e["manifest"], read_manifest(store, e["manifest"]))
                                        for e in entries])
    selection = {"processes": processes, "since_ns": lo, "until_ns": hi}
    if service is not None:
        selection["service"] = service
    return write_bundle(store, manifests, out_dir, selection, workers=workers,
                        progress=progress, allow_pickle=allow_pickle)


def format_listing(processes: list[dict]) -> str:
    """``ls`` output: one block per process, calls and bytes per API."""
    if not processes:
        return "no recorded calls\n"
    lines = []
    for p in processes:
        first = _when(p["first_ns"])
        last = _when(p["last_ns"])
        lines.append(f"process {p['process']}  pid={p['pid']}  service={p['service'] or '-'}  "
                     f"host={p['host'] or '-'}  calls={p['calls']}  traces={p['traces']}  "
                     f"bytes={_size(p['bytes'])}  {first} .. {last}")
        for api, c in p["apis"].items():
            lines.append(f"  {api:<56} {c['calls']:>7} calls  {_size(c['bytes']):>10}")
    total = sum(p["bytes"] for p in processes)
    calls = sum(p["calls"] for p in processes)
    lines.append(f"{len(processes)} processes, {calls} calls, {_size(total)}")
    return "\n".join(lines) + "\n"


def _when(ns: int | None) -> str:
    if ns is None:
        return "-"
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
