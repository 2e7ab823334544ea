"""How the level-5 copy takes statistics nodes out of a captured graph
(csrc/lean_rules.h, run by csrc/lean_graph.cpp on the GPU): on the CPU, through a
harness that runs the same header on a plain graph.

The graphs here are built the way CUDA stream capture builds them: a launch depends on
its stream's dependency set, an event wait merges another stream's set in, and a launch
made with programmatic dependent launch (PDL) gets programmatic edges from the kernels
it depends on.  The level-5 captures place our launches as csrc/stats_hooks.cpp does:
the inputs' launch before the call on its stream, or on our branch stream for a
read-only call (``stats/overlap.py``); the outputs' launch after the call, after the
branch is joined.  The copy without our nodes must have the application's own graph:
the same edges, of the same kinds, no more (an extra edge beside a PDL chain keeps the
dependent from starting early) and no fewer (an order lost is a race).
"""

from __future__ import annotations

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

    # What csrc/stats_hooks.cpp captures around one call at level 5.
    def call(self, name: str, pdl: bool, branch: bool = False, launches: int = 1,
             stream: str = "main") -> None:
        if branch:  # the inputs' statistics beside the call
            self.wait("branch", self.record(stream))
            for i in range(launches):
                self.launch("branch", f"{name}.in{i}", ours=True)
        else:
            for i in range(launches):
                self.launch(stream, f"{name}.in{i}", ours=True)
        self.launch(stream, name, pdl=pdl)
        if branch:  # joined before the outputs' launch
            self.wait(stream, self.record("branch"))
        for i in range(launches):
            self.launch(stream, f"{name}.out{i}", ours=True)


def run(harness: Path, capture: Capture, prune: bool) -> set[tuple[str, str, int]]:
    ids = {name: i for i, name in enumerate(capture.kernel)}
    names = {i: name for name, i in ids.items()}
    lines = [f"prune {int(prune)}"]
    lines += [f"node {ids[n]} {int(k)}" for n, k in capture.kernel.items()]
    lines += [f"edge {ids[f]} {ids[t]} {p}" for f, t, p in capture.edges]
    lines += [f"remove {ids[n]}" for n in capture.ours]
    out = subprocess.run([str(harness)], input="\n".join(lines), capture_output=True,
                         text=True, check=True).stdout
    got = [tuple(int(x) for x in line.split()) for line in out.splitlines()]
    assert len(got) == len(set(got)), "an edge was added twice"
    return {(names[f], names[t], p) for f, t, p in got}


def decode_step(level5: bool, layers: int = 3, rms_pdl: bool = True, dec_pdl: bool = True,
                branch: bool = True, launches: int = 1) -> Capture:
    """bench_graph_step's step: per layer an rmsnorm, then a decode (read-only: on a
    branch at level 5 when ``branch``)."""
    c = Capture()
    for k in range(layers):
        if level5:
            c.call(f"R{k}", rms_pdl, branch=False, launches=launches)
            c.call(f"D{k}", dec_pdl, branch=branch, launches=launches)
        else:
            c.launch("main", f"R{k}", pdl=rms_pdl)
            c.launch("main", f"D{k}", pdl=dec_pdl)
    return c


@pytest.mark.parametrize("rms_pdl,dec_pdl", [(True, True), (True, False), (False, True),
                                             (False, False)])
@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("launches", [1, 2])
def test_pruning_gives_the_applications_own_graph(
        harness: Path, rms_pdl: bool, dec_pdl: bool, branch: bool, launches: int) -> None:
    app = set(decode_step(False, rms_pdl=rms_pdl, dec_pdl=dec_pdl).edges)
    level5 = decode_step(True, rms_pdl=rms_pdl, dec_pdl=dec_pdl, branch=branch,
                         launches=launches)
    got = run(harness, level5, prune=True)
    if branch and dec_pdl and not rms_pdl:
        # R0 -> D0 (PDL) -> R1: the decode may start before R0 completes, so the rule
        # cannot tell the branch's R0 -> R1 from an order the application asked for
        # (test_pruning_keeps_a_full_edge_beside_a_programmatic_path) and keeps it.
        # R1 does not use PDL: it waits for D0 either way.
        assert got - app == {("R0", "R1", 0), ("R1", "R2", 0)} and app <= got
    else:
        assert got == app


def test_without_pruning_the_branch_leaves_edges_beside_the_pdl_chain(harness: Path) -> None:
    app = set(decode_step(False).edges)
    got = run(harness, decode_step(True), prune=False)
    # Each rmsnorm gets edges from the rmsnorms before it, past the decodes: the branch's
    # launches chain from one decode to the next (an event wait adds to a stream's set).
    assert got - app == {("R0", "R1", 1), ("R0", "R2", 1), ("R1", "R2", 1)}
    assert app <= got


def joined(level5: bool, z_pdl: bool = True) -> Capture:
    """An application that forks a stream of its own: X, then Z on a side stream, joined
    back before Y (no PDL), then W.  Y depends on X and on Z by full edges, and Z on X
    by a programmatic one when Z uses PDL."""
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
    add("Y", False)
    add("W", True)
    return c


@pytest.mark.parametrize("z_pdl", [True, False])
def test_pruning_keeps_a_full_edge_beside_a_programmatic_path(harness: Path,
                                                               z_pdl: bool) -> None:
    app = set(joined(False, z_pdl).edges)
    assert {("X", "Y", 0), ("X", "Z", int(z_pdl)), ("Z", "Y", 0)} <= app
    # X -> Z -> Y is a path, but when Z uses PDL it may start, and end, before X
    # completes: the application's capture ordered Y after X itself, and so must the
    # copy.  Without PDL the path's full edges order it, and the copy leaves out X -> Y.
    implied = set() if z_pdl else {("X", "Y", 0)}
    assert run(harness, joined(True, z_pdl), prune=True) == app - implied
    assert run(harness, joined(True, z_pdl), prune=False) == app - implied


def test_pruning_drops_only_what_another_path_implies(harness: Path) -> None:
    # A chain a -> s -> b -> c with s ours and an extra full edge s -> c: taking s out
    # adds a -> b and a -> c; a -> c holds through a -> b -> c (full first edge).
    c = Capture()
    for name in ("a", "s", "b", "c"):
        c.kernel[name] = True
    c.edges = [("a", "s", 0), ("s", "b", 0), ("b", "c", 0), ("s", "c", 0)]
    c.ours = ["s"]
    assert run(harness, c, prune=False) == {("a", "b", 0), ("b", "c", 0), ("a", "c", 0)}
    assert run(harness, c, prune=True) == {("a", "b", 0), ("b", "c", 0)}
    # With a -> b programmatic (s -> b was, so its copy is), a -> c stays: b may start
    # before a completes.
    c.edges = [("a", "s", 0), ("s", "b", 1), ("b", "c", 0), ("s", "c", 0)]
    assert run(harness, c, prune=True) == {("a", "b", 1), ("b", "c", 0), ("a", "c", 0)}
