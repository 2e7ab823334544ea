"""Which captured calls run their inputs' statistics on a branch beside them, and the
capture hooks that take the branch's stream before a capture and join it before its
end.  The branch itself needs a GPU (test_native_export_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from otel_flashinfer import graphs, health
from otel_flashinfer.stats import overlap

DECODE = "BatchDecodeWithPagedKVCacheWrapper.run"


@pytest.mark.parametrize(
    ("api", "names", "nbytes", "expected"),
    [
        (DECODE, ["q", "paged_kv_cache"], 32 << 20, True),
        ("single_prefill_with_kv_cache", ["q", "k", "v"], overlap.MIN_BYTES, True),
        # writes its inputs: its statistics must see them before it runs
        ("fused_add_rmsnorm", ["input", "residual", "weight"], 64 << 20, False),
        (None, ["q"], 64 << 20, False),
        (DECODE, ["q", "paged_kv_cache"], overlap.MIN_BYTES - 1, False),  # not worth it
        (DECODE, ["q", "paged_kv_cache", "out"], 32 << 20, False),  # an output buffer
        (DECODE, ["q", "paged_kv_cache", "lse"], 32 << 20, False),
        (DECODE, ["q", "paged_kv_cache", "out.0"], 32 << 20, False),
    ],
)
def test_may_fork(api, names, nbytes, expected) -> None:  # noqa: ANN001
    assert overlap.may_fork(api, names, nbytes) is expected


def test_no_branch_is_made_while_a_capture_could_be_open() -> None:
    assert overlap.branch(12345) is None  # never prepared: never made on demand


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: graphs.patch wraps its methods as torch's."""

    log: list[str] = []

    def capture_begin(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.log.append("begin")

    def capture_end(self) -> None:
        self.log.append("end")

    def replay(self) -> None:
        pass


@pytest.fixture
def fake_graphs(monkeypatch):  # noqa: ANN201, ANN001
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    _FakeGraph.log = []
    graphs.unpatch()

    class _Runtime:
        class settings:  # noqa: N801
            replay_every = 1
            replay_budget = 0.01

    graphs.patch(_Runtime())
    yield _FakeGraph.log
    graphs.unpatch()
    graphs.set_capture_hooks("test")
    graphs.set_capture_hooks("broken")


def test_capture_hooks_run_before_begin_and_before_end(fake_graphs) -> None:  # noqa: ANN001
    log = fake_graphs
    graphs.set_capture_hooks("test", lambda: log.append("prepare"), lambda: log.append("join"))
    graph = _FakeGraph()
    graph.capture_begin()
    graph.capture_end()
    assert log == ["prepare", "begin", "join", "end"]
    # a later call replaces the owner's pair; None, None removes it
    graphs.set_capture_hooks("test", None, lambda: log.append("join2"))
    graph.capture_begin()
    graph.capture_end()
    assert log[4:] == ["begin", "join2", "end"]
    graphs.set_capture_hooks("test")
    graph.capture_begin()
    graph.capture_end()
    assert log[7:] == ["begin", "end"]


def test_a_failing_capture_hook_is_counted_and_the_capture_goes_on(fake_graphs) -> None:  # noqa: ANN001
    log = fake_graphs
    before = health.counters().get("graph_errors", 0)

    def broken() -> None:
        raise RuntimeError("no stream")

    graphs.set_capture_hooks("broken", broken, broken)
    graph = _FakeGraph()
    graph.capture_begin()
    graph.capture_end()
    assert log == ["begin", "end"]
    assert health.counters().get("graph_errors", 0) == before + 2
