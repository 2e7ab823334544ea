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


class _Stream:
    """Stands in for a CUDA stream: records what it was made to wait for."""

    def __init__(self, name: str) -> None:
        self.name, self.waited = name, []

    def wait_stream(self, other: _Stream) -> None:
        self.waited.append(other.name)


@pytest.fixture
def captured(monkeypatch):  # noqa: ANN001, ANN201
    """A recorder whose captured launches go to a recording extension, on stand-in
    streams: the bookkeeping of ``_launch_captured`` without a GPU."""
    import contextlib

    from otel_flashinfer.stats import graph_rows as gr
    from otel_flashinfer.stats.planning import Job
    from otel_flashinfer.stats.recorder import StatsRecorder

    main = _Stream("main")
    on: list[str] = []
    launches: list[tuple[str, dict]] = []

    class Ext:
        ok = True

        def stats_into(self, out, *lists, **stamps):  # noqa: ANN001, ANN002, ANN003, ANN202
            launches.append((on[-1], stamps))
            return self.ok

    @contextlib.contextmanager
    def stream(s):  # noqa: ANN001, ANN202
        on.append(s.name)
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    ext = Ext()
    rec = StatsRecorder(use_kernel=False, gpu_time=True)
    rec._module = lambda: ext  # noqa: SLF001
    rows = gr.GraphRows(torch.device("cpu"))
    jobs = [Job(0, torch.zeros(4))]

    def launch(fork):  # noqa: ANN001, ANN202
        out, at = rows.take(2 + 4)
        return rec._launch_captured(torch.device("cpu"), jobs, [object()], "", 4,  # noqa: SLF001
                                    rows, out, at, fork)

    return rec, rows, main, launches, launch, ext


def test_a_forked_launch_stamps_the_start_and_is_joined_once(captured) -> None:  # noqa: ANN001
    rec, rows, main, launches, launch, _ = captured
    side = _Stream("side")
    before = health.counters().get("stats_forked", 0)
    slot = launch(side)
    (where, stamps), = launches
    assert where == "side" and side.waited == ["main"]  # forked after what came before
    # its first block stamps the call's start into row 0 and, the first timed launch,
    # the graph's anchor; no end stamp (nothing waits for its last block)
    assert stamps["stamp_start"] == slot.out.data_ptr() + 56
    assert stamps["stamp_also"] == rows._chunks[0].data_ptr() + 56  # noqa: SLF001
    assert "counter" not in stamps and slot.stamped
    # marked, so that the graph's copy without statistics joins nothing around it
    # (csrc/lean_rules.h); a launch on the call's stream is not (the gated test below)
    assert stamps["branch"] is True
    assert health.counters().get("stats_forked", 0) == before + 1
    assert slot.branch is side and rec._forked  # noqa: SLF001
    rec._join(slot)  # noqa: SLF001 - what finish does after the outputs' launch
    assert main.waited == ["side"] and slot.branch is None and not rec._forked  # noqa: SLF001
    rec.join_forked()  # the capture's end: nothing left to join
    assert main.waited == ["side"]


def test_a_forked_launch_is_sized_for_its_share_of_the_sms(captured, monkeypatch) -> None:  # noqa: ANN001
    _, _, _, launches, launch, _ = captured
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"multi_processor_count": 132}))
    launch(_Stream("side"))
    assert "sm_limit" not in launches[-1][1]  # share 1: the whole GPU, as on the stream
    monkeypatch.setattr(overlap, "BRANCH_SM_SHARE", 1 / 3)
    launch(_Stream("side"))
    assert launches[-1][1]["sm_limit"] == 44
    launch(None)  # on the call's stream: nothing runs beside it to leave room for
    assert "sm_limit" not in launches[-1][1]


def test_a_gated_launch_is_not_taken_for_a_timed_one(captured, monkeypatch) -> None:  # noqa: ANN001
    """The gate says how a launch runs, not what it stamps: an untimed call in a gated
    graph stays untimed (its children would otherwise say ``no_stamp``)."""
    rec, rows, _, launches, launch, _ = captured
    rec.gpu_time = False
    monkeypatch.setattr(rows, "gate_address", lambda: 4096)
    slot = launch(None)
    assert launches[-1][1] == {"gate": 4096}
    assert not slot.stamped
    rec.gpu_time = True
    slot = launch(_Stream("side"))
    assert launches[-1][1]["gate"] == 4096 and slot.stamped


@pytest.mark.parametrize(("sms", "share", "expected"),
                         [(132, 1.0, 0), (132, 2.0, 0), (132, 0.5, 66), (132, 0.25, 33),
                          (132, 0.001, 1), (132, 0.0, 1), (0, 0.5, 0)])
def test_branch_sms(sms: int, share: float, expected: int) -> None:
    assert overlap.branch_sms(sms, share) == expected


def test_a_launch_on_the_calls_stream_is_timed_by_its_end(captured) -> None:  # noqa: ANN001
    rec, rows, main, launches, launch, ext = captured
    ext.ok = False  # a launch that did not run gives the anchor back
    assert not launch(None).stamped
    anchor = rows._chunks[0].data_ptr() + 56  # noqa: SLF001
    assert launches[0][1]["stamp_start"] == anchor
    ext.ok = True
    slot = launch(None)
    where, stamps = launches[1]
    assert where == "main" and not main.waited
    assert stamps["stamp_end"] == slot.out.data_ptr() + 56 and stamps["counter"]
    assert stamps["stamp_start"] == anchor and slot.stamped  # taken again, for good
    assert slot.branch is None and not rec._forked  # noqa: SLF001
    launch(None)
    assert launches[2][1]["stamp_start"] == 0


def test_branches_left_open_are_joined_at_the_capture_end(captured) -> None:  # noqa: ANN001
    rec, _, main, _, launch, _ = captured
    a, b = _Stream("a"), _Stream("b")
    launch(a)
    launch(b)
    rec.join_forked()  # finish never ran for them
    assert main.waited == ["a", "b"] and not rec._forked  # noqa: SLF001
