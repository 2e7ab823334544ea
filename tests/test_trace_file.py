"""The JSONL trace file (``otlp_json.JsonLinesSpanExporter``): kept open between lines,
opened again where the path no longer names it, and never left open behind us."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from otel_flashinfer import otlp_json
from otel_flashinfer.otlp_json import JsonLinesSpanExporter


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_lines_append_to_one_open_file_and_follow_a_rotation(tmp_path: Path,
                                                           monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "sub" / "traces.jsonl"  # its directory is made
    exporter = JsonLinesSpanExporter(str(path))
    assert exporter.write_line(b'{"a":1}\n') and exporter.write_line(b'{"a":2}\n')
    assert path.read_bytes() == b'{"a":1}\n{"a":2}\n'
    path.rename(tmp_path / "sub" / "traces.jsonl.1")  # rotated away
    monkeypatch.setattr(otlp_json, "_REOPEN_CHECK_S", 0.0)  # checked at the next line
    assert exporter.write_line(b'{"a":3}\n')
    assert path.read_bytes() == b'{"a":3}\n'
    assert (tmp_path / "sub" / "traces.jsonl.1").read_bytes() == b'{"a":1}\n{"a":2}\n'
    path.unlink()  # deleted
    assert exporter.write_line(b'{"a":4}\n') and path.read_bytes() == b'{"a":4}\n'
    exporter.shutdown()


def test_no_descriptor_outlives_shutdown_or_the_exporter(tmp_path: Path) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd here")
    before = _open_fds()
    exporter = JsonLinesSpanExporter(str(tmp_path / "t.jsonl"))
    assert exporter.write_line(b"{}\n") and _open_fds() == before + 1
    exporter.shutdown()
    assert _open_fds() == before
    assert not exporter.write_line(b"{}\n") and _open_fds() == before  # not reopened
    for i in range(20):  # dropped without shutdown
        JsonLinesSpanExporter(str(tmp_path / f"{i}.jsonl")).write_line(b"{}\n")
    gc.collect()
    assert _open_fds() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_writes_through_its_own_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    exporter = JsonLinesSpanExporter(str(path))
    assert exporter.write_line(b'{"p":"parent"}\n')
    pid = os.fork()
    if pid == 0:  # the child: a fresh lock and descriptor, then its line
        code = 0 if exporter._fd == -1 and exporter.write_line(b'{"p":"child"}\n') else 1  # noqa: SLF001
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert exporter.write_line(b'{"p":"parent2"}\n')
    assert path.read_bytes().splitlines() == [b'{"p":"parent"}', b'{"p":"child"}',
                                              b'{"p":"parent2"}']
    exporter.shutdown()


def test_a_span_the_encoder_refuses_costs_only_itself(tmp_path: Path) -> None:
    """A batch with one span whose time the OTLP encoder cannot take (a torn crash
    journal's) still writes the others; the refused one is counted as dropped."""
    import json

    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext

    from otel_flashinfer import health

    def span(span_id: int, start: int) -> ReadableSpan:
        return ReadableSpan(name=f"s{span_id}", context=SpanContext(7, span_id, False),
                            start_time=start, end_time=max(start, 10))

    health.reset()
    path = tmp_path / "t.jsonl"
    exporter = JsonLinesSpanExporter(str(path))
    from opentelemetry.sdk.trace.export import SpanExportResult

    assert exporter.export([span(1, 5), span(2, -5), span(3, 6)]) == SpanExportResult.SUCCESS
    (line,) = path.read_text().splitlines()
    names = [s["name"] for rs in json.loads(line)["resourceSpans"]
             for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert names == ["s1", "s3"]
    assert health.counters()["spans_dropped"] == 1
    exporter.shutdown()


def test_the_files_finalizer_does_not_run_at_exit(tmp_path: Path) -> None:
    """Finalizers also run from atexit, in an order that can put them before the exit
    flush: the descriptor must stay open for it (the OS closes it after)."""
    exporter = JsonLinesSpanExporter(str(tmp_path / "t.jsonl"))
    assert exporter.write_line(b'{"a":1}\n')
    assert exporter._release is not None and exporter._release.atexit is False  # noqa: SLF001
    exporter.shutdown()


def test_spans_the_file_cannot_take_are_counted(tmp_path: Path) -> None:
    """On the SDK's path the processors count nothing an exporter fails to write."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.trace import SpanContext

    from otel_flashinfer import health

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    health.reset()
    spans = [ReadableSpan(name=f"s{i}", context=SpanContext(7, i + 1, False), start_time=1,
                          end_time=2) for i in range(3)]
    exporter = JsonLinesSpanExporter("/dev/full")  # every write: no space left
    assert exporter.export(spans) == SpanExportResult.FAILURE
    assert health.counters()["spans_dropped"] == 3
    exporter.shutdown()
    assert exporter.export(spans[:1]) == SpanExportResult.FAILURE
    assert health.counters()["spans_dropped"] == 4
