"""Level 10 inside CUDA graphs: each sampled replay writes its own snapshot of the
captured call's inputs and outputs, as they were at that call inside the replay.

The GPU tests capture a real FlashInfer decode; the first test drives the same
per-replay path with host tensors and a hand-opened capture, so it runs anywhere."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import otel_flashinfer
from otel_flashinfer import graphs, runtime
from otel_flashinfer.blobs import encode, manifest
from otel_flashinfer.blobs.store import BlobStore

RUN = "BatchDecodeWithPagedKVCacheWrapper.run"


def scale(x: torch.Tensor, k: float) -> torch.Tensor:
    return x * k


def _manifest(url: str) -> dict:
    path = url.removeprefix("file://")
    return manifest.parse(Path(path).read_bytes(), path)


def _tensor(store: BlobStore, entry: dict) -> torch.Tensor:
    flat = encode.decode(store.get(entry["key"]), entry["format"])
    return encode.rebuild(flat, entry["dtype"], entry["shape"], entry["stride"],
                          entry["storage_offset"])


def _arg(m: dict, name: str) -> dict:
    return next(a["value"] for a in m["args"] if a["name"] == name)


def test_each_emitted_replay_gets_its_own_manifest_host_tensors(spans, tmp_path):
    store = BlobStore(str(tmp_path / "blobs"), check_writable=False)
    otel_flashinfer.instrument(level=10, journal_dir="", blob_url=store.url)
    traced = otel_flashinfer.traced(scale)
    rt = runtime.current()
    capture = graphs.Capture(77)
    graphs._capturing = capture  # what the patched capture_begin does
    try:
        x = torch.arange(6.0)
        traced(x, 2.0)
    finally:
        graphs._capturing = None
    assert len(capture.records) == 1 and capture.replay_hooks
    x.add_(100)  # a host tensor is not in the graph: replays see the capture-time copy
    for index in (1, 2):
        now = time.time_ns()
        graphs.emit_replay(rt, capture, index, now, now + 1000, None)
    found = [s for s in spans.finished() if s.name == "scale"]
    captured = [s for s in found if s.attributes.get("flashinfer.cuda_graph.capturing")]
    children = sorted((s for s in found if s not in captured),
                      key=lambda s: s.attributes["flashinfer.cuda_graph.replay"])
    assert len(captured) == 1 and "flashinfer.blob.manifest" not in captured[0].attributes
    assert len(children) == 2
    for index, child in enumerate(children, 1):
        m = _manifest(child.attributes["flashinfer.blob.manifest"])
        assert m["span_id"] == f"{child.context.span_id:016x}"
        assert m["trace_id"] == f"{child.context.trace_id:032x}"
        assert m["parent_span_id"] == f"{child.parent.span_id:016x}"
        assert m["status"] == "ok" and m["cuda_graph_replay"] == index
        assert torch.equal(_tensor(store, _arg(m, "x")), torch.arange(6.0))
        assert _arg(m, "k") == 2.0
        assert torch.equal(_tensor(store, m["result"]), torch.arange(6.0) * 2)


# ---- on the GPU -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("every", [1, 2])
def test_decode_graph_replays_each_write_their_own_snapshot(spans, tmp_path, every):
    pytest.importorskip("flashinfer")
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_decode import capture_graph, make_decode

    store = BlobStore(str(tmp_path / "blobs"), check_writable=False)
    otel_flashinfer.instrument(level=10, journal_dir="", blob_url=store.url,
                               replay_every=every)
    with spans.tracer().start_as_current_span("engine.step") as engine:
        step = make_decode(kv_len=256, use_cuda_graph=True)
        graph, out = capture_graph(step.run)
        assert otel_flashinfer.flush(120)
        gen = torch.Generator(device="cuda").manual_seed(7)
        qs, outs = [], []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                step.q.copy_(torch.randn(step.q.shape, dtype=step.q.dtype, device="cuda",
                                         generator=gen))
                qs.append(step.q.clone())
                graph.replay()
                outs.append(out.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert otel_flashinfer.flush(120)
    children = sorted((s for s in spans.by_name(RUN)
                       if "flashinfer.cuda_graph.replay" in s.attributes
                       and not s.attributes.get("flashinfer.cuda_graph.capturing")),
                      key=lambda s: s.attributes["flashinfer.cuda_graph.replay"])
    sampled = list(range(1, 6, every))
    assert [s.attributes["flashinfer.cuda_graph.replay"] for s in children] == sampled
    hashes = set()
    for child in children:
        index = child.attributes["flashinfer.cuda_graph.replay"]
        m = _manifest(child.attributes["flashinfer.blob.manifest"])
        assert m["span_id"] == f"{child.context.span_id:016x}"
        assert m["trace_id"] == f"{engine.get_span_context().trace_id:032x}"
        q = _arg(m, "q")
        hashes.add(q["hash"])
        assert torch.equal(_tensor(store, q).view(torch.int16),
                           qs[index - 1].cpu().view(torch.int16))
        assert torch.equal(_tensor(store, m["result"]).view(torch.int16),
                           outs[index - 1].cpu().view(torch.int16))
        kv = _arg(m, "paged_kv_cache")
        assert kv["t"] == "paged_kv"
        assert kv["page_ids"] == sorted(set(step.indices.tolist()))
    assert len(hashes) == len(sampled)  # a snapshot per replay, not one reused
    per_trace = store.list_manifests(f"{engine.get_span_context().trace_id:032x}")
    assert len(per_trace) >= len(sampled) + 3  # __init__, plan, warm-up run, replays


@pytest.mark.gpu
def test_decode_graph_snapshot_pulls_and_replays_bit_exact(spans, tmp_path):
    pytest.importorskip("flashinfer")
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_decode import capture_graph, make_decode

    from otel_flashinfer.replay.pull import pull
    from otel_flashinfer.replay.runner import replay

    store = tmp_path / "blobs"
    otel_flashinfer.instrument(level=10, journal_dir="", blob_url=str(store))
    with spans.tracer().start_as_current_span("engine.step") as engine:
        step = make_decode(kv_len=256, use_cuda_graph=True)
        graph, _ = capture_graph(step.run)
        for seed in (1, 2):
            step.q.copy_(torch.randn(step.q.shape, dtype=step.q.dtype, device="cuda",
                                     generator=torch.Generator(device="cuda").manual_seed(seed)))
            graph.replay()
    torch.cuda.synchronize()
    assert otel_flashinfer.flush(120)
    trace_id = f"{engine.get_span_context().trace_id:032x}"
    assert pull(trace_id, str(store), str(tmp_path / "bundle")) is not None
    report = replay(str(tmp_path / "bundle"), device="cuda")
    runs = [r for r in report.results if r.call.api == RUN]
    assert report.failed == 0, [r.detail for r in report.results]
    assert len(runs) == 3 and all(r.detail == "bit-exact" for r in runs)  # warm-up + 2
