"""How the level-5 copy takes statistics nodes out of a captured graph
(csrc/lean_rules.h, run by csrc/lean_graph.cpp on the GPU): on the CPU, through a
harness that runs the same header on a plain graph.

The graphs here are built the way CUDA stream capture builds them: a launch depends on
its stream's dependency set, an event wait merges another stream's set in, and a launch
made with programmatic dependent launch (PDL) gets programmatic edges from the kernels
it depends on.  The level-5 captures place our launches as stats/recorder.py does: the
inputs' launch before the call on its stream, or on our branch stream for a read-only
call (``stats/overlap.py``); the outputs' launch after the call, and then the branch
joined back.  The copy without our nodes must have the application's own graph: the
same edges, of the same kinds, no more (an extra edge beside a PDL chain keeps the
dependent from starting early) and no fewer (an order lost is a race).  What the model
assumes of CUDA (a PDL launch's edges from every kernel it depends on are programmatic,
an event wait adds to a stream's set) is checked on the GPU by
``test_core_gpu.py::test_level5_copy_has_the_uninstrumented_graphs_edges``.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("lean_rules") / "harness"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                    "-I", str(ROOT / "csrc"), "-o", str(exe),
                    str(ROOT / "tests" / "lean_rules_harness.cpp")], check=True)
    return exe


class Capture:
    """Stream capture, as far as edges go: each stream holds its dependency set."""

    def __init__(self) -> None:
        self.kernel: dict[str, bool] = {}
        self.edges: list[tuple[str, str, int]] = []
        self.streams: dict[str, list[str]] = {}
        self.ours: list[str] = []  # our statistics launches, in capture order
        self.branch: set[str] = set()  # those made on our branch stream
        #: Our nodes zeroing the statistics rows (stats/graph_rows.py), in capture order.
        self.zeroing: list[str] = []

    def launch(self, stream: str, name: str, pdl: bool = False, ours: bool = False,
               kernel: bool = True) -> str:
        for dep in self.streams.get(stream, []):
            self.edges.append((dep, name, int(pdl and kernel and self.kernel[dep])))
        self.kernel[name] = kernel
        self.streams[stream] = [name]
        if ours:
            self.ours.append(name)
        return name

    def record(self, stream: str) -> list[str]:
        return list(self.streams.get(stream, []))

    def wait(self, stream: str, event: list[str]) -> None:
        now = self.streams.get(stream, [])
        self.streams[stream] = now + [n for n in event if n not in now]

    # What stats/recorder.py captures around one call at level 5 (``_launch_captured``,
    # then ``_finish_graph`` and its ``_join``); ``empty``: the call itself puts nothing
    # on its stream (its work went elsewhere, or there was none).
    # ``zeros``: nodes that zero a new chunk of rows (and counters) first, on the call's
    # stream before any fork (torch.zeros in ``GraphRows.take``, which the recorder asks
    # before it forks): fill kernels, as torch.zeros makes on CUDA, or memsets
    # (``zero_kernels`` False).
    def call(self, name: str, pdl: bool, branch: bool = False, launches: int = 1,
             stream: str = "main", outs: int | None = None, empty: bool = False,
             zeros: int = 0, zero_kernels: bool = True) -> None:
        for i in range(zeros):
            self.zeroing.append(self.launch(stream, f"{name}.zero{i}", kernel=zero_kernels))
        if branch:  # the inputs' statistics beside the call
            self.wait("branch", self.record(stream))
        first = "branch" if branch else stream
        for i in range(launches):
            self.launch(first, f"{name}.in{i}", ours=True)
        if branch:
            self.branch.update(f"{name}.in{i}" for i in range(launches))
        if not empty:
            self.launch(stream, name, pdl=pdl)
        for i in range(launches if outs is None else outs):  # none: nothing to read
            self.launch(stream, f"{name}.out{i}", ours=True)
        if branch:  # joined after the outputs' launch
            self.wait(stream, self.record("branch"))


def run(harness: Path, capture: Capture, join_branch: bool = False, reverse: bool = False,
        weak: tuple[tuple[str, str], ...] = (), order: list[str] | None = None,
        zeroing_last: bool = False) -> set[tuple[str, str, int]]:
    """The copy's edges, by name; ``join_branch``: joined around the branch's launches
    too (the tenth session's copy); ``weak``: edges the graph refuses to remove;
    ``order``: our nodes as the gates list them, if not in capture order.  The zeroing
    nodes go first, as lean_graph.cpp puts them (``zeroing_last``: after the others)."""
    ids = {name: i for i, name in enumerate(capture.kernel)}
    names = {i: name for name, i in ids.items()}
    lines = [f"reverse {int(reverse)}"]
    lines += [f"node {ids[n]} {int(k)}" for n, k in capture.kernel.items()]
    lines += [f"edge {ids[f]} {ids[t]} {p}" for f, t, p in capture.edges]
    lines += [f"weak {ids[f]} {ids[t]}" for f, t in weak]
    ours = capture.ours if order is None else order
    lines += [f"remove {ids[n]} {int(n in capture.branch and not join_branch)}"
              for n in ([*ours, *capture.zeroing] if zeroing_last
                        else [*capture.zeroing, *ours])]
    done = subprocess.run([str(harness)], input="\n".join(lines), capture_output=True,
                          text=True, check=False)
    if done.returncode == 3:
        raise RuntimeError(done.stdout.strip())
    assert done.returncode == 0, done.stderr
    got = [tuple(int(x) for x in line.split()) for line in done.stdout.splitlines()]
    assert len(got) == len(set(got)), "an edge was added twice"
    return {(names[f], names[t], p) for f, t, p in got}


def decode_step(level5: bool, layers: int = 3, rms_pdl: bool = True, dec_pdl: bool = True,
                branch: bool = True, launches: int = 1, outs: int | None = None,
                mid_copy: bool = False) -> Capture:
    """bench_graph_step's step: per layer an rmsnorm, then a decode (read-only: on a
    branch at level 5 when ``branch``); ``mid_copy``: a memcpy node (not a kernel) of
    the application's between them."""
    c = Capture()
    for k in range(layers):
        if level5:
            c.call(f"R{k}", rms_pdl, launches=launches, outs=outs)
        else:
            c.launch("main", f"R{k}", pdl=rms_pdl)
        if mid_copy:
            c.launch("main", f"M{k}", kernel=False)
        if level5:
            c.call(f"D{k}", dec_pdl, branch=branch, launches=launches, outs=outs)
        else:
            c.launch("main", f"D{k}", pdl=dec_pdl)
    return c


@pytest.mark.parametrize("rms_pdl,dec_pdl", [(True, True), (True, False), (False, True),
                                             (False, False)])
@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("launches,outs", [(1, None), (2, None), (1, 0), (2, 1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_copy_is_the_applications_own_graph(harness: Path, rms_pdl: bool,
                                                 dec_pdl: bool, branch: bool, launches: int,
                                                 outs: int | None, reverse: bool) -> None:
    """Every PDL mix, the decode's inputs on our branch or not, one or two launches a
    side, outputs' launch skipped (``outs=0``: nothing to read), edges listed either
    way round."""
    app = set(decode_step(False, rms_pdl=rms_pdl, dec_pdl=dec_pdl).edges)
    level5 = decode_step(True, rms_pdl=rms_pdl, dec_pdl=dec_pdl, branch=branch,
                         launches=launches, outs=outs)
    assert run(harness, level5, reverse=reverse) == app


@pytest.mark.parametrize("mid_copy", [False, True])
def test_joining_around_the_branch_left_edges_beside_the_pdl_chain(harness: Path,
                                                                    mid_copy: bool) -> None:
    """The tenth session's copy: each rmsnorm also waited for the full completion of the
    rmsnorms before it, so no decode or rmsnorm could start early (PDL)."""
    app = set(decode_step(False, mid_copy=mid_copy).edges)
    level5 = decode_step(True, mid_copy=mid_copy)
    assert run(harness, level5) == app
    old = run(harness, level5, join_branch=True)
    assert app < old
    if not mid_copy:
        assert {(f, t) for f, t, _ in old - app} == {("R0", "R1"), ("R0", "R2"),
                                                     ("R1", "R2")}


def joined(level5: bool, z_pdl: bool = True, y_pdl: bool = False) -> Capture:
    """An application that forks a stream of its own: X, then Z on a side stream, joined
    back before Y, then W.  Y depends on X and on Z directly (the join), Z on X."""
    c = Capture()

    def add(name: str, pdl: bool, stream: str = "main") -> None:
        if level5:
            c.call(name, pdl, stream=stream)
        else:
            c.launch(stream, name, pdl=pdl)

    add("X", True)
    c.wait("side", c.record("main"))
    add("Z", z_pdl, stream="side")
    c.wait("main", c.record("side"))
    add("Y", y_pdl)
    add("W", True)
    return c


@pytest.mark.parametrize("z_pdl", [True, False])
@pytest.mark.parametrize("y_pdl", [True, False])
def test_an_applications_own_fork_and_join_keep_their_edges(harness: Path, z_pdl: bool,
                                                             y_pdl: bool) -> None:
    app = set(joined(False, z_pdl, y_pdl).edges)
    assert {("X", "Y", int(y_pdl)), ("X", "Z", int(z_pdl)), ("Z", "Y", int(y_pdl))} <= app
    got = run(harness, joined(True, z_pdl, y_pdl))
    if z_pdl:
        # Z may start, and end, before X completes: the capture's X -> Y stays as the
        # application made it.
        assert got == app
    else:
        # Z starts after X completes (a full edge), and Y after Z starts: X -> Y is
        # implied, and the copy leaves it out.
        assert got == app - {("X", "Y", int(y_pdl))}


def test_a_programmatic_edge_where_a_full_one_is_needed_becomes_full(harness: Path) -> None:
    # d -> t programmatic, and d -> s -> t full with s ours: t must not start before d
    # completes.
    c = Capture()
    for name in ("d", "s", "t"):
        c.kernel[name] = True
    c.edges = [("d", "t", 1), ("d", "s", 0), ("s", "t", 0)]
    c.ours = ["s"]
    assert run(harness, c) == {("d", "t", 0)}
    with pytest.raises(RuntimeError, match="could not make a programmatic edge a full one"):
        run(harness, c, weak=(("d", "t"),))  # the copy is refused, not made weaker


def test_a_node_noted_twice_is_taken_out_once(harness: Path) -> None:
    c = decode_step(True, layers=2)
    c.ours = c.ours + c.ours[:3]
    assert run(harness, c) == set(decode_step(False, layers=2).edges)


@pytest.mark.parametrize("seed", range(12))
def test_any_order_of_our_nodes_gives_the_same_graph(harness: Path, seed: int) -> None:
    """Gates list their nodes in capture order, one gate per device; several gates
    would list them gate by gate.  The copy must not depend on it, also where a forked
    call puts nothing on its own stream (the next call's inputs' launch then depends on
    the call before and on the branch's launch, which depends on it by a full edge)."""
    app = Capture()
    level5 = Capture()
    for k in range(3):
        app.launch("main", f"R{k}", pdl=True)
        level5.call(f"R{k}", True)
        if k != 1:
            app.launch("main", f"D{k}", pdl=True)
        level5.call(f"D{k}", True, branch=True, empty=k == 1)
    order = list(level5.ours)
    random.Random(seed).shuffle(order)
    assert run(harness, level5, order=order) == set(app.edges)


def test_a_long_step_keeps_its_chain(harness: Path) -> None:
    level5 = decode_step(True, layers=64)
    app = set(decode_step(False, layers=64).edges)
    assert len(app) == 127 and run(harness, level5) == app


def zeroed_step(at: tuple[str, ...], rms_pdl: bool, dec_pdl: bool, branch: bool,
                zero_kernels: bool = True) -> Capture:
    """``decode_step``'s level 5, with two zeroing nodes (the counters', a chunk's) ahead
    of each call named in ``at``: at the start of the step, and where a new chunk starts
    later (before the fork, for a decode whose inputs' launch is on our branch)."""
    c = Capture()
    for k in range(3):
        for name, pdl, fork in ((f"R{k}", rms_pdl, False), (f"D{k}", dec_pdl, branch)):
            c.call(name, pdl, branch=fork, zeros=2 if name in at else 0,
                   zero_kernels=zero_kernels)
    return c


@pytest.mark.parametrize("at", [("R0",), ("R0", "R1"), ("R0", "D1")])
@pytest.mark.parametrize("rms_pdl,dec_pdl", [(True, True), (False, True), (True, False),
                                             (False, False)])
@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("zeroing_last", [False, True])
def test_the_nodes_zeroing_our_rows_go_too(harness: Path, at: tuple[str, ...],
                                           rms_pdl: bool, dec_pdl: bool, branch: bool,
                                           zeroing_last: bool) -> None:
    """The copy leaves out the fill kernels that zero the statistics rows (only our
    launches read them), and is still exactly the application's graph: a fill kernel
    taken out hands on its own edge into the node after it, programmatic where that
    is a kernel launched with PDL, as the application's capture had it.  In whichever
    order they are taken out."""
    app = set(decode_step(False, rms_pdl=rms_pdl, dec_pdl=dec_pdl).edges)
    level5 = zeroed_step(at, rms_pdl, dec_pdl, branch)
    assert len(level5.zeroing) == 2 * len(at)
    assert run(harness, level5, zeroing_last=zeroing_last) == app


@pytest.mark.parametrize("at", [("R0", "R1"), ("R0", "D1")])
@pytest.mark.parametrize("branch", [True, False])
def test_a_memset_zeroing_keeps_every_order(harness: Path, at: tuple[str, ...],
                                            branch: bool) -> None:
    """Were the zeroing a memset, its edges would be full ones.  Taken out before our
    launches (lean_graph.cpp), where one of our launches follows it on its stream, that
    launch's own edge into the call is the one handed on, programmatic as the
    application's; taken out after them, the memset's full edge would be.  Ahead of a
    fork (a decode's inputs on our branch) the call itself follows it: its PDL start
    is lost, no order is, and the copy is no slower than with the node, which waits for
    the call before it to complete."""
    app = set(decode_step(False).edges)

    def weaker(got: set) -> set:
        assert {(f, t) for f, t, _ in got} == {(f, t) for f, t, _ in app}  # every order
        return {(f, t) for f, t, p in app if p} - {(f, t) for f, t, p in got if p}

    level5 = zeroed_step(at, True, True, branch, zero_kernels=False)
    before = "R1" if at[1] == "D1" else "D0"
    forked = branch and at[1] == "D1"
    assert weaker(run(harness, level5)) == ({(before, at[1])} if forked else set())
    assert weaker(run(harness, level5, zeroing_last=True)) == {(before, at[1])}
