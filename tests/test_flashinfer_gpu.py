"""Real FlashInfer kernels, auto-instrumented, on the GPU (run with -m gpu on the device)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

import otel_flashinfer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_QO, NUM_KV, HEAD_DIM, PAGE, BATCH, PAGES_PER_SEQ = 8, 2, 128, 16, 4, 3


def _decode_inputs():  # noqa: ANN202
    dev = torch.device("cuda")
    num_pages = BATCH * PAGES_PER_SEQ
    indptr = torch.arange(0, num_pages + 1, PAGES_PER_SEQ, dtype=torch.int32, device=dev)
    indices = torch.arange(num_pages, dtype=torch.int32, device=dev)
    last = torch.full((BATCH,), 5, dtype=torch.int32, device=dev)
    layers = [torch.randn(num_pages, 2, PAGE, NUM_KV, HEAD_DIM, dtype=torch.float16, device=dev)
              for _ in range(2)]
    return indptr, indices, last, layers


def _plan(wrapper, indptr, indices, last) -> None:  # noqa: ANN001
    wrapper.plan(indptr, indices, last, NUM_QO, NUM_KV, HEAD_DIM, PAGE,
                 data_type=torch.float16, q_data_type=torch.float16)


def test_batch_decode_steps_and_layers(spans) -> None:  # noqa: ANN001
    flashinfer = pytest.importorskip("flashinfer")
    otel_flashinfer.instrument(level=3, journal_dir="")
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    indptr, indices, last, layers = _decode_inputs()
    tracer = spans.tracer()
    steps = 3
    step_ids = []
    for _step in range(steps):
        with tracer.start_as_current_span("engine.step") as step_span:
            step_ids.append(step_span.get_span_context().span_id)
            _plan(wrapper, indptr, indices, last)
            for kv in layers:
                q = torch.randn(BATCH, NUM_QO, HEAD_DIM, dtype=torch.float16, device="cuda")
                out = wrapper.run(q, kv)
                assert out.shape == q.shape
    torch.cuda.synchronize()
    instance = f"{os.getpid()}:{id(wrapper)}"
    (init,) = spans.by_name("BatchDecodeWithPagedKVCacheWrapper.__init__")
    plans = spans.by_name("BatchDecodeWithPagedKVCacheWrapper.plan")
    runs = spans.by_name("BatchDecodeWithPagedKVCacheWrapper.run")
    assert len(plans) == steps and len(runs) == steps * len(layers)
    for span in [init, *plans, *runs]:
        assert span.attributes["flashinfer.instance.id"] == instance
        assert span.attributes["flashinfer.level"] == 3
    plan_by_parent = {p.parent.span_id: p for p in plans}
    assert set(plan_by_parent) == set(step_ids)
    for run in runs:
        assert run.parent.span_id in step_ids  # under the engine's step span
        plan = plan_by_parent[run.parent.span_id]  # and linked to that step's plan
        assert [link.context.span_id for link in run.links] == [plan.context.span_id]
        assert list(run.attributes["flashinfer.arg.q.shape"]) == [BATCH, NUM_QO, HEAD_DIM]
        assert run.attributes["flashinfer.arg.q.dtype"] == "float16"
        assert run.attributes["flashinfer.arg.q.device"].startswith("cuda")
        assert list(run.attributes["flashinfer.result.0.shape"]) == [BATCH, NUM_QO, HEAD_DIM]
    # Nested FlashInfer calls nest: nothing of ours sits above the step span.
    assert all(s.parent is not None for s in [*plans, *runs])


def test_rmsnorm_span(spans) -> None:  # noqa: ANN001
    flashinfer = pytest.importorskip("flashinfer")
    otel_flashinfer.instrument(level=3, journal_dir="")
    x = torch.randn(16, 512, dtype=torch.float16, device="cuda")
    w = torch.ones(512, dtype=torch.float16, device="cuda")
    with spans.tracer().start_as_current_span("layer") as layer:
        y = flashinfer.rmsnorm(x, w, eps=1e-5)
    torch.cuda.synchronize()
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    (span,) = spans.by_name("rmsnorm")
    assert span.parent.span_id == layer.get_span_context().span_id
    assert list(span.attributes["flashinfer.arg.input.shape"]) == [16, 512]
    assert span.attributes["flashinfer.arg.eps"] == pytest.approx(1e-5)
    assert span.attributes["flashinfer.api"] == "rmsnorm"


@pytest.mark.parametrize("level", [1, 3])
def test_cuda_graph_capture_is_not_broken(spans, level) -> None:  # noqa: ANN001
    flashinfer = pytest.importorskip("flashinfer")
    otel_flashinfer.instrument(level=level, journal_dir="")
    x = torch.randn(8, 256, dtype=torch.float16, device="cuda")
    w = torch.ones(256, dtype=torch.float16, device="cuda")
    from gpu_decode import capture_graph

    graph, y = capture_graph(lambda: flashinfer.rmsnorm(x, w))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    captured = [s for s in spans.by_name("rmsnorm")
                if s.attributes.get("flashinfer.cuda_graph.capturing")]
    assert len(captured) == 1
    assert captured[0].attributes["flashinfer.cuda_graph.id"] >= 1


def test_two_processes_one_trace(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("flashinfer")
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures_instrument import read_spans

    script = textwrap.dedent("""
        import multiprocessing as mp, torch, flashinfer
        def work():
            x = torch.randn(4, 256, dtype=torch.float16, device="cuda")
            flashinfer.rmsnorm(x, torch.ones(256, dtype=torch.float16, device="cuda"))
            torch.cuda.synchronize()
        if __name__ == "__main__":
            work()
            p = mp.get_context("spawn").Process(target=work); p.start(); p.join()
            assert p.exitcode == 0
    """)
    (tmp_path / "two.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLASHINFER_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OTEL_FLASHINFER_JOURNAL_DIR"] = ""
    done = subprocess.run([sys.executable, "-m", "otel_flashinfer", "run", "--",
                           sys.executable, "two.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    spans = read_spans(tmp_path / "flashinfer_traces.jsonl")
    (run,) = [s for s in spans if s["name"] == "otel-flashinfer run"]
    norms = [s for s in spans if s["name"] == "rmsnorm"]
    assert len(norms) == 2
    assert len({s["resource"]["process.pid"] for s in norms}) == 2
    assert all(s["traceId"] == run["traceId"] for s in norms)
