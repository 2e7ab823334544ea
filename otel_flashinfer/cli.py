"""``otel-flashinfer``: run, show, push, pull, ls, replay, recover.

Each subcommand lives with the module that does its job; this file only parses
arguments and maps errors to one clear line and an exit code.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from .version import __version__

DEFAULT_TRACES_FILE = "./flashinfer_traces.jsonl"


def _default_trace_file() -> str:
    return os.environ.get("OTEL_FLASHINFER_TRACES_FILE", "").strip() or DEFAULT_TRACES_FILE


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import render_file

    path = args.file or _default_trace_file()
    trace = args.trace
    if trace is not None:
        from .blobs.layout import trace_hex

        trace = trace_hex(trace)  # a typo is an error, not "no spans"
    skipped: list[str] = []
    sys.stdout.write(render_file(path, color=args.color, trace_id=trace, skipped=skipped))
    return _said_skipped("show", skipped)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse names the option on error)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _said_skipped(command: str, skipped: list[str]) -> int:
    """Each bad line of a trace file on stderr (the good ones were used); exit 1."""
    for problem in skipped:
        print(f"otel-flashinfer {command}: skipped {problem}", file=sys.stderr)
    return 1 if skipped else 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .push import push_file

    path = args.file or _default_trace_file()
    skipped: list[str] = []
    try:
        sent = push_file(path, endpoint=args.endpoint, protocol=args.protocol,
                         headers=args.header, timeout_s=args.timeout, skipped=skipped)
    except Exception:
        _said_skipped("push", skipped)  # the lines passed over before it stopped
        raise
    print(f"pushed {sent} spans from {path}"
          + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return _said_skipped("push", skipped)


def _cmd_run(args: argparse.Namespace) -> int:
    from .launcher import run_command

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run: give the command to run after --, e.g. "
                         "otel-flashinfer run -- python -m sglang.launch_server ...")
    return run_command(command)


class UsageError(Exception):
    """A command line that cannot be acted on; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-flashinfer",
        description="OpenTelemetry tracing for FlashInfer: run, inspect and replay traces.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")

    run = sub.add_parser("run", help="run a command with instrumentation in every Python "
                         "process it starts")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ...")
    run.set_defaults(func=_cmd_run)

    show = sub.add_parser("show", help="print the span tree of a local trace file")
    show.add_argument("file", nargs="?", help=f"OTLP/JSON lines (default {DEFAULT_TRACES_FILE})")
    show.add_argument("--trace", help="only this trace id (32 hex digits)")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    show.set_defaults(func=_cmd_show)

    push = sub.add_parser("push", help="send a local trace file to a collector over OTLP")
    push.add_argument("file", nargs="?", help=f"OTLP/JSON lines (default {DEFAULT_TRACES_FILE})")
    push.add_argument("--endpoint", help="collector URL (default: OTEL_EXPORTER_OTLP_"
                      "[TRACES_]ENDPOINT, else http://localhost:4318 / localhost:4317)")
    push.add_argument("--protocol", choices=("grpc", "http/protobuf"),
                      help="default: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else http/protobuf")
    push.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                      help="extra header (repeatable); OTEL_EXPORTER_OTLP_HEADERS also applies")
    push.add_argument("--timeout", type=_seconds, default=10.0, help="seconds per request")
    push.set_defaults(func=_cmd_push)

    for module, adder in (("replay.cli", "add_pull_parser"), ("replay.cli", "add_ls_parser"),
                          ("replay.cli", "add_replay_parser"),
                          ("journal_cli", "add_recover_parser")):
        try:
            mod = __import__(f"otel_flashinfer.{module}", fromlist=[adder])
        except ImportError:
            continue
        add = getattr(mod, adder, None)
        if add is not None:
            add(sub)
    return parser


def _stop_autostart() -> None:
    """``python -m otel_flashinfer`` with OTEL_FLASHINFER_LEVEL set was instrumented at
    start-up: our own tool must not trace (or store payloads of) what it replays."""
    autostart = sys.modules.get("otel_flashinfer._autostart")
    if autostart is not None and autostart.started:
        import otel_flashinfer

        otel_flashinfer.uninstrument()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    _stop_autostart()
    from .config import ConfigError
    from .otlp_json import TraceFileError

    try:
        return int(func(args) or 0)
    except UsageError as exc:
        print(f"otel-flashinfer: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, TraceFileError, FileNotFoundError, ValueError, ConnectionError,
            OSError) as exc:
        print(f"otel-flashinfer {args.command_name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
