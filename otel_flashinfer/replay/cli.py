"""``otel-flashinfer pull`` and ``replay`` subcommands (argparse)."""

from __future__ import annotations

import argparse
import os
import sys

from ..blobs.manifest import ManifestError
from ..blobs.store import StoreError
from .pull import BundleError, pull
from .runner import replay


def _pull(ns: argparse.Namespace) -> int:
    out = ns.output or os.path.join(".", f"flashinfer_bundle_{ns.trace_id.lower()[:32]}")
    try:
        bundle = pull(ns.trace_id, ns.blob_url, out, span_id=ns.span)
    except (BundleError, ManifestError, StoreError, ValueError, OSError) as exc:
        print(f"otel-flashinfer pull: {exc}", file=sys.stderr)
        return 1
    print(f"pulled {len(bundle.calls)} calls, {bundle.objects} objects "
          f"({bundle.bytes / 1e6:.1f} MB) into {bundle.path}")
    return 0


def _replay(ns: argparse.Namespace) -> int:
    try:
        report = replay(ns.dir, device=ns.device, allow_modules=tuple(ns.allow_module),
                        rtol=ns.rtol, atol=ns.atol)
    except (BundleError, ManifestError, ValueError, OSError) as exc:
        print(f"otel-flashinfer replay: {exc}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _nonneg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def add_pull_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pull``; the parsed namespace's ``func(ns) -> exit code`` runs it."""
    p = subparsers.add_parser("pull", help="fetch a trace's tensors into a verified bundle")
    p.add_argument("trace_id", metavar="TRACE_ID", help="32 hex digits")
    p.add_argument("--span", metavar="SPAN_ID", default=None,
                   help="only this span (plus its object's earlier __init__/plan calls)")
    p.add_argument("--blob-url", metavar="URL",
                   default=os.environ.get("OTEL_FLASHINFER_BLOB_URL", "./flashinfer_blobs"))
    p.add_argument("-o", "--output", metavar="DIR", default=None,
                   help="bundle folder (default ./flashinfer_bundle_<trace id>)")
    p.set_defaults(func=_pull)
    return p


def add_replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``replay``; the parsed namespace's ``func(ns) -> exit code`` runs it."""
    p = subparsers.add_parser("replay", help="re-run a bundle's calls and compare outputs")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: as recorded)")
    p.add_argument("--allow-module", metavar="PATTERN", action="append", default=[],
                   help="fnmatch pattern of extra modules that may be imported (repeatable)")
    p.add_argument("--rtol", type=_nonneg, default=None)
    p.add_argument("--atol", type=_nonneg, default=None)
    p.set_defaults(func=_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (tests, ``python -m otel_flashinfer.replay.cli``)."""
    parser = argparse.ArgumentParser(prog="otel-flashinfer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pull_parser(sub)
    add_replay_parser(sub)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
