"""Probe only: sampled level-5 graphs whose untraced replays switch the statistics nodes
off (``stats/node_switch.py``) instead of launching a copy without them
(``stats/lean_graph.py``), for a side-by-side baseline of the copy.

Put this folder first on PYTHONPATH with ``FI_PROBE_NO_LEAN_GRAPH=1`` (the benchmarks'
children keep PYTHONPATH and every variable not starting with ``OTEL_``)::

    FI_PROBE_NO_LEAN_GRAPH=1 PYTHONPATH=$PWD/benchmarks/probes/no_lean_graph:$PYTHONPATH \\
        python3 benchmarks/bench_graph_step.py --mode gpu --replays 3000 --levels 0,5 \\
        --every auto --sync
"""

import os

if os.environ.get("FI_PROBE_NO_LEAN_GRAPH") == "1":
    from otel_flashinfer.stats import lean_graph as _lean_graph

    _lean_graph.build_for = lambda groups, graph, generators: None
