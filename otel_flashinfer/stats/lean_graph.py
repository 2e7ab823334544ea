"""A sampled level-5 graph's untraced replays, without its statistics nodes at all.

Switched off (``node_switch``), a captured statistics launch still costs its node about
0.33 us of GPU time on every replay (5.4% of the 32-layer decode step on an H200), and
switching costs host time each way.  So, where it can, a gated graph gets a second
executable graph, made from the captured one with the statistics nodes taken out
(csrc/lean_graph.cpp).  Untraced replays launch it; traced ones go through torch's
replay, whose graph has them.

Launching our copy skips torch's replay itself, and with it the prologue that hands a
graph that draws random numbers its next Philox offset: such a graph would draw the
same numbers on every untraced replay.  So the copy is used only once a replay through
torch has shown that the graph draws none (``graph_rng.RngWatch``).

The copy runs on the memory of torch's graph pool, so it never outlives torch's
graph: ``graphs.patch`` closes it on ``reset()``, on a new capture, and with the graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from ..graph_rng import RngWatch

#: Where the copy stands: waiting for a replay through torch to show the graph draws no
#: random numbers, in use, or not to be used (it does, or the copy failed).
PENDING, READY, REFUSED = "pending", "ready", "refused"

#: Whether the copy joins the dependencies of our launches on the branch stream beside a
#: call (stats/overlap.py) to their dependents, as our other launches' are.  No: that
#: left edges beside the application's programmatic (PDL) chain that its own capture did
#: not have (csrc/lean_rules.h, tests/test_lean_rules.py).  Benchmark probes flip it
#: (benchmarks/probes/lean_variants/).
JOIN_BRANCH = False


class LeanGraph:
    """The executable copy of one captured graph without its statistics nodes."""

    def __init__(self, module: Any, exec_: int, device: int, removed: int,
                 watch: RngWatch, shape: tuple[int, ...] = (),
                 zeroing: tuple[int, ...] = ()) -> None:
        self._module = module
        #: The extension's lean_launch capsule, for the C replay gate (``GraphSkip``).
        self.launcher = getattr(module, "lean_launch", None)
        self.exec = exec_
        self.device = device
        #: Statistics nodes left out of the copy, and the copy's (nodes, edges,
        #: programmatic edges) (``build``).
        self.removed = removed
        self.shape = shape
        #: The nodes zeroing the statistics rows, left out too (``GraphRows.lean_parts``).
        self.zeroing = zeroing
        self.state = PENDING
        self.watch = watch
        self._drew = 0  # replays through torch seen drawing random numbers
        self._finalizer = weakref.finalize(self, module.lean_graph_destroy, exec_)

    @classmethod
    def build(cls, module: Any, graph: Any, gates: Sequence[int], device: int,
              watch: RngWatch, zeroing: Sequence[int] = ()) -> LeanGraph | None:
        """The copy of ``graph`` (a ``torch.cuda.CUDAGraph`` that torch kept) without
        the nodes noted for ``gates`` and the ``zeroing`` nodes, or None where the
        extension cannot make one.  Raises where making it failed (the nodes are
        switched instead)."""
        if not gates or not getattr(module, "LEAN_GRAPHS", False):
            return None
        raw = int(graph.raw_cuda_graph())
        exec_, removed, *shape = module.lean_graph_make(raw, list(gates),
                                                        JOIN_BRANCH, list(zeroing))
        return cls(module, exec_, device, removed, watch, tuple(shape), tuple(zeroing))

    @property
    def ready(self) -> bool:
        """Whether untraced replays launch the copy."""
        return self.state == READY

    @property
    def pending(self) -> bool:
        """Whether the next replay through torch is watched for random numbers."""
        return self.state == PENDING

    def proven(self, drew_nothing: bool | None) -> None:
        """After a replay through torch that ``watch`` looked at (``RngWatch.run``).
        Refused after two replays that drew: one could be another thread drawing from
        the default generator meanwhile, and a graph that draws draws on every replay."""
        if self.state != PENDING or drew_nothing is None:
            return
        if drew_nothing:
            self.state = READY
            return
        self._drew += 1
        if self._drew >= 2:
            self.state = REFUSED

    def launch(self) -> None:
        """An untraced replay: the copy on the device's current stream.  Raises where
        the launch failed (the caller closes the copy and replays through torch)."""
        self._module.lean_graph_launch(self.exec, self.device)

    def close(self) -> None:
        """Never launched again; freed now (a launch in flight completes first)."""
        self.state = REFUSED
        self._finalizer()


def build_for(groups: Iterable[Any], graph: Any, device: int, watch: RngWatch | None
              ) -> LeanGraph | None:
    """The copy of ``graph`` (captured on ``device``) without the nodes of its gated
    ``groups`` (``GraphRows.lean_parts``), or None where none has a word, one is on
    another device, or the graph's random numbers cannot be watched.  Raises where the
    copy could not be made."""
    module, words, zeroing = None, [], []
    for group in groups:
        parts = getattr(group, "lean_parts", None)
        got = parts() if parts is not None else None
        if got is None:
            continue  # its launches read no word: both graphs run them
        if got[2] != device or (module is not None and got[0] is not module):
            return None
        module = got[0]
        words.append(got[1])
        zeroing.extend(got[3])
    if module is None or watch is None:
        return None
    return LeanGraph.build(module, graph, words, device, watch, zeroing)
