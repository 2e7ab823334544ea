"""The embedded default: OTLP/JSON lines on disk, `show` and `push` (to a real HTTP
server on 127.0.0.1 that decodes the protobuf it receives)."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_flashinfer import cli, otlp_json, show
from otel_flashinfer.provider import exporter_names, otlp_protocol
from otel_flashinfer.push import parse_headers, resolve_target

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import torch, otel_flashinfer
    from opentelemetry import trace
    otel_flashinfer.instrument(level=3, journal_dir="")

    @otel_flashinfer.traced
    def rmsnorm(x, eps=1e-6):
        return x

    @otel_flashinfer.traced
    def fails(x):
        raise RuntimeError("bad plan")

    with trace.get_tracer("engine").start_as_current_span("engine.step") as step:
        rmsnorm(torch.ones(8, 128, dtype=torch.float16))
        try:
            fails(1)
        except RuntimeError:
            pass
    print(format(step.get_span_context().trace_id, "032x"))
    """
)


def run_program(cwd: Path, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=cwd, env=full_env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_default_writes_otlp_json_lines(tmp_path: Path) -> None:
    trace_id = run_program(tmp_path)
    path = tmp_path / "flashinfer_traces.jsonl"
    requests = list(otlp_json.read_requests(str(path)))
    spans = show.collect_spans(requests)
    names = {s["name"]: s for s in spans}
    assert set(names) == {"engine.step", "rmsnorm", "fails"}
    for span in spans:
        assert span["traceId"] == trace_id
        assert len(span["spanId"]) == 16 and span["spanId"] == span["spanId"].lower()
        int(span["spanId"], 16)
    assert names["rmsnorm"]["parentSpanId"] == names["engine.step"]["spanId"]
    assert names["rmsnorm"]["attrs"]["flashinfer.arg.x.shape"] == [8, 128]
    assert names["rmsnorm"]["attrs"]["flashinfer.arg.eps"] == 1e-6
    assert names["fails"]["status"]["code"] == 2  # enum as integer, as OTLP/JSON asks
    assert names["rmsnorm"]["kind"] == 1
    # every line decodes back into the protobuf request
    for request in requests:
        assert isinstance(otlp_json.json_to_request(request), ExportTraceServiceRequest)

    text = show.render_file(str(path), color="never")
    assert f"trace {trace_id}" in text
    lines = text.splitlines()
    step = next(i for i, line in enumerate(lines) if "engine.step" in line)
    assert lines[step + 1].startswith(("   ├─ rmsnorm", "   └─ rmsnorm"))
    assert "arg.x.shape=[8, 128]" in text and "fails" in text and "ERROR" in text


def _run_python(cwd: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` with this checkout, no OTEL_* of ours but ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env)
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def _spans_in_file(path: Path) -> int:
    return sum(len(ss["spans"]) for line in path.open()
               for rs in json.loads(line)["resourceSpans"] for ss in rs["scopeSpans"])


def test_every_span_reaches_the_file_at_a_normal_exit(tmp_path: Path) -> None:
    """No flush() by the program: the exit flush writes the last batch.  (The file's
    descriptor used to be closed by its finalizer at exit first: 19,488 of 20,000.)"""
    program = ("import otel_flashinfer as of\n"
               "of.instrument(level=1, journal_dir='')\n"
               "f = of.traced(lambda a: a, name='f')\n"
               "for i in range(20000):\n    f(i)\n")
    out = _run_python(tmp_path, ["-c", program])
    assert "Bad file descriptor" not in out.stderr
    assert _spans_in_file(tmp_path / "flashinfer_traces.jsonl") == 20000


def test_traces_file_variable_and_cli_show(tmp_path: Path, capsys) -> None:
    target = tmp_path / "sub" / "t.jsonl"
    run_program(tmp_path, OTEL_FLASHINFER_TRACES_FILE=str(target))
    assert target.exists() and not (tmp_path / "flashinfer_traces.jsonl").exists()
    assert cli.main(["show", str(target), "--color", "never"]) == 0
    assert "rmsnorm" in capsys.readouterr().out


def test_show_errors_are_one_clear_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\nnot json\n')
    assert cli.main(["show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: not JSON" in err
    assert cli.main(["show", str(tmp_path / "missing.jsonl")]) == 1
    assert "no trace file" in capsys.readouterr().err


_GOOD = ('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"' + "ab" * 16 +
         '","spanId":"' + "cd" * 8 + '","name":"ok","startTimeUnixNano":"1",'
         '"endTimeUnixNano":"5"}]}]}]}')


@pytest.mark.parametrize(("line", "says"), [
    (b'{"resourceSpans":[1]}', "resourceSpans is not a list of objects"),
    (b'{"resourceSpans":[{"scopeSpans":"nope"}]}', "scopeSpans is not a list of objects"),
    (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"startTimeUnixNano":"abc"}]}]}]}',
     "startTimeUnixNano 'abc' is not a time"),
    (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}',
     "traceId 'zz' is not 32 hex digits"),
    (b"\xff\xfe", "not UTF-8 text"),
])
@pytest.mark.parametrize("command", ["show", "push"])
def test_a_malformed_trace_line_is_named_by_file_and_line(tmp_path: Path, capsys, line: bytes,
                                                          says: str, command: str) -> None:
    """A trace file is untrusted: each bad shape is one line naming file:line and what
    is wrong, never a traceback from inside the reader; the good lines are still used."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(line + b"\n" + _GOOD.encode() + b"\n")
    args = [command, str(bad)] + (["--endpoint", "http://127.0.0.1:9"] if command == "push"
                                  else [])
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1: " in err and says in err and "Traceback" not in err


def test_push_names_the_line_protobuf_refuses(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_GOOD.replace('"name":"ok"', '"name":"ok","kind":"bogus"') + "\n")
    assert cli.main(["push", str(bad), "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1: " in err and "kind" in err


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_push_sends_the_same_spans_over_otlp_http(tmp_path: Path) -> None:
    run_program(tmp_path)
    path = tmp_path / "flashinfer_traces.jsonl"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Collector.received.clear()
        port = server.server_address[1]
        code = cli.main(["push", str(path), "--endpoint", f"http://127.0.0.1:{port}",
                         "--protocol", "http/protobuf", "--header", "x-team=infra"])
        assert code == 0
    finally:
        server.shutdown()
    sent_ids = set()
    for req_path, headers, body in _Collector.received:
        assert req_path == "/v1/traces"
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-team"] == "infra"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                sent_ids.update(s.span_id.hex() for s in ss.spans)
    file_ids = {s["spanId"] for s in show.collect_spans(otlp_json.read_requests(str(path)))}
    assert sent_ids == file_ids and len(file_ids) == 3


def test_push_to_closed_port_fails_cleanly(tmp_path: Path, capsys) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"resourceSpans": []}) + "\n")
    assert cli.main(["push", str(path), "--endpoint", "http://127.0.0.1:9",
                     "--protocol", "http/protobuf", "--timeout", "2"]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err


def test_push_to_a_grpc_port_over_http_says_so(tmp_path: Path, capsys) -> None:
    """``push`` defaults to http/protobuf, the SDK's exporter to grpc: the same
    OTEL_EXPORTER_OTLP_ENDPOINT on port 4317 then reaches a gRPC server, which answers
    with no HTTP status line.  That is one clear line naming the fix, not a traceback."""
    from servers import free_port, start_otlp_receiver, stop_pid

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"resourceSpans": []}) + "\n")
    grpc_port = free_port()
    proc = start_otlp_receiver(free_port(), grpc_port)
    try:
        code = cli.main(["push", str(path), "--endpoint", f"http://127.0.0.1:{grpc_port}",
                         "--timeout", "5"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert "no OTLP/HTTP answer" in err and "--protocol grpc" in err, err
        assert "Traceback" not in err
        # The same file over gRPC to the same port goes through.
        assert cli.main(["push", str(path), "--endpoint", f"http://127.0.0.1:{grpc_port}",
                         "--protocol", "grpc", "--timeout", "5"]) == 0
    finally:
        stop_pid(proc.pid)


def test_env_resolution_rules() -> None:
    assert exporter_names({}) == ["otlp_file"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console,none"}) == ["console"]
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='udp'") as bad:
        otlp_protocol({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"})
    # It names only what works: http/json was listed, then refused when given.
    assert "must be grpc or http/protobuf" in str(bad.value)
    assert resolve_target(None, None, {}) == ("http/protobuf", "http://localhost:4318/v1/traces")
    assert resolve_target("http://h:1", "grpc", {}) == ("grpc", "http://h:1")
    assert parse_headers("a=1,B=x%20y", "h") == {"a": "1", "b": "x y"}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_headers("novalue", "OTEL_EXPORTER_OTLP_HEADERS")


def test_sdk_disabled_installs_nothing(tmp_path: Path) -> None:
    program = textwrap.dedent(
        """
        import otel_flashinfer
        from otel_flashinfer import runtime
        otel_flashinfer.instrument(level=3, journal_dir="")
        f = otel_flashinfer.traced(lambda x: x + 1, name="f")
        assert f(1) == 2
        print("runtime", runtime.current())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_SDK_DISABLED="true", OTEL_FLASHINFER_LEVEL="3",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert "runtime None" in out.stdout
    assert not (tmp_path / "flashinfer_traces.jsonl").exists()


def test_bad_bsp_settings_name_the_variables(monkeypatch) -> None:
    from otel_flashinfer.config import ConfigError
    from otel_flashinfer.provider import build_provider

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "64")
    with pytest.raises(ConfigError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
        build_provider("unused.jsonl")


def test_fork_children_of_an_environment_only_setup_write_their_spans(tmp_path: Path) -> None:
    """``traced`` turned on by OTEL_FLASHINFER_LEVEL alone (no instrument(), no start-up
    hook): multiprocessing's fork children end in os._exit, and still flush."""
    program = textwrap.dedent("""
        import multiprocessing as mp, otel_flashinfer as of
        f = of.traced(lambda a: a, name="child_call")
        def work(n):
            for i in range(n):
                f(i)
        if __name__ == "__main__":
            f(0)  # the parent turns tracing on before it forks
            procs = [mp.get_context("fork").Process(target=work, args=(500,)) for _ in range(3)]
            for p in procs: p.start()
            for p in procs: p.join()
    """)
    (tmp_path / "prog.py").write_text(program)
    _run_python(tmp_path, ["prog.py"], OTEL_FLASHINFER_LEVEL="3",
                OTEL_FLASHINFER_AUTOSTART="0", OTEL_FLASHINFER_JOURNAL_DIR="")
    assert _spans_in_file(tmp_path / "flashinfer_traces.jsonl") == 1 + 3 * 500


def test_what_the_span_encoder_leaves_out_is_counted(tmp_path: Path) -> None:
    """An argument the native encoder cannot write (a lone surrogate in a str) is left
    out of its span, said once in the log and counted: not silent."""
    program = ("import otel_flashinfer as of\n"
               "of.instrument(level=3, journal_dir='')\n"
               "f = of.traced(lambda s: s, name='f')\n"
               "f('ok\\ud800bad'); f('fine')\n"
               "of.flush(10); c = of.counters()\n"
               "print(c.get('spans_native', 0), c.get('attribute_errors', 0))\n")
    out = _run_python(tmp_path, ["-c", program])
    native, left_out = map(int, out.stdout.split())
    assert native == 2 and left_out >= 1
    assert "could not write were left out" in out.stderr


_SLOW_SHUTDOWN = """
import threading, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

class Slow(SpanExporter):
    n = 0
    def export(self, spans):
        time.sleep(0.002); Slow.n += len(spans); return SpanExportResult.SUCCESS
    def shutdown(self): pass

provider = TracerProvider(); provider.add_span_processor(SimpleSpanProcessor(Slow()))
trace.set_tracer_provider(provider)
errors = []
threading.excepthook = lambda a: errors.append(repr(a.exc_value))
import otel_flashinfer
from otel_flashinfer import health, runtime
otel_flashinfer.instrument(level=1, journal_dir="")
f = otel_flashinfer.traced(lambda: None, name="f")
for _ in range(600):
    f()
pipeline = runtime.current().pipeline
pipeline.shutdown(0.2)            # times out with a backlog the worker still drains
for _ in range(20):
    f()                           # calls after the stop: counted, never queued
pipeline._thread.join(30)
print(Slow.n, health.counters().get("spans_dropped", 0), errors)
"""


def test_a_timed_out_shutdown_leaves_the_backlog_to_the_worker(tmp_path: Path) -> None:
    """shutdown() with a backlog a slow exporter has not taken yet: the worker drains
    it as it stops (nothing else pops that queue: the worker used to die with
    IndexError); every span is exported or counted, calls after the stop included."""
    out = _run_python(tmp_path, ["-c", _SLOW_SHUTDOWN])
    exported, dropped, errors = out.stdout.strip().split(" ", 2)
    assert errors == "[]", out.stderr
    # the backlog exported by the stopping worker; the 20 late calls counted
    assert (int(exported), int(dropped)) == (600, 20)


_BAD_SHAPES = [
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","attributes":[{"value":5}]}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","attributes":'
    '[{"key":"k","value":5}]}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","attributes":'
    '[{"key":"k","value":{"arrayValue":[1]}}]}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","attributes":'
    '[{"key":"k","value":{"intValue":"abc"}}]}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","status":"bad"}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"scope":"x","spans":[]}]}]}',
    '{"resourceSpans":[{"resource":"x","scopeSpans":[]}]}',
    "[" * 100_000,
    # Shapes the checker itself once raised on (a traceback, no span shown):
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","events":null}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x",'
    '"startTimeUnixNano":"\u00b2"}]}]}]}',  # a digit to str.isdigit, not to int
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x",'
    '"startTimeUnixNano":"' + "9" * 5000 + '"}]}]}]}',
    '{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"x","n":' + "1" * 5000 + '}]}]}]}',
    '{"resourceSpans":[{"scopeSp',  # a killed writer's last line
]


@pytest.mark.parametrize("bad", _BAD_SHAPES, ids=[str(i) for i in range(len(_BAD_SHAPES))])
def test_show_shows_the_good_lines_and_names_each_bad_one(tmp_path: Path, capsys,
                                                          bad: str) -> None:
    """One bad line (a truncated last one, a value of the wrong shape) does not hide
    the file's other spans: they are shown, the bad line is named, the exit is 1."""
    path = tmp_path / "t.jsonl"
    path.write_text(_GOOD + "\n" + bad + "\n" + _GOOD.replace("cd" * 8, "ef" * 8) + "\n")
    assert cli.main(["show", str(path), "--color", "never"]) == 1
    out, err = capsys.readouterr()
    assert out.count("ok  ") == 2, out
    assert f"skipped {path}:2: " in err and "Traceback" not in err


def test_push_sends_the_good_lines_past_a_bad_one(tmp_path: Path, capsys) -> None:
    """Stopping at a bad line left the lines before it sent, and pushing again sent
    them twice; now every good line goes once and the bad one is named."""
    path = tmp_path / "t.jsonl"
    path.write_text(_GOOD + "\n" + _BAD_SHAPES[-1] + "\n" + _GOOD.replace("cd" * 8, "ef" * 8)
                    + "\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Collector.received.clear()
        code = cli.main(["push", str(path), "--endpoint",
                         f"http://127.0.0.1:{server.server_address[1]}"])
    finally:
        server.shutdown()
    assert code == 1
    ids = [s.span_id.hex() for _, _, body in _Collector.received
           for rs in ExportTraceServiceRequest.FromString(body).resource_spans
           for ss in rs.scope_spans for s in ss.spans]
    assert ids == ["cd" * 8, "ef" * 8]
    out, err = capsys.readouterr()
    assert "pushed 2 spans" in out and f"skipped {path}:2: not JSON" in err


def test_show_keeps_every_span_of_a_malformed_tree(tmp_path: Path) -> None:
    """Spans that are their own parent, in a parent cycle, without ids, or in a chain
    deeper than Python's recursion are each shown once; control characters in names are
    shown escaped, never sent to the terminal."""
    trace = "ab" * 16

    def span(sid: str | None, parent: str | None, name: str, start: int) -> dict:
        item = {"traceId": trace, "name": name, "startTimeUnixNano": str(start),
                "endTimeUnixNano": str(start + 1)}
        if sid:
            item["spanId"] = sid
        if parent:
            item["parentSpanId"] = parent
        return item

    spans = [span("1" * 16, "1" * 16, "self", 1), span("2" * 16, "3" * 16, "a", 2),
             span("3" * 16, "2" * 16, "b", 3), span(None, None, "noid", 4),
             span("4" * 16, None, "esc\x1b[2J", 5)]
    chain = [span(f"{i + 16:016x}", f"{i + 15:016x}" if i else None, f"d{i}", 10 + i)
             for i in range(3000)]
    every = show.collect_spans([{"resourceSpans": [{"scopeSpans": [{"spans": spans + chain}]}]}])
    rows = show.tree_rows(every)
    names = [s["name"] for s, _, _ in rows]
    assert sorted(names) == sorted(s["name"] for s in spans + chain)
    text = show.render(every)
    assert "\x1b" not in text and "esc\\x1b[2J" in text
    assert names.index("d2999") > names.index("d0")


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--endpoint", "http://127.0.0.1:abc"], 1, "'http://127.0.0.1:abc'"),
    (["--endpoint", "http://[::1"], 1, "'http://[::1'"),
    (["--endpoint", "http://127.0.0.1:99999", "--protocol", "grpc"], 1, "out of range"),
    (["--timeout", "nan"], 2, "'nan' is not a positive number of seconds"),
    (["--timeout", "-1"], 2, "'-1' is not a positive number of seconds"),
])
def test_push_names_a_bad_endpoint_or_timeout(tmp_path: Path, capsys, args: list[str],
                                              code: int, says: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_GOOD + "\n")
    with contextlib.suppress(SystemExit):  # argparse's usage error exits
        assert cli.main(["push", str(path), *args]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
