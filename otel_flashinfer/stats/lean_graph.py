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
torch has shown that the graph draws none (``RngWatch``): torch advances each
registered generator's offset by what the graph drew, on every replay.  Generators
count as registered when they are the capture device's default one or went through
``CUDAGraph.register_generator_state`` (``graphs.patch`` notes those); a generator a
C++ extension registered behind torch's Python API is not seen.

The copy runs on the memory of torch's graph pool, so it never outlives torch's
graph: ``graphs.patch`` closes it on ``reset()``, on a new capture, and with the graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

#: Where the copy stands: waiting for a replay through torch to show the graph draws no
#: random numbers, in use, or not to be used (it does, or the copy failed).
PENDING, READY, REFUSED = "pending", "ready", "refused"


class RngWatch:
    """Whether a replay through torch advanced any of the graph's generators."""

    def __init__(self, generators: Iterable[Any]) -> None:
        self._generators = tuple(generators)
        self._before: tuple[int, ...] | None = None

    def before(self) -> None:
        self._before = _offsets(self._generators)

    def after(self) -> bool | None:
        """True: no generator moved (the graph drew nothing); False: one did; None:
        ``before`` was not taken or an offset could not be read."""
        before, self._before = self._before, None
        if before is None:
            return None
        after = _offsets(self._generators)
        if after is None:
            return None
        return after == before


def _offsets(generators: Sequence[Any]) -> tuple[int, ...] | None:
    try:
        return tuple(int(g.get_offset()) for g in generators)
    except Exception:  # noqa: BLE001 - an offset we cannot read proves nothing
        return None


class LeanGraph:
    """The executable copy of one captured graph without its statistics nodes."""

    def __init__(self, module: Any, exec_: int, device: int, removed: int,
                 generators: Iterable[Any]) -> None:
        self._module = module
        #: The extension's lean_launch capsule, for the C replay gate (``GraphSkip``).
        self.launcher = getattr(module, "lean_launch", None)
        self.exec = exec_
        self.device = device
        #: Statistics nodes left out of the copy.
        self.removed = removed
        self.state = PENDING
        self.watch = RngWatch(generators)
        self._finalizer = weakref.finalize(self, module.lean_graph_destroy, exec_)

    @classmethod
    def build(cls, module: Any, graph: Any, gates: Sequence[int], device: int,
              generators: Iterable[Any]) -> LeanGraph | None:
        """The copy of ``graph`` (a ``torch.cuda.CUDAGraph`` that torch kept) without
        the nodes noted for ``gates``, or None where the extension cannot make one.
        Raises where making it failed (the nodes are switched instead)."""
        if not gates or not getattr(module, "LEAN_GRAPHS", False):
            return None
        raw = int(graph.raw_cuda_graph())
        exec_, removed, _left = module.lean_graph_make(raw, list(gates))
        return cls(module, exec_, device, removed, generators)

    @property
    def ready(self) -> bool:
        """Whether untraced replays launch the copy."""
        return self.state == READY

    @property
    def pending(self) -> bool:
        """Whether the next replay through torch is watched for random numbers."""
        return self.state == PENDING

    def proven(self, drew_nothing: bool | None) -> None:
        """After the replay through torch that ``watch`` looked at."""
        if self.state != PENDING or drew_nothing is None:
            return
        self.state = READY if drew_nothing else REFUSED

    def launch(self) -> None:
        """An untraced replay: the copy on the device's current stream.  Raises where
        the launch failed (the caller closes the copy and replays through torch)."""
        self._module.lean_graph_launch(self.exec, self.device)

    def close(self) -> None:
        """Never launched again; freed now (a launch in flight completes first)."""
        self.state = REFUSED
        self._finalizer()


def build_for(groups: Iterable[Any], graph: Any, generators: Iterable[Any] | None
              ) -> LeanGraph | None:
    """The copy of ``graph`` without the nodes of its gated ``groups``
    (``GraphRows.lean_parts``), or None where none has a word or they are on different
    devices.  Raises where the copy could not be made."""
    module, device, words = None, None, []
    for group in groups:
        parts = getattr(group, "lean_parts", None)
        got = parts() if parts is not None else None
        if got is None:
            continue  # its launches read no word: both graphs run them
        if module is not None and (got[0] is not module or got[2] != device):
            return None
        module, word, device = got
        words.append(word)
    if module is None or device is None or generators is None:
        return None
    return LeanGraph.build(module, graph, words, device, generators)
