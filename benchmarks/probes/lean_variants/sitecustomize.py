"""Probe only: level 5's sampled graphs with another way of replaying untraced replays
than the default copy without statistics nodes (``stats/lean_graph.py``), for
side-by-side baselines in the benchmarks:

- ``FI_PROBE_LEAN=switch``: no copy; untraced replays switch the statistics nodes off
  (``stats/node_switch.py``), the ninth session's way.
- ``FI_PROBE_LEAN=v1``: the copy made as in the tenth session, joining around our
  launches on the branch stream too (``JOIN_BRANCH``, csrc/lean_rules.h).
- ``FI_PROBE_LEAN=v2``: the copy made as in the eleventh session, keeping the nodes
  that zero the statistics rows (``GraphRows._zeroed`` notes none).

Put this folder first on PYTHONPATH (the benchmarks' children keep PYTHONPATH and every
variable not starting with ``OTEL_``)::

    FI_PROBE_LEAN=switch PYTHONPATH=$PWD/benchmarks/probes/lean_variants:$PYTHONPATH \\
        python3 benchmarks/bench_graph_step.py --mode gpu --replays 3000 --levels 0,5 \\
        --every auto --sync
"""

import os

_how = os.environ.get("FI_PROBE_LEAN", "")
if _how == "switch":
    from otel_flashinfer.stats import lean_graph as _lean_graph

    def _no_copy(*args: object, **kwargs: object) -> None:
        return None

    _lean_graph.build_for = _no_copy
elif _how == "v1":
    from otel_flashinfer.stats import lean_graph as _lean_graph

    _lean_graph.JOIN_BRANCH = True
elif _how == "v2":
    from otel_flashinfer.stats import graph_rows as _graph_rows

    def _unnoted(self: object, stream: int, zeros: object) -> object:
        return zeros()  # type: ignore[operator]

    _graph_rows.GraphRows._zeroed = _unnoted
elif _how not in ("", "lean"):
    raise SystemExit(f"FI_PROBE_LEAN={_how!r}: expected switch, v1 or v2")
