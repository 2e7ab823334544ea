"""``otel-flashinfer recover [DIR]``: turn the crash journals of dead processes into
spans without starting an instrumented program.

Spans go through the same provider resolution as instrumentation (the standard
``OTEL_*`` variables, else the local OTLP/JSON-lines file), and are flushed before
the command returns.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import health

DEFAULT_DIR = "./flashinfer_journal"


def add_recover_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``recover`` on an argparse subparsers object (``func`` = run_recover)."""
    parser = subparsers.add_parser(
        "recover",
        help="emit the in-flight calls of crashed processes as ERROR spans",
        description="Find crash journals of processes that are gone, emit their "
                    "in-flight calls as spans (flashinfer.crash = true), delete them.",
    )
    parser.add_argument("dir", nargs="?", default=None,
                        help="journal folder (default: OTEL_FLASHINFER_JOURNAL_DIR or "
                             f"{DEFAULT_DIR})")
    parser.add_argument("--all-hosts", action="store_true",
                        help="also recover journals written on other hosts (their "
                             "processes cannot be checked from here)")
    parser.set_defaults(func=run_recover)
    return parser


def run_recover(args: argparse.Namespace) -> int:
    """Recover, flush, print a summary; 0, or 1 on a bad argument or setting."""
    from .config import ConfigError, load_settings
    from .journal import claim_journals, finish_claims
    from .pipeline import Pipeline
    from .provider import our_provider, resolve_provider
    from .runtime import SCOPE_NAME
    from .version import __version__

    directory = args.dir
    if directory is None:
        directory = os.environ.get("OTEL_FLASHINFER_JOURNAL_DIR", "").strip() or DEFAULT_DIR
    elif not os.path.isdir(directory):
        print(f"otel-flashinfer recover: {directory!r} is not a directory", file=sys.stderr)
        return 1
    try:
        settings = load_settings()
        provider = resolve_provider(settings.traces_file)
    except ConfigError as exc:
        print(f"otel-flashinfer recover: {exc}", file=sys.stderr)
        return 1
    pipeline = Pipeline(tracer=provider.get_tracer(SCOPE_NAME, __version__), provider=provider)
    dropped = health.dropped()
    claims = claim_journals(directory, all_hosts=bool(getattr(args, "all_hosts", False)))
    exported = False
    try:
        for claim in claims:
            for record in claim.records:
                pipeline.submit(record)
        flushed = pipeline.shutdown(30.0)
        ours = our_provider()
        # Only our own provider's export is waited for here (an application's is not
        # ours to shut down): ``flushed`` and the drop count cover it.
        if ours is not None:
            flushed = ours.shutdown() is not False and flushed
        lost = health.dropped() - dropped
        exported = flushed and not lost
    finally:
        # A journal is deleted only once its spans are out; otherwise it stays for the
        # next ``recover`` (which may then send some spans twice, with the same ids).
        finish_claims(claims, exported)
    spans = sum(len(claim.records) for claim in claims)
    if exported:
        print(f"recovered {spans} span(s) from {len(claims)} journal(s) in {directory}")
        return 0
    print(f"read {spans} span(s) from {len(claims)} journal(s) in {directory}; not all "
          "were exported")
    if not flushed:
        print("otel-flashinfer recover: not every span was exported in 30 s", file=sys.stderr)
    if lost:
        print(f"otel-flashinfer recover: {lost} span(s) were dropped on the way out "
              "(see the log above)", file=sys.stderr)
    kept = sum(1 for claim in claims if claim.path)
    print(f"otel-flashinfer recover: kept the {kept} journal(s) for a later recover",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m otel_flashinfer.journal_cli recover DIR``)."""
    parser = argparse.ArgumentParser(prog="otel-flashinfer")
    sub = parser.add_subparsers(dest="command", required=True)
    add_recover_parser(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 1
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
