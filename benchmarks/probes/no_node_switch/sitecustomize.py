"""Probe only: sampled level-5 graphs gated by the word alone, as before
``stats/node_switch.py``, for a side-by-side baseline of the node switching.

Put this folder first on PYTHONPATH with ``FI_PROBE_NO_NODE_SWITCH=1`` (the benchmarks'
children keep PYTHONPATH and every variable not starting with ``OTEL_``)::

    FI_PROBE_NO_NODE_SWITCH=1 PYTHONPATH=$PWD/benchmarks/probes/no_node_switch:$PYTHONPATH \\
        python3 benchmarks/bench_graph_step.py --mode gpu --replays 3000 --levels 0,5 \\
        --every auto --sync

Graphs are then made as their maker asked (no ``keep_graph``), so no node is switched.
"""

import os

if os.environ.get("FI_PROBE_NO_NODE_SWITCH") == "1":
    from otel_flashinfer import graphs as _graphs

    _graphs._keep_for_nodes = lambda runtime: False  # noqa: SLF001
