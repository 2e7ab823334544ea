"""A sampled level-5 graph's statistics nodes, switched off while replays go untraced.

Under ``REPLAY_EVERY`` other than 1 a captured statistics launch reads a gate word and
returns at once on untraced replays (``graph_rows.GraphRows.set_gate``).  Returning at
once still costs its graph node about 1.5 us of GPU time on every replay: +17% on the
32-layer decode step, whose 128 launches then cost more than the budget of ``auto``.  A
node disabled in the executable graph (``cudaGraphNodeSetEnabled``) runs as an empty
one.  The capture notes each gated launch's node by its word (csrc/gate_nodes.cpp);
the handles belong to the captured ``cudaGraph_t``, which torch keeps only for a graph
made with ``keep_graph=True`` (``graphs.patch`` makes sampled level-5 graphs so).

A graph whose untraced replays launch a copy without these nodes (``lean_graph``) keeps
them on; switching serves the graphs that cannot have one (they draw random numbers, or
the driver refused the copy).

The word stays the gate: switching only spares the GPU the empty launches, so a graph
that cannot be switched (torch without ``raw_cuda_graph_exec``, a launch whose node was
not told) replays as before.  Switching affects later launches only, so neither
direction waits for the GPU.
"""

from __future__ import annotations

import weakref
from typing import Any


def kept_graph(graph: Any) -> bool:
    """Whether torch kept ``graph``'s captured cudaGraph_t (the nodes' owner)."""
    try:
        return bool(graph.raw_cuda_graph())
    except Exception:  # noqa: BLE001 - torch says "not kept" by raising
        return False


class NodeSwitch:
    """The statistics nodes of one gate word in one graph, on or off."""

    def __init__(self, module: Any, gate: int, graph: Any) -> None:
        self._module = module
        self._gate = gate
        self._graph = weakref.ref(graph)
        #: How many of the nodes are off in the executable graph now (instantiated: 0).
        self.off = 0

    @classmethod
    def bind(cls, module: Any, gate: int, graph: Any) -> NodeSwitch | None:
        """A switch for ``gate``'s nodes in ``graph``, or None where there is nothing
        to switch or it cannot be done (the word then gates alone)."""
        if not gate or not hasattr(module, "gate_nodes") or module.gate_nodes(gate) <= 0:
            return None
        return cls(module, gate, graph) if kept_graph(graph) else None

    @property
    def on(self) -> bool:
        """Whether every node is on (a traced replay's launches all run)."""
        return self.off == 0

    def set(self, on: bool) -> None:
        """Every node on or off for the replays launched from now on.  Raises where a
        node could not be switched (the others are; ``off`` says how many are off)."""
        if on != self.on:
            self._apply(on)

    def restore(self) -> bool:
        """After a failed ``set``: every node asked back on, as instantiated; whether
        none is left off (if some are, the graph's traced replays cannot trust their
        rows)."""
        try:
            self._apply(True)
        except Exception:  # noqa: BLE001 - the caller reports the first failure
            pass
        return self.on

    def _apply(self, on: bool) -> None:
        executable = self._executable()
        if not executable:
            # Not instantiated (yet, or any more): an instantiation starts with every
            # node on, and there is nothing to switch until then.
            self.off = 0
            return
        failed, self.off, first = self._module.gate_nodes_set(self._gate, executable, on)
        if failed:
            raise RuntimeError(f"{failed} statistics graph nodes could not be switched "
                               f"{'on' if on else 'off'} ({first})")

    def _executable(self) -> int:
        """torch's executable graph now, or 0 where there is none: torch raises for a
        kept graph not instantiated yet, and after ``reset()``."""
        graph = self._graph()
        if graph is None:
            return 0
        try:
            return int(graph.raw_cuda_graph_exec())
        except Exception:  # noqa: BLE001
            return 0
