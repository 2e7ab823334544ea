"""The native span path on the GPU, in processes of their own with our default
provider (the OTLP/JSON-lines file): GPU times resolved by the encoder through the
event pool's C API, and level-5 statistics events, all spans encoded natively."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_native_export import _spans_in

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r'''
import json, sys, time
sys.path.insert(0, sys.argv[2])
import torch
import otel_flashinfer
from otel_flashinfer import gpu_timing, health, runtime
from otel_flashinfer.stats import kernel as stats_kernel
from gpu_decode import make_decode

level = int(sys.argv[1])
otel_flashinfer.instrument(level=level)
assert gpu_timing.wait_ready(600)
if level >= 5:
    stats_kernel.get(wait=True, timeout=600)
step = make_decode()
step.kv_cache[0, 0, 0, 0, 0] = float("nan")  # page 0 is referenced by sequence 0
for _ in range(5):
    step.run()
torch.cuda.synchronize()
otel_flashinfer.flush(60)
time.sleep(0.2)
for _ in range(200):
    step.run()
torch.cuda.synchronize()
ok = otel_flashinfer.flush(60)
native = runtime.current().pipeline._native
stats = {fmt: enc.stats() for fmt, enc in native.encoders.items()} if native else {}
print(json.dumps({"flushed": ok, "counters": health.counters(), "encoders": stats,
                  "path": runtime.current().pipeline.export_path}))
'''


def _run(tmp_path: Path, level: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    proc = subprocess.run([sys.executable, str(script), str(level), str(ROOT / "tests")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    spans = _spans_in(tmp_path / "flashinfer_traces.jsonl")
    return report, spans


def _attrs(span: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for kv in span.get("attributes", ()):
        (kind, value), = kv["value"].items()
        out[kv["key"]] = int(value) if kind == "intValue" else value
    return out


def test_level3_gpu_times_come_from_the_encoder(tmp_path: Path) -> None:
    report, spans = _run(tmp_path, 3)
    assert report["flushed"] and report["path"] == "native", report
    runs = [s for s in spans if s["name"] == "BatchDecodeWithPagedKVCacheWrapper.run"]
    assert len(runs) == 205
    times = [_attrs(s).get("flashinfer.gpu.time_ns") for s in runs]
    assert all(isinstance(t, int) and t > 1_000 for t in times), times[:10]
    # The steady state (after the warm-up's first launches): a 20-30 us decode.
    assert all(t < 5_000_000 for t in times[5:]), times
    counters = report["counters"]
    assert counters.get("spans_native") == len(spans) and not counters.get("spans_sdk")
    assert not counters.get("spans_dropped"), counters
    # Most GPU times never touched Python on the worker.
    assert report["encoders"]["json"]["gpu_resolved"] >= 150, report
    run = _attrs(runs[-1])
    assert run["flashinfer.arg.q.shape"] == {"values": [
        {"intValue": "8"}, {"intValue": "32"}, {"intValue": "128"}]}
    pid, _, obj = run["flashinfer.instance.id"].partition(":")
    assert pid.isdigit() and obj.isdigit() and int(obj) > 0
    assert [link["spanId"] for link in runs[-1]["links"]]  # linked to its plan


def test_level5_statistics_events_go_out_natively(tmp_path: Path) -> None:
    report, spans = _run(tmp_path, 5)
    assert report["flushed"] and report["path"] == "native", report
    runs = [s for s in spans if s["name"] == "BatchDecodeWithPagedKVCacheWrapper.run"]
    assert len(runs) == 205
    counters = report["counters"]
    assert counters.get("spans_native") == len(spans) and not counters.get("spans_sdk")
    for span in runs[-50:]:
        attrs = _attrs(span)
        assert attrs.get("flashinfer.nonfinite") is True, attrs
        assert "flashinfer.stats.dropped" not in attrs, attrs
        assert isinstance(attrs.get("flashinfer.gpu.time_ns"), int), attrs
        events = [e for e in span["events"] if e["name"] == "flashinfer.tensor_stats"]
        by_tensor = {_attrs(e)["flashinfer.tensor"]: _attrs(e) for e in events}
        assert by_tensor["paged_kv_cache"]["nan_count"] >= 1
        assert by_tensor["q"]["nan_count"] == 0
    # resolved by the encoder in C (csrc/stats_api.h), not by the Python worker: at
    # most the first calls, made while the extension was still lending its API, are not
    (encoder,) = report["encoders"].values()
    assert encoder["stats_resolved"] >= 200, report["encoders"]


GRAPH_PROGRAM = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import otel_flashinfer
from otel_flashinfer import gpu_timing, health, runtime
from otel_flashinfer.stats import kernel as stats_kernel
from gpu_decode import capture_graph, make_decode, replay_with_nan

otel_flashinfer.instrument(level=5)
assert gpu_timing.wait_ready(600)
stats_kernel.get(wait=True, timeout=600)
step = make_decode(use_cuda_graph=True)
graph, _ = capture_graph(step.run)
torch.cuda.synchronize()
otel_flashinfer.flush(60)
replay_with_nan(graph, step, 40, at=17)
torch.cuda.synchronize()
ok = otel_flashinfer.flush(60)
native = runtime.current().pipeline._native
q = step.q.float()
kv = step.kv_cache.float()  # every page is referenced, every slot filled (kv 1024)
print(json.dumps({"flushed": ok, "counters": health.counters(),
                  "encoders": {k: e.stats() for k, e in native.encoders.items()},
                  "q": [q.min().item(), q.max().item(), q.mean().item(), q.numel()],
                  "kv": [kv.min().item(), kv.max().item(), kv.mean().item(), kv.numel()]}))
'''


def _run_graph(tmp_path: Path, program: str) -> tuple[dict[str, Any], dict[str, Any],
                                                    list[dict[str, Any]]]:
    """Runs a graph ``program`` in a process of its own: (its report, replay spans by
    id, their children), every span read back from the default JSONL file."""
    script = tmp_path / "graph.py"
    script.write_text(program)
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "tests")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["flushed"], report
    spans = _spans_in(tmp_path / "flashinfer_traces.jsonl")
    replays = {s["spanId"]: s for s in spans if s["name"] == "cuda_graph.replay"}
    return report, replays, [s for s in spans if s.get("parentSpanId") in replays]


def test_level5_replays_are_written_whole_by_the_encoder(tmp_path: Path) -> None:
    """Issue 19 on the native path: each traced replay leaves one record, and the
    encoder writes its span and its child from the capture's prototype with that
    replay's own statistics; the NaN planted in replay 17 flags exactly its child."""
    report, replays, children = _run_graph(tmp_path, GRAPH_PROGRAM)
    index = {s["spanId"]: _attrs(s)["flashinfer.cuda_graph.replay"] for s in replays.values()}
    assert sorted(index.values()) == list(range(1, 41))  # capture_graph replays none
    by_index = {_attrs(c)["flashinfer.cuda_graph.replay"]: c for c in children}
    assert sorted(by_index) == list(range(1, 41)) and len(children) == 40
    flagged = sorted(i for i, c in by_index.items() if _attrs(c).get("flashinfer.nonfinite"))
    assert flagged == [17]
    for i, child in by_index.items():
        assert child["name"] == "BatchDecodeWithPagedKVCacheWrapper.run"
        assert index[child["parentSpanId"]] == i
        assert [e for e in child["events"] if e["name"] == "flashinfer.tensor_stats"]
        (link,) = child["links"]
        assert link["spanId"] not in replays  # the capture-time span
    for replay in replays.values():
        assert isinstance(_attrs(replay).get("flashinfer.gpu.time_ns"), int), replay
    # each child's own GPU time in that replay, from its statistics launches' stamps
    # (stats.graph_rows): a decode of this size takes microseconds, not nothing
    child_times = [_attrs(c).get("flashinfer.gpu.time_ns") for c in children]
    assert all(isinstance(t, int) and 1_000 < t < 10_000_000 for t in child_times), child_times
    # ... and placed on the GPU timeline: the span lasts exactly that GPU time, from
    # after its replay's host start
    for child in children:
        assert _attrs(child)["flashinfer.cuda_graph.time_source"] == "gpu", child
        start, end = int(child["startTimeUnixNano"]), int(child["endTimeUnixNano"])
        assert end - start == _attrs(child)["flashinfer.gpu.time_ns"]
        assert start >= int(replays[child["parentSpanId"]]["startTimeUnixNano"])
    (encoder,) = report["encoders"].values()
    assert encoder["replays"] >= 40 and encoder["replay_children"] >= 40, encoder
    assert not report["counters"].get("stats_dropped"), report["counters"]
    # The decode reads its inputs only: their statistics ran on a branch of the graph
    # beside it (stats/overlap.py), and are still that replay's values.
    assert report["counters"].get("stats_forked") == 1, report["counters"]
    for i, child in by_index.items():
        events = {_attrs(e)["flashinfer.tensor"]: _attrs(e) for e in child["events"]
                  if e["name"] == "flashinfer.tensor_stats"}
        for name, (lo, hi, mean, numel) in (("q", report["q"]), ("paged_kv_cache", report["kv"])):
            got = events[name]
            assert got["numel"] == numel, (i, name, got)
            if name == "q" and i == 17:
                assert got["nan_count"] == 1
                continue
            assert got["nan_count"] == 0 and got["inf_count"] == 0, (i, name, got)
            assert (got["min"], got["max"]) == (lo, hi), (i, name, got)
            assert abs(got["mean"] - mean) < 1e-3, (i, name, got)


DROPPING_PROGRAM = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import otel_flashinfer
from otel_flashinfer import gpu_timing, health, runtime
from otel_flashinfer.stats import graph_rows, kernel as stats_kernel
from gpu_decode import busy_gpu, capture_graph, make_decode

graph_rows.RING_BYTES = 1  # the fewest slots a graph gets (MIN_SLOTS)
otel_flashinfer.instrument(level=5)
assert gpu_timing.wait_ready(600)
stats_kernel.get(wait=True, timeout=600)
step = make_decode(use_cuda_graph=True)
graph, _ = capture_graph(step.run)
torch.cuda.synchronize()
otel_flashinfer.flush(60)
before = dict(health.counters())
busy_gpu(200.0)  # the host queues every replay while the GPU sleeps: the ring fills
for _ in range(200):
    graph.replay()
torch.cuda.synchronize()
ok = otel_flashinfer.flush(60)
native = runtime.current().pipeline._native
after = health.counters()
print(json.dumps({"flushed": ok, "slots": graph_rows.MIN_SLOTS,
                  "dropped": after.get("stats_dropped", 0) - before.get("stats_dropped", 0),
                  "counters": after,
                  "encoders": {k: e.stats() for k, e in native.encoders.items()}}))
'''


def test_level5_replays_whose_statistics_were_dropped_are_written_in_c(
        tmp_path: Path) -> None:
    """The host runs far ahead of the GPU: past the graph's ring, a replay's statistics
    are dropped and counted, and the encoder still writes that replay and its children
    in C (each child saying why it has none, the replay why it has no GPU time), not
    child by child on the worker's Python path."""
    report, replays, children = _run_graph(tmp_path, DROPPING_PROGRAM)
    assert len(replays) == 200 and len(children) == 200
    dropped = [c for c in children if "flashinfer.stats.dropped" in _attrs(c)]
    kept = [c for c in children if "flashinfer.stats.dropped" not in _attrs(c)]
    print(f"\n{len(dropped)} of 200 replays dropped, {report['slots']} slots")
    # at most a ring's worth (and what the worker freed meanwhile) kept their statistics
    assert len(dropped) >= 200 - 4 * report["slots"] and kept
    assert report["dropped"] == len(dropped)
    for child in dropped:
        attrs = _attrs(child)
        assert attrs["flashinfer.stats.dropped"] == "ring_full"
        assert attrs["flashinfer.cuda_graph.time_source"] == "replay"
        assert not child.get("events"), child
        own = _attrs(replays[child["parentSpanId"]])
        assert own.get("flashinfer.gpu.time_unavailable") == "stats_dropped", own
    for child in kept:
        assert [e for e in child["events"] if e["name"] == "flashinfer.tensor_stats"]
    (encoder,) = report["encoders"].values()
    # every one of the 200 replays (and the capture's) written by the encoder in C
    assert encoder["replays"] >= 200 and encoder["replay_children"] >= 200, encoder
