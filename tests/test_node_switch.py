"""Switching a sampled level-5 graph's statistics nodes off while its replays go
untraced (``stats.node_switch``, csrc/gate_nodes.cpp): when it switches, what a failure
leaves, and how ``graphs.patch`` makes torch keep the captured graph for it.  The CUDA
calls themselves run in tests/test_core_gpu.py; here the extension is a stand-in that
records what it was asked."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from otel_flashinfer import graphs, health
from otel_flashinfer.stats.graph_rows import GraphRows
from otel_flashinfer.stats.node_switch import NodeSwitch, kept_graph


class _Module:
    """The statistics extension's gate and node functions, recorded; ``refuse``: the
    nodes (by index) that the driver refuses to switch, either way (``refuse_on``: to
    switch on only)."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = nodes
        self.off = [False] * max(nodes, 0)
        self.writes: list[bool] = []
        self.switched: list[tuple[int, int, bool]] = []
        self.refuse: set[int] = set()
        self.refuse_on: set[int] = set()

    def gate_key(self, device: int, on: bool) -> int:
        return 16 << 1 | on

    def gate_write(self, device: int, gate: int, on: bool) -> None:
        self.writes.append(on)

    def gate_nodes(self, gate: int) -> int:
        return self.nodes

    def gate_nodes_set(self, gate: int, exec_: int, on: bool) -> tuple[int, int, str]:
        self.switched.append((gate, exec_, on))
        failed = 0
        for i in range(self.nodes):
            if i in self.refuse or (on and i in self.refuse_on):
                failed += 1
            else:
                self.off[i] = not on
        return failed, sum(self.off), "cudaErrorInvalidValue" if failed else ""


class _Graph:
    """What torch's CUDAGraph tells of its graphs (``keep_graph=True`` or not); torch
    raises for the executable graph of a kept graph not instantiated yet."""

    def __init__(self, kept: bool = True, executable: int = 0xE0) -> None:
        self.kept, self.executable = kept, executable

    def raw_cuda_graph(self) -> int:
        if not self.kept:
            raise RuntimeError("You cannot access the raw cudaGraph_t instance unless "
                               "CUDAGraph was initialized with keep_graph=true")
        return 0xC0

    def raw_cuda_graph_exec(self) -> int:
        if not self.executable:
            raise RuntimeError("You cannot access the raw cudaGraphExec_t instance until "
                               "instantiate() has been called")
        return self.executable


def _rows(module: _Module, graph: _Graph) -> GraphRows:
    rows = GraphRows(torch.device("cpu"), gated=True)
    rows._gate, rows._gate_module = torch.zeros(1, dtype=torch.int32), module  # noqa: SLF001
    rows.bind_graph(graph)
    return rows


class _Stream:
    def wait_stream(self, other: _Stream) -> None:
        pass


@pytest.fixture(autouse=True)
def _fresh_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    health.reset()
    stream = _Stream()  # one stream: the word is written on it (no CUDA here)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)


def test_nodes_switch_only_when_the_answer_changes() -> None:
    module, graph = _Module(), _Graph()
    rows = _rows(module, graph)
    gate = rows._gate.data_ptr()  # noqa: SLF001
    for traced in (True, False, False, True, True, False):
        rows.set_gate(traced)
    # instantiated with every node on: the first traced replay switches nothing
    assert module.switched == [(gate, 0xE0, False), (gate, 0xE0, True), (gate, 0xE0, False)]
    assert module.writes == [True, False, True, False]  # the word still gates, as before
    assert not rows.failed and health.counters().get("stats_errors", 0) == 0


def test_no_switch_without_kept_graph_nodes_or_the_extensions_functions() -> None:
    assert not kept_graph(_Graph(kept=False))
    assert kept_graph(_Graph())
    for module, graph in ((_Module(), _Graph(kept=False)), (_Module(nodes=0), _Graph()),
                          (_Module(nodes=-1), _Graph())):
        rows = _rows(module, graph)
        assert rows._switch is None  # noqa: SLF001
        rows.set_gate(False)
        assert module.switched == [] and module.writes == [False]

    class _Older:  # an extension built before gate_nodes.cpp
        gate_key, gate_write = _Module.gate_key, _Module.gate_write

    assert NodeSwitch.bind(_Older(), 64, _Graph()) is None
    assert NodeSwitch.bind(_Module(), 0, _Graph()) is None


def test_a_failed_switch_off_stops_switching_and_leaves_the_word_gating() -> None:
    module, graph = _Module(), _Graph()
    module.refuse = {1}  # the driver refuses one node, either way: it never went off
    rows = _rows(module, graph)
    gate = rows._gate.data_ptr()  # noqa: SLF001
    rows.set_gate(False)
    assert rows._switch is None and not rows.failed  # noqa: SLF001
    # every node asked back on after the failure; the word keeps gating
    assert module.switched == [(gate, 0xE0, False), (gate, 0xE0, True)]
    assert module.off == [False, False, False] and module.writes == [False]
    assert health.counters()["stats_errors"] == 1
    rows.set_gate(True)
    rows.set_gate(False)
    assert len(module.switched) == 2 and module.writes == [False, True, False]


def test_nodes_left_off_fail_the_graphs_statistics_and_close_the_word() -> None:
    """A traced replay whose launches might stay off would read rows nobody wrote: the
    graph's statistics are dropped (counted) rather than reported wrong, and the word
    is closed for good so that the nodes still on return at once."""
    module, graph = _Module(), _Graph()
    rows = _rows(module, graph)
    rows.set_gate(True)
    rows.set_gate(False)
    module.refuse_on = {2}  # off now, and the driver will not switch it back on
    rows.set_gate(True)
    assert module.off == [False, False, True]
    assert rows.failed and health.counters()["stats_errors"] == 1
    assert module.writes == [True, False]  # still closed: never opened for the replay
    rows.set_gate(True)
    assert module.writes == [True, False]


def test_a_failed_switch_off_after_a_traced_replay_closes_the_open_word() -> None:
    """The word is open from the traced replay before; nodes that went off and will not
    come back on fail the graph, and the word is closed in their place."""
    module, graph = _Module(), _Graph()
    module.refuse, module.refuse_on = {1}, {2}
    rows = _rows(module, graph)
    rows.set_gate(True)
    rows.set_gate(False)
    assert module.off == [False, False, True]
    assert rows.failed and module.writes == [True, False]
    assert health.counters()["stats_errors"] == 1


def test_a_kept_graph_not_instantiated_yet_is_left_on() -> None:
    """A maker's own ``keep_graph=True`` graph instantiates at its first replay (torch
    raises for its executable graph until then), and ``reset()`` drops it: nothing to
    switch, and an instantiation starts with every node on."""
    module, graph = _Module(), _Graph(executable=0)
    rows = _rows(module, graph)
    rows.set_gate(False)
    assert module.switched == [] and rows._switch.on and not rows.failed  # noqa: SLF001
    assert health.counters().get("stats_errors", 0) == 0
    graph.executable = 0xE1
    rows.set_gate(True)
    rows.set_gate(False)
    assert module.switched == [(rows._gate.data_ptr(), 0xE1, False)]  # noqa: SLF001


class _TorchBase:
    """torch's C++ ``_CUDAGraph``: ``keep_graph`` is taken by its ``__init__``."""

    def __init__(self, keep_graph: bool = False) -> None:
        self.keep_graph = keep_graph
        self.executable = 0
        self.instantiated = 0


class _TorchGraph(_TorchBase):
    """torch's CUDAGraph as the hooks see it: ``keep_graph`` at construction (its own
    ``__new__``, the base's ``__init__``), an executable graph after ``instantiate``
    (which ``capture_end`` does unless kept)."""

    def __new__(cls, keep_graph: bool = False) -> _TorchGraph:  # noqa: PYI034
        return super().__new__(cls)

    def capture_begin(self, *args: Any, **kwargs: Any) -> None:
        pass

    def capture_end(self) -> None:
        if not self.keep_graph:
            self.instantiate()

    def instantiate(self) -> None:
        self.instantiated += 1
        self.executable = 0xE0 + self.instantiated

    def replay(self) -> None:
        pass

    def raw_cuda_graph(self) -> int:
        if not self.keep_graph:
            raise RuntimeError("not kept")
        return 0xC0

    def raw_cuda_graph_exec(self) -> int:
        return self.executable


@pytest.mark.parametrize(("level", "every", "forced"),
                         [(5, "3", True), (5, "auto", True), (5, "1", False), (3, "3", False)])
def test_sampled_level5_graphs_are_kept_and_instantiated_at_capture_end(
        monkeypatch: pytest.MonkeyPatch, level: int, every: str, forced: bool) -> None:
    import otel_flashinfer

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _TorchGraph)
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", every)
    otel_flashinfer.instrument(level=level, journal_dir="")
    try:
        graph = torch.cuda.CUDAGraph()
        assert graph.keep_graph is forced
        graph.capture_begin()
        graph.capture_end()
        assert graph.instantiated == 1  # by torch, or by us where we kept it
        own = torch.cuda.CUDAGraph(keep_graph=True)  # the maker's own choice stands
        own.capture_begin()
        own.capture_end()
        assert own.keep_graph and own.instantiated == 0
        assert (graph in graphs._kept_by_us) is forced and own not in graphs._kept_by_us  # noqa: SLF001
    finally:
        otel_flashinfer.uninstrument()
    assert "__init__" not in _TorchGraph.__dict__  # inherited again, as before
    assert _TorchGraph().keep_graph is False


def test_no_keep_graph_where_torch_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older torch (no ``keep_graph``, no ``raw_cuda_graph_exec``) is not touched."""

    class _OldGraph:
        def capture_begin(self) -> None: ...
        def capture_end(self) -> None: ...
        def replay(self) -> None: ...

    assert not graphs._takes_keep_graph(_OldGraph)  # noqa: SLF001
    assert graphs._takes_keep_graph(_TorchGraph)  # noqa: SLF001
    fake = types.SimpleNamespace(settings=types.SimpleNamespace(level=5, replay_every=0))
    assert graphs._keep_for_nodes(fake)  # noqa: SLF001
    assert not graphs._keep_for_nodes(object())  # noqa: SLF001
    assert "torch" in sys.modules


def test_a_graph_captured_again_forgets_its_last_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The last capture's statistics nodes belong to the graph torch replaces: where
    the new capture cannot be noted (reported), none of the old one is left to switch
    the new executable graph's nodes with."""
    import otel_flashinfer

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _TorchGraph)
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "3")
    otel_flashinfer.instrument(level=5, journal_dir="")
    try:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        graph.capture_end()
        assert graphs._graphs.get(graph) is not None  # noqa: SLF001
        monkeypatch.setattr(graphs, "Capture", _fail)
        graph.capture_begin()
        graph.capture_end()
        assert graphs._graphs.get(graph) is None  # noqa: SLF001
        assert health.counters()["graph_errors"] == 1
    finally:
        otel_flashinfer.uninstrument()


def _fail(*args: Any) -> Any:
    raise RuntimeError("no capture")


def test_a_gated_group_is_bound_to_its_graph_once_torch_instantiated_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``capture_end`` instantiates the graph it made torch keep, then hands it to the
    capture's gated groups (``GraphRows.bind_graph``), which read its executable graph."""
    import otel_flashinfer

    seen: list[tuple[Any, int]] = []

    class _Group:
        gated = True

        def seal(self) -> None:
            pass

        def bind_graph(self, graph: Any) -> None:
            seen.append((graph, graph.raw_cuda_graph_exec()))

        def set_gate(self, traced: bool) -> None:
            pass

    group = _Group()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _TorchGraph)
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    otel_flashinfer.instrument(level=5, journal_dir="")
    try:
        step = otel_flashinfer.traced(
            lambda x: graphs.capture_state().group("g", lambda: group) and x, name="step")
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        step(torch.zeros(2))
        graph.capture_end()
        assert seen == [(graph, 0xE1)]  # instantiated once, before the groups saw it
        assert graphs._graphs[graph].gates == (group,)  # noqa: SLF001
    finally:
        otel_flashinfer.uninstrument()
