"""``otel-flashinfer pull``, ``ls`` and ``replay`` subcommands (argparse)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..blobs.index import describe_store
from ..blobs.manifest import ManifestError
from ..blobs.store import BlobStore, StoreError
from .pull import BundleError, pull
from .runner import replay
from .session import TIME_HELP, format_listing, pull_session


def _default_out(ns: argparse.Namespace) -> str:
    if ns.trace_id is not None:
        name = ns.trace_id.lower()[:32]
    elif ns.process is not None:
        name = f"process_{ns.process}"
    else:
        name = f"service_{ns.service}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return os.path.join(".", f"flashinfer_bundle_{safe}")


def _pull(ns: argparse.Namespace) -> int:
    session = ns.process is not None or ns.service is not None
    problem = None
    if session and ns.trace_id is not None:
        problem = "give TRACE_ID or --process/--service, not both"
    elif ns.process is not None and ns.service is not None:
        problem = "give --process or --service, not both"
    elif not session and ns.trace_id is None:
        problem = "give TRACE_ID, --process PID or --service NAME"
    elif not session and (ns.since is not None or ns.until is not None):
        problem = "--since/--until apply to --process/--service"
    elif session and ns.span is not None:
        problem = "--span applies to TRACE_ID"
    if problem is not None:
        _error(f"otel-flashinfer pull: {problem}")
        return 2
    out = ns.output or _default_out(ns)
    missing = _no_local_store(ns.blob_url)
    if missing:
        _error(f"otel-flashinfer pull: {missing}")
        return 1
    try:
        if session:
            bundle = pull_session(ns.blob_url, out, process=ns.process, service=ns.service,
                                  since=ns.since, until=ns.until,
                                  allow_pickle=ns.allow_pickle)
        else:
            bundle = pull(ns.trace_id, ns.blob_url, out, span_id=ns.span,
                          allow_pickle=ns.allow_pickle)
    except (BundleError, ManifestError, StoreError, ValueError, OSError) as exc:
        _error(f"otel-flashinfer pull: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - a store's client (S3 unreachable...): one line
        _error(f"otel-flashinfer pull: {ns.blob_url}: {type(exc).__name__}: {exc}")
        return 1
    print(f"pulled {len(bundle.calls)} calls, {bundle.objects} objects "
          f"({bundle.bytes / 1e6:.1f} MB) into {bundle.path}")
    return 0


def _no_local_store(url: str) -> str | None:
    """Why a local store URL names no store (a typo must not read as "no calls"), or
    None; remote stores say so themselves when read."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = url[len("file://"):] if url.startswith("file://") else url
    if not os.path.isdir(path):
        return f"{url}: no blob store there (no such folder)"
    return None


def _ls(ns: argparse.Namespace) -> int:
    missing = _no_local_store(ns.blob_url)
    if missing:
        _error(f"otel-flashinfer ls: {missing}")
        return 1
    try:
        store = BlobStore(ns.blob_url, check_writable=False)
        listing = describe_store(store)
    except (StoreError, ValueError, OSError) as exc:
        _error(f"otel-flashinfer ls: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - a store's client (S3 unreachable...): one line
        _error(f"otel-flashinfer ls: {ns.blob_url}: {type(exc).__name__}: {exc}")
        return 1
    if ns.json:
        print(json.dumps(listing, indent=1))
    else:
        from ..show import printable

        # A store's names are untrusted: no control character reaches the terminal.
        sys.stdout.write("\n".join(printable(line)
                                   for line in format_listing(listing).split("\n")))
    return 0


def _replay(ns: argparse.Namespace) -> int:
    try:
        report = replay(ns.dir, device=ns.device, allow_modules=tuple(ns.allow_module),
                        rtol=ns.rtol, atol=ns.atol, allow_pickle=ns.allow_pickle)
    except (BundleError, ManifestError, ValueError, OSError) as exc:
        _error(f"otel-flashinfer replay: {exc}")
        return 1
    return 0 if report.ok else 1


def _error(text: str) -> None:
    """One line on stderr; a store's or bundle's text in it is untrusted: no control
    character reaches the terminal raw."""
    from ..show import printable

    print(printable(text), file=sys.stderr)


def _device(text: str) -> str:
    """A torch device this machine has (argparse names the option on error): a typo or
    a GPU that is not here is said once, not as a fault of every recorded call."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({exc})") from None
    if device.type == "meta":  # no data: nothing to compare or to run a kernel on
        raise argparse.ArgumentTypeError(f"{text!r}: a meta tensor holds no data to replay")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA "
                                             "devices")
    return text


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


_PICKLE_HELP = ("read objects recorded with OTEL_FLASHINFER_BLOB_FORMAT=torch (pickles) "
                "with torch's weights_only loader; refused without it")


def add_pull_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pull``; the parsed namespace's ``func(ns) -> exit code`` runs it."""
    p = subparsers.add_parser("pull", help="fetch a trace's (or a process') tensors into a "
                              "verified bundle that replays on its own")
    p.add_argument("trace_id", metavar="TRACE_ID", nargs="?", default=None,
                   help="32 hex digits")
    p.add_argument("--span", metavar="SPAN_ID", default=None,
                   help="only this span (plus its object's __init__/plan in force)")
    p.add_argument("--process", metavar="PID", default=None,
                   help="every recorded call of this process (a pid, or <pid>-<hex> from ls)")
    p.add_argument("--service", metavar="NAME", default=None,
                   help="every recorded call of this service (OTEL_SERVICE_NAME)")
    p.add_argument("--since", metavar="T", default=None, help=f"window start: {TIME_HELP}")
    p.add_argument("--until", metavar="T", default=None, help=f"window end: {TIME_HELP}")
    p.add_argument("--blob-url", metavar="URL",
                   default=os.environ.get("OTEL_FLASHINFER_BLOB_URL", "./flashinfer_blobs"))
    p.add_argument("--allow-pickle", action="store_true", help=_PICKLE_HELP)
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="bundle folder (default ./flashinfer_bundle_<trace id|process|service>)")
    p.set_defaults(func=_pull)
    return p


def add_ls_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``ls``; the parsed namespace's ``func(ns) -> exit code`` runs it."""
    p = subparsers.add_parser("ls", help="what a blob store holds: processes, traces, calls "
                              "per API, bytes")
    p.add_argument("--blob-url", metavar="URL",
                   default=os.environ.get("OTEL_FLASHINFER_BLOB_URL", "./flashinfer_blobs"))
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=_ls)
    return p


def add_replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``replay``; the parsed namespace's ``func(ns) -> exit code`` runs it."""
    p = subparsers.add_parser("replay", help="re-run a bundle's calls and compare outputs")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--device", type=_device, default=None,
                   help="e.g. cpu, cuda:0 (default: as recorded)")
    p.add_argument("--allow-module", metavar="PATTERN", action="append", default=[],
                   help="fnmatch pattern of extra modules that may be imported (repeatable)")
    p.add_argument("--allow-pickle", action="store_true", help=_PICKLE_HELP)
    p.add_argument("--rtol", type=_nonneg, default=None)
    p.add_argument("--atol", type=_nonneg, default=None)
    p.set_defaults(func=_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (tests, ``python -m otel_flashinfer.replay.cli``)."""
    parser = argparse.ArgumentParser(prog="otel-flashinfer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pull_parser(sub)
    add_ls_parser(sub)
    add_replay_parser(sub)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
