"""Pull follows the object chain on the GPU: a real FlashInfer BatchDecode wrapper made
at start-up (its ``__init__`` and first ``plan`` in traces of their own), then run
under an engine's step span, eagerly or as a CUDA graph replay.  Pulling the step's
trace id alone must give a bundle that replays bit-exact."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

import otel_flashinfer
from otel_flashinfer.blobs.store import BlobStore

INIT = "BatchDecodeWithPagedKVCacheWrapper.__init__"
PLAN = "BatchDecodeWithPagedKVCacheWrapper.plan"
RUN = "BatchDecodeWithPagedKVCacheWrapper.run"


def _decode():  # noqa: ANN202
    pytest.importorskip("flashinfer")
    sys.path.insert(0, str(Path(__file__).parent))
    import gpu_decode

    return gpu_decode


def _apis_in(store: Path, trace_id: str) -> list[str]:
    s = BlobStore(str(store), check_writable=False)
    return [json.loads(s.get(k))["api"] for k in s.list_manifests(trace_id)]


def _wrapper_calls(bundle) -> list[dict]:  # noqa: ANN001
    """The wrapper's own calls (FlashInfer may trace helpers that plan calls)."""
    return [c for c in bundle.calls if c["api"] in (INIT, PLAN, RUN)]


def _pull_and_replay(trace_id: str, store: Path, out: Path):  # noqa: ANN202
    from otel_flashinfer.replay.pull import pull
    from otel_flashinfer.replay.runner import replay

    otel_flashinfer.uninstrument()  # the replay itself is not traced
    bundle = pull(trace_id, str(store), str(out))
    text = io.StringIO()
    report = replay(str(out), device="cuda", out=text)
    return bundle, report, text.getvalue()


@pytest.mark.gpu
def test_wrapper_made_at_startup_replays_from_the_step_trace(spans, tmp_path):
    gpu_decode = _decode()
    store = tmp_path / "blobs"
    otel_flashinfer.instrument(level=10, journal_dir="", blob_url=str(store))
    # Start-up: __init__ and a first plan, each a root span of its own trace.
    step = gpu_decode.make_decode(kv_len=256)
    torch.cuda.synchronize()
    gen = torch.Generator(device="cuda").manual_seed(3)
    with spans.tracer().start_as_current_span("engine.step") as engine:
        step.wrapper.plan(*step.plan_args, data_type=step.q.dtype)
        step.q.copy_(torch.randn(step.q.shape, dtype=step.q.dtype, device="cuda",
                                 generator=gen))
        out = step.run()
    torch.cuda.synchronize()
    assert otel_flashinfer.flush(120)
    trace_id = f"{engine.get_span_context().trace_id:032x}"
    in_trace = _apis_in(store, trace_id)
    assert INIT not in in_trace and in_trace.count(PLAN) == in_trace.count(RUN) == 1
    bundle, report, text = _pull_and_replay(trace_id, store, tmp_path / "bundle")
    init, plan, run = _wrapper_calls(bundle)
    assert [init["api"], plan["api"], run["api"]] == [INIT, PLAN, RUN]
    assert init["trace_id"] != trace_id and plan["trace_id"] == run["trace_id"] == trace_id
    assert report.failed == 0, text
    details = {r.call.api: r.detail for r in report.results}
    assert details[INIT] == "object rebuilt" and details[RUN] == "bit-exact"
    assert out.isfinite().all()


@pytest.mark.gpu
def test_graph_replay_trace_replays_with_startup_init_and_plan(spans, tmp_path):
    gpu_decode = _decode()
    store = tmp_path / "blobs"
    otel_flashinfer.instrument(level=10, journal_dir="", blob_url=str(store))
    # Start-up: wrapper, plan and capture, all outside any span of the engine's.
    step = gpu_decode.make_decode(kv_len=256, use_cuda_graph=True)
    graph, out = gpu_decode.capture_graph(step.run)
    assert otel_flashinfer.flush(120)
    gen = torch.Generator(device="cuda").manual_seed(5)
    with spans.tracer().start_as_current_span("engine.step") as engine:
        step.q.copy_(torch.randn(step.q.shape, dtype=step.q.dtype, device="cuda",
                                 generator=gen))
        graph.replay()
        want = out.clone()
    torch.cuda.synchronize()
    assert otel_flashinfer.flush(120)
    trace_id = f"{engine.get_span_context().trace_id:032x}"
    assert _apis_in(store, trace_id) == [RUN]  # the replay's child run only
    bundle, report, text = _pull_and_replay(trace_id, store, tmp_path / "bundle")
    init, plan, _ = _wrapper_calls(bundle)
    assert [c["api"] for c in _wrapper_calls(bundle)] == [INIT, PLAN, RUN]
    assert trace_id not in (init["trace_id"], plan["trace_id"])
    assert report.failed == 0, text
    run = next(r for r in report.results if r.call.api == RUN)
    assert run.detail == "bit-exact"
    assert torch.equal(run.call.result.cpu().view(torch.int16), want.cpu().view(torch.int16))
