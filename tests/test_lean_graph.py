"""Untraced replays of a sampled level-5 graph through a copy of it without the
statistics nodes (``stats.lean_graph``, csrc/lean_graph.cpp): when the copy is used,
when it must not be (a graph that draws random numbers), and what a failure leaves.
The CUDA side runs in tests/test_core_gpu.py; here the extension is a stand-in, and the
C replay gate's launch goes through a real capsule to a ctypes callback."""

from __future__ import annotations

import ctypes
import gc
from typing import Any

import pytest
import torch

from otel_flashinfer import graphs, health
from otel_flashinfer.graph_rng import RngWatch
from otel_flashinfer.stats import lean_graph
from otel_flashinfer.stats.lean_graph import LeanGraph

_LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_longlong, ctypes.c_int)
_CAPSULE_NAME = b"otel_flashinfer.lean_launch"  # must outlive the capsules
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Generator:
    def __init__(self) -> None:
        self.offset = 0

    def get_offset(self) -> int:
        return self.offset


class _Module:
    """The extension's copy functions, recorded.  ``c_rc``: what the C gate's launch
    (a ctypes callback behind the capsule) returns."""

    LEAN_GRAPHS = True

    def __init__(self) -> None:
        self.made: list[tuple[int, list[int]]] = []
        self.destroyed: list[int] = []
        self.py_launches: list[tuple[int, int]] = []
        self.c_launches: list[tuple[int, int]] = []
        self.c_rc = 0
        self.refuse = False
        self._callback = _LAUNCH(self._c_launch)
        self.lean_launch = _new_capsule(ctypes.cast(self._callback, ctypes.c_void_p),
                                        _CAPSULE_NAME, None)

    def _c_launch(self, exec_: int, device: int) -> int:
        self.c_launches.append((exec_, device))
        return self.c_rc

    def lean_graph_make(self, graph: int, gates: list[int], join_branch: bool,
                        extra: list[int]) -> tuple[int, int, int, int, int]:
        if self.refuse:
            raise RuntimeError("otel_flashinfer stats: could not instantiate a graph "
                               "without statistics: cudaErrorNotSupported")
        self.made.append((graph, gates))
        self.extra = extra
        self.join_branch = join_branch
        return 0xA0 + len(self.made), 2 * len(gates) + len(extra), 5, 6, 1

    def lean_graph_destroy(self, exec_: int) -> None:
        self.destroyed.append(exec_)

    def lean_graph_launch(self, exec_: int, device: int) -> None:
        self.py_launches.append((exec_, device))


def test_rng_watch_says_whether_a_replay_moved_any_generator() -> None:
    a, b = _Generator(), _Generator()
    watch = RngWatch([a, b])
    assert watch.run(lambda: "result") == ("result", True)

    def draw() -> None:
        b.offset += 4  # a replay that drew numbers from b

    assert watch.run(draw) == (None, False)

    class _Unreadable:
        def get_offset(self) -> int:
            raise RuntimeError("not a CUDA generator")

    assert RngWatch([a, _Unreadable()]).run(lambda: 1) == (1, None)


def test_rng_watch_counts_the_operators_of_a_prologue_it_cannot_see() -> None:
    """A torch that registers generators from C++: a replay that drew fills the
    capture's seed and offset tensors (through the dispatcher) before its launch."""
    seed = torch.zeros(1, dtype=torch.int64)
    watch = RngWatch([_Generator()], ops=True)
    assert watch.run(lambda: None) == (None, True)
    assert watch.run(lambda: seed.fill_(7) and None) == (None, False)
    assert int(seed) == 7  # the operator ran as it would have


def test_the_copy_is_used_only_once_a_replay_proved_no_random_numbers() -> None:
    module = _Module()
    lean = LeanGraph(module, 0xA1, 0, 4, RngWatch([_Generator()]))
    assert lean.pending and not lean.ready
    lean.proven(None)  # an offset could not be read: still waiting
    assert lean.pending
    lean.proven(True)
    assert lean.ready
    lean.proven(False)  # decided once
    assert lean.ready
    refused = LeanGraph(module, 0xA2, 0, 4, RngWatch([_Generator()]))
    refused.proven(False)  # once: another thread may have drawn meanwhile
    assert refused.pending
    refused.proven(False)
    assert not refused.ready and not refused.pending
    lean.close()
    lean.close()
    assert module.destroyed == [0xA1] and not lean.ready  # freed once
    del refused
    gc.collect()
    assert module.destroyed == [0xA1, 0xA2]  # a copy nobody closed is freed with it


class _Parts:
    def __init__(self, parts: tuple[Any, int, int, tuple[int, ...]] | None) -> None:
        self.parts = parts

    def lean_parts(self) -> tuple[Any, int, int, tuple[int, ...]] | None:
        return self.parts


class _Kept:
    def raw_cuda_graph(self) -> int:
        return 0xC0


def test_build_for_takes_every_gated_word_of_one_device() -> None:
    module, watch = _Module(), RngWatch([])
    lean = lean_graph.build_for([_Parts((module, 0x40, 1, (0x7, 0x9))), _Parts(None),
                                 _Parts((module, 0x80, 1, (0xB,)))], _Kept(), 1, watch)
    assert lean is not None and lean.device == 1 and lean.removed == 7
    assert module.made == [(0xC0, [0x40, 0x80])]  # a group without a word is skipped
    # the nodes zeroing each group's rows go too, in the groups' order
    assert module.extra == [0x7, 0x9, 0xB] and lean.zeroing == (0x7, 0x9, 0xB)
    assert module.join_branch is lean_graph.JOIN_BRANCH is False  # the default
    assert lean_graph.build_for([_Parts((module, 0x40, 0, ()))], _Kept(), 1,
                                watch) is None  # words on another device than the graph
    assert lean_graph.build_for([_Parts(None)], _Kept(), 0, watch) is None
    assert lean_graph.build_for([_Parts((module, 0x40, 0, ()))], _Kept(), 0, None) is None

    class _Older:  # an extension built before lean_graph.cpp
        pass

    assert lean_graph.build_for([_Parts((_Older(), 0x40, 0, ()))], _Kept(), 0, watch) is None
    module.refuse = True
    with pytest.raises(RuntimeError, match="cudaErrorNotSupported"):
        lean_graph.build_for([_Parts((module, 0x40, 0, ()))], _Kept(), 0, watch)


class _TorchGraph:
    """torch's CUDAGraph as the hooks see it, kept; a replay advances ``generator`` by
    ``draws`` (a graph that draws random numbers)."""

    generator = _Generator()
    draws = 0
    #: the generator a replay draws from (None: the default one)
    draws_from: _Generator | None = None
    replays = 0
    seed = torch.zeros(1, dtype=torch.int64)
    #: another thread's draw from the default generator during the next replay
    race = 0

    def __new__(cls, keep_graph: bool = False) -> _TorchGraph:  # noqa: PYI034
        return super().__new__(cls)

    def __init__(self, keep_graph: bool = False) -> None:
        self.keep_graph = keep_graph

    def capture_begin(self, *args: Any, **kwargs: Any) -> None:
        pass

    def capture_end(self) -> None:
        pass

    def instantiate(self) -> None:
        pass

    def replay(self) -> None:
        cls = type(self)
        cls.replays += 1
        cls.generator.offset += cls.race
        cls.race = 0
        if cls.draws:  # torch's prologue: the capture's seed and offset, then the offset
            cls.seed.fill_(1)
            (cls.draws_from or cls.generator).offset += cls.draws

    def reset(self) -> None:
        pass

    def raw_cuda_graph(self) -> int:
        return 0xC0

    def raw_cuda_graph_exec(self) -> int:
        return 0xE0


class _Group:
    """A gated statistics group: what ``set_gate`` was told, a word for the copy."""

    gated = True

    def __init__(self, module: _Module) -> None:
        self.module = module
        self.gates: list[bool] = []

    def seal(self) -> None:
        pass

    def bind_graph(self, graph: Any) -> None:
        pass

    def set_gate(self, traced: bool) -> None:
        self.gates.append(traced)

    def closed_gate(self) -> None:
        return None

    def lean_parts(self) -> tuple[Any, int, int, tuple[int, ...]]:
        return self.module, 0x40, 0, ()

    @staticmethod
    def build_lean(graph: Any, groups: Any, device: int | None, watch: Any) -> Any:
        return lean_graph.build_for(groups, graph, device, watch)

    def replay(self, index: dict[int, int]) -> list:
        return []


class _RegisteringGraph(_TorchGraph):
    """A torch whose graphs learn their generators through ``register_generator_state``
    (its prologue is not watched: only the generators' offsets)."""

    registered: list[Any] = []

    def register_generator_state(self, generator: Any) -> None:
        type(self).registered.append(generator)


def _captured(monkeypatch: pytest.MonkeyPatch, module: _Module, draws: int,
              cls: type = _TorchGraph, before: Any = None) -> tuple[Any, _Group]:
    import otel_flashinfer

    _TorchGraph.generator, _TorchGraph.draws, _TorchGraph.replays = _Generator(), draws, 0
    _TorchGraph.race = 0
    monkeypatch.setattr(torch.cuda, "CUDAGraph", cls)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (_TorchGraph.generator,))
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "3")
    otel_flashinfer.instrument(level=5, journal_dir="")
    group = _Group(module)
    step = otel_flashinfer.traced(
        lambda x: graphs.capture_state().group("g", lambda: group) and x, name="step")
    graph = torch.cuda.CUDAGraph()
    if before is not None:
        before(graph)
    graph.capture_begin()
    step(torch.zeros(2))
    graph.capture_end()
    return graph, group


@pytest.fixture
def _instrumented() -> Any:
    import otel_flashinfer

    health.reset()
    yield
    otel_flashinfer.uninstrument()


def test_untraced_replays_launch_the_copy_traced_ones_torchs(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    """REPLAY_EVERY=3: replays 1, 4, 7 traced.  The first, through torch, shows the
    graph draws nothing; every untraced replay after it launches the copy (through
    Python, or the armed C gate), and the word is never closed for one."""
    module = _Module()
    graph, group = _captured(monkeypatch, module, draws=0)
    capture = graphs._graphs[graph]  # noqa: SLF001
    assert module.made == [(0xC0, [0x40])] and capture.lean.pending
    for _ in range(9):
        graph.replay()
    assert _TorchGraph.replays == 3  # replays 1, 4 and 7: the traced ones
    assert group.gates == [True, True, True]  # the word: open, never closed
    launches = module.py_launches + module.c_launches
    assert len(launches) == 6 and set(launches) == {(0xA1, 0)}
    assert module.c_launches  # the armed C gate launched some itself
    # the gate's replays are counted at the next one through Python
    assert capture.replays + capture.skip.skipped == 9
    assert health.counters().get("graph_errors", 0) == 0


def test_a_graph_that_draws_random_numbers_always_replays_through_torch(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    module = _Module()
    graph, group = _captured(monkeypatch, module, draws=4)
    for _ in range(6):
        graph.replay()
    assert _TorchGraph.replays == 6  # torch's prologue hands each replay its offset
    assert module.py_launches == module.c_launches == []
    assert group.gates == [True, False, False, True, False, False]  # the word gates
    assert graphs._graphs[graph].lean.state == lean_graph.REFUSED  # noqa: SLF001


def test_a_failed_launch_in_the_c_gate_falls_back_to_torch(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    module = _Module()
    graph, group = _captured(monkeypatch, module, draws=0)
    capture = graphs._graphs[graph]  # noqa: SLF001
    # 1 traced; 2 the copy through Python, which arms the gate; 3 the copy through the
    # gate; 4 traced; 5 the copy through Python again
    for _ in range(5):
        graph.replay()
    assert _TorchGraph.replays == 2 and len(module.c_launches) == 1
    assert len(module.py_launches) == 2
    module.c_rc = 700  # cudaErrorIllegalAddress, say
    graph.replay()  # 6: the gate's launch fails: reported, the copy dropped, torch's
    assert len(module.c_launches) == 2 and capture.lean is None
    assert module.destroyed == [0xA1] and capture.skip.lean_exec == 0
    assert _TorchGraph.replays == 3 and group.gates[-1] is False  # the word closed it
    assert health.counters()["graph_errors"] == 1
    for _ in range(3):  # 7 traced, 8 and 9 untraced: through torch, the word gating
        graph.replay()
    assert _TorchGraph.replays == 6 and len(module.c_launches) == 2
    assert len(module.py_launches) == 2 and group.gates[-3:] == [True, False, False]


def test_reset_and_a_new_capture_free_the_copy(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    """The copy runs on the memory of torch's graph pool: it goes when torch's graph
    does, before ``reset()`` frees it, and when the graph is captured again."""
    module = _Module()
    graph, _group = _captured(monkeypatch, module, draws=0)
    for _ in range(2):
        graph.replay()
    assert module.py_launches == [(0xA1, 0)] and module.destroyed == []
    graph.capture_begin()
    assert module.destroyed == [0xA1]
    graph.capture_end()
    graph.replay()  # nothing captured this time: torch's replay, no copy
    assert len(module.py_launches) == 1 and graphs._graphs[graph].lean is None  # noqa: SLF001
    graph2, _ = _captured(monkeypatch, module, draws=0)
    assert module.made[-1][0] == 0xC0 and graphs._graphs[graph2].lean.exec == 0xA2  # noqa: SLF001
    graph2.reset()
    assert module.destroyed == [0xA1, 0xA2] and graphs._graphs.get(graph2) is None  # noqa: SLF001
    graph2.replay()  # after reset: torch's own replay (which would raise for a real one)
    assert len(module.py_launches) == 1


def test_a_copy_the_driver_refuses_leaves_the_switching(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    module = _Module()
    module.refuse = True
    graph, group = _captured(monkeypatch, module, draws=0)
    assert graphs._graphs[graph].lean is None  # noqa: SLF001
    assert health.counters()["graph_lean_refused"] == 1
    for _ in range(3):
        graph.replay()
    assert _TorchGraph.replays == 3 and group.gates == [True, False, False]


def test_a_private_generator_refuses_the_copy_on_either_kind_of_torch(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    """The graph draws from a generator of its own, never the default one.  A torch
    that registers it through ``register_generator_state`` shows it moving; one that
    registers it from C++ runs its replay prologue (seen by the operators it runs)."""
    private = _Generator()
    monkeypatch.setattr(_TorchGraph, "draws_from", private)
    module = _Module()
    graph, _ = _captured(monkeypatch, module, draws=4)  # registered from C++
    graph.replay()
    graph.replay()  # two replays seen drawing
    assert graphs._graphs[graph].lean.state == lean_graph.REFUSED  # noqa: SLF001
    import otel_flashinfer

    otel_flashinfer.uninstrument()
    graph, _ = _captured(monkeypatch, module, draws=4, cls=_RegisteringGraph,
                         before=lambda g: g.register_generator_state(private))
    assert _RegisteringGraph.registered[-1] is private  # torch's own ran too
    graph.replay()
    graph.replay()
    assert graphs._graphs[graph].lean.state == lean_graph.REFUSED  # noqa: SLF001
    assert private.offset == 16 and module.py_launches == module.c_launches == []
    graph.reset()
    assert graphs._registered_generators.get(graph) is None  # noqa: SLF001


def test_a_copy_closed_while_the_c_gate_is_armed_for_it_sends_replays_to_python(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    """Armed for the copy, the gate checks no word: once the copy is gone (another
    thread's failed launch, say), an armed replay must not run torch's graph with the
    word left open by the last traced replay."""
    module = _Module()
    graph, group = _captured(monkeypatch, module, draws=0)
    capture = graphs._graphs[graph]  # noqa: SLF001
    graph.replay()  # 1 traced: the word opened
    graph.replay()  # 2 the copy through Python: the gate armed for it
    assert group.gates == [True] and capture.skip.count > 0
    capture.close_lean()
    capture.skip.count = 5  # armed again by a racing thread
    graph.replay()  # 3: through Python, to torch with the word closed
    assert _TorchGraph.replays == 2 and group.gates == [True, False]
    assert module.c_launches == [] and len(module.py_launches) == 1


def test_auto_is_charged_up_to_the_copys_launch_not_for_it(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    import time

    from otel_flashinfer import graph_sampling

    charged: list[float] = []
    charge = graph_sampling.ReplaySampler.charge_untraced
    monkeypatch.setattr(graph_sampling.ReplaySampler, "charge_untraced",
                        lambda self, s: charged.append(s) or charge(self, s))
    module = _Module()
    monkeypatch.setattr(module, "lean_graph_launch",
                        lambda exec_, device: time.sleep(0.05) or module.py_launches.append(1))
    graph, _ = _captured(monkeypatch, module, draws=0)
    graph.replay()
    graph.replay()  # the copy: a 50 ms launch, which is the replay's, not tracing's
    assert module.py_launches == [1] and len(charged) == 1 and charged[0] < 0.02


def test_one_replay_seen_drawing_does_not_refuse_the_copy_alone(
        monkeypatch: pytest.MonkeyPatch, _instrumented: Any) -> None:
    """Another thread drew from the default generator during the first replay: the
    second, which draws nothing, proves the graph."""
    module = _Module()
    graph, _ = _captured(monkeypatch, module, draws=0)
    lean = graphs._graphs[graph].lean  # noqa: SLF001
    _TorchGraph.race = 4
    graph.replay()
    assert lean.pending and _TorchGraph.race == 0
    graph.replay()
    assert lean.ready
    graph.replay()
    assert module.py_launches == [(0xA1, 0)]


class _Tails:
    """The extension's capture_deps / capture_tail_node, as a capture would answer."""

    def __init__(self, before: list[int], tail: int, fail: bool = False) -> None:
        self.before, self.tail, self.fail = before, tail, fail
        self.asked: list[tuple[int, list[int]]] = []

    def capture_deps(self, stream: int) -> list[int]:
        return list(self.before)

    def capture_tail_node(self, stream: int, before: list[int]) -> int:
        if self.fail:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated")
        self.asked.append((stream, before))
        return self.tail


def test_a_gated_capture_notes_the_nodes_zeroing_its_rows(monkeypatch) -> None:
    """``GraphRows`` asks the capture for the node each zeroing of its rows became (the
    stream's dependencies before it, then the one node after), and hands those nodes to
    the copy; a zeroing that made no single node, an ungated graph, an extension not
    built yet, or one that fails keeps its node in the copy, the failure counted.  The
    zeroing itself runs once, whatever happens."""
    from otel_flashinfer.stats import graph_rows

    health.reset()
    module = _Tails([0x10, 0x11], 0x20)
    monkeypatch.setattr(graph_rows._kernel, "get", lambda *a, **k: module)
    made: list[torch.Tensor] = []

    def zeros() -> torch.Tensor:
        made.append(torch.zeros(2))
        return made[-1]

    rows = graph_rows.GraphRows(torch.device("cuda", 0), gated=True)
    assert rows._zeroed(7, zeros) is made[-1]
    assert module.asked == [(7, [0x10, 0x11])] and rows._zeroing == [0x20]
    module.tail = 0  # more than one node, or none: left in the copy
    rows._zeroed(7, zeros)
    assert rows._zeroing == [0x20]
    rows._gate, rows._gate_module = torch.empty(1, dtype=torch.int32), module
    assert rows.lean_parts() == (module, rows._gate.data_ptr(), 0, (0x20,))

    ungated = graph_rows.GraphRows(torch.device("cuda", 0), gated=False)
    module.tail = 0x30
    ungated._zeroed(7, zeros)
    assert ungated._zeroing == [] and len(module.asked) == 2
    monkeypatch.setattr(graph_rows._kernel, "get", lambda *a, **k: None)  # still building
    rows._zeroed(7, zeros)
    monkeypatch.setattr(graph_rows._kernel, "get", lambda *a, **k: _Tails([], 0x40, True))
    assert rows._zeroed(7, zeros) is made[-1]
    assert rows._zeroing == [0x20] and len(made) == 5
    assert health.counters()["stats_errors"] == 1
