"""Level 5 in the span wrapper: statistics of inputs before the call and of outputs
after it, on the caller's stream.

Eagerly, the inputs' statistics are launched before the call into a ring slot that the
outputs' statistics join after it (one event for both), and one Pending
goes on the span; under CUDA graph capture the statistics launch is captured with the
call and each sampled replay snapshots its own results
(``graphs.Capture.add_replay_hook``).  A decode/prefill wrapper's paged KV cache is
measured over the pages its planned indices reference.

With the C hot path, the pair handed to the wrapper are ``_hotpath.Switch``es: they
call these Python hooks until the statistics extension has built, then its C++ hooks
(``csrc/stats_hooks.cpp``), which do the same for CUDA tensors of one device and hand
every other case back to the Python ones.  With GPU timing on, the C++ hooks also time
the call: the inputs' launch stamps the GPU clock as it ends and the outputs' launch as
it starts, so the hot path records no timing events for it (``record.gpu`` is set to
False between the two hooks to say so).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import graphs, health, native
from ..pipeline import CallRecord
from . import kernel as _kernel
from . import overlap
from .decode import SCOPE_FULL, SCOPE_PAGES, SCOPE_SAMPLED
from .graph_rows import graph_rows_of, head_orderer
from .pending import StatsPending
from .planning import SLOT_DIMS
from .recorder import StatsRecorder, _Open

#: Whether ``make_hooks`` may switch to the C++ hooks (a benchmark turns it off to time
#: the Python ones side by side).
use_native = True

_PAGED_NAMES = ("paged_kv_cache", "kv_cache")
_TENSOR = torch.Tensor


def _paged(owner: Any, name: str, value: Any) -> tuple | None:
    """The wrapper's planned page indices for its KV-cache argument, if it has them, as
    the recorder's paged entry ``(name, cache, indices, indptr, batch, last_page_len,
    slot_dim)``: the last page of each request counts only its filled slots."""
    if name not in _PAGED_NAMES or owner is None:
        return None
    indices = getattr(owner, "_paged_kv_indices_buf", None)
    indptr = getattr(owner, "_paged_kv_indptr_buf", None)
    if not isinstance(indices, _TENSOR) or not isinstance(indptr, _TENSOR):
        return None
    batch = getattr(owner, "_batch_size", None) or indptr.numel() - 1
    last_page_len = getattr(owner, "_paged_kv_last_page_len_buf", None)
    layout = getattr(owner, "_kv_layout", None)
    slot_dim = SLOT_DIMS.get(layout, 0) if isinstance(layout, str) else 0
    if not isinstance(last_page_len, _TENSOR) or not slot_dim:
        last_page_len, slot_dim = None, 0
    return (name, value, indices, indptr, int(batch), last_page_len, slot_dim)


def _add(entries: list[Any], owner: Any, name: str, value: Any) -> None:
    if owner is not None and name in _PAGED_NAMES:
        paged = _paged(owner, name, value)
        if paged is not None:
            entries.append(paged)
            return
    if isinstance(value, _TENSOR):
        entries.append((name, value))
    elif isinstance(value, (tuple, list)):
        entries.extend((f"{name}.{i}", v) for i, v in enumerate(value[:8])
                       if isinstance(v, _TENSOR))


def input_entries(plan: Any, args: tuple, kwargs: dict) -> list[Any]:
    """``(name, tensor)`` and paged entries of a call's arguments, named as
    ``plan.bind`` names them (positional names from the plan, then keywords)."""
    entries: list[Any] = []
    owner = None
    start = 0
    if plan.skip_self and args:
        owner = args[0]
        start = 1
    names = plan.names
    count = len(names)
    for k in range(len(args) - start):
        value = args[start + k]
        if k < count:
            name = names[k]
            if type(value) is _TENSOR and (owner is None or name not in _PAGED_NAMES):
                entries.append((name, value))  # the common case, inline
                continue
        else:
            name = f"{plan.varargs or 'arg'}.{k - count}"
        _add(entries, owner, name, value)
    if kwargs:
        for name, value in kwargs.items():
            _add(entries, owner, name, value)
    return entries


def output_entries(result: Any) -> list[Any]:
    if isinstance(result, _TENSOR):
        return [("result.0", result)]
    if isinstance(result, (tuple, list)):
        return [(f"result.{i}", v) for i, v in enumerate(result[:8])
                if isinstance(v, _TENSOR)]
    return []


def make_hooks(recorder: StatsRecorder) -> tuple[Any, Any]:
    """(before, after) for ``spans.make_wrapper`` at level 5 and up: the C++ hooks once
    the extension has built, where the C hot path can switch to them."""
    before, after = python_hooks(recorder)
    # A captured call's rows go into its graph's chunks: one copy per traced replay.
    # Where every replay is traced and GPU time is on, the graph's head stamps its start.
    recorder.graph_rows_of = graph_rows_of(graphs.capture_state, recorder.on_low,
                                           recorder.gpu_time)
    # A captured attention call's inputs run beside it on a branch of the graph.
    graphs.set_capture_hooks("stats", overlap.prepare, recorder.join_forked)
    # The graph's head stamp ahead of the roots added after it, before the capture ends.
    graphs.set_capture_hooks("stats_head", None, head_orderer(graphs.capture_state))
    switch = native.switch_type()
    if switch is None or not recorder.use_kernel or not use_native or not _c_entries():
        return before, after
    before_switch, after_switch = switch(before), switch(after)

    def go_native(module: Any) -> None:
        hooks = native_hooks(module, recorder, before, after)
        if hooks is not None:
            # the after first: it hands any state it did not make to the Python after
            after_switch.target = hooks[1]
            before_switch.target = hooks[0]

    _kernel.when_ready(go_native)
    return before_switch, after_switch


def _c_entries() -> bool:
    """Whether wrappers are made over the C hot path: the C++ hooks rely on its order
    (their before runs ahead of its GPU-timing events, which it skips for a call they
    time); the pure-Python wrapper keeps the Python hooks."""
    from .. import hotstate

    return native.entry_type(hotstate.context_var()) is not None


def native_hooks(module: Any, recorder: StatsRecorder, before: Any, after: Any
                 ) -> tuple[Any, Any] | None:
    """The extension's C++ (before, after) over ``recorder``, falling back to the Python
    ``before``/``after``; None when the extension has none (reported if it failed)."""
    make = getattr(module, "make_span_hooks", None)
    if make is None:
        return None
    try:
        return make({
            "rings": recorder._rings, "before": before, "after": after,
            "pending": StatsPending, "open": _Open, "module": module,
            "scope_full": SCOPE_FULL, "scope_sampled": SCOPE_SAMPLED,
            "scope_pages": SCOPE_PAGES, "max_bytes": float(recorder.max_bytes),
            "max_rows": int(recorder.rows), "gpu_time": bool(recorder.gpu_time)})
    except Exception as exc:  # noqa: BLE001 - the Python hooks go on
        health.report("stats_errors", "the C++ statistics hooks did not start; the "
                      "Python hooks go on", exc)
        return None


def python_hooks(recorder: StatsRecorder) -> tuple[Any, Any]:
    """(before, after) in Python: every case, and the reference for the C++ pair."""
    is_open = recorder.is_open
    begin, finish = recorder.begin, recorder.finish

    def attach(record: CallRecord, outcome: Any) -> None:
        if outcome is None:
            return
        if type(outcome) is tuple:  # inputs and outputs that could not share a slot
            for part in outcome:
                attach(record, part)
            return
        snapshot = getattr(outcome, "snapshot", None)
        if snapshot is not None:  # captured: resolved per replay
            capture = graphs.capture_state()
            if capture is not None:
                rows = outcome.graph_rows
                if rows is not None:  # read back with the rest of the graph
                    rows.bind(record, outcome)
                else:
                    capture.add_replay_hook(record, lambda stream, child: snapshot(stream),
                                            needs_child=False)
            return
        record.add_pending(outcome)

    def before(record: CallRecord, plan: Any, args: tuple, kwargs: dict) -> Any:
        outcome = begin(input_entries(plan, args, kwargs), record.name)
        if is_open(outcome):
            return outcome  # finished with the outputs in ``after``
        attach(record, outcome)
        return None

    def after(record: CallRecord, state: Any, result: Any, error: Any) -> None:
        if error is None:
            attach(record, finish(state, output_entries(result)))
        elif state is not None:  # the inputs' statistics still go on the span
            attach(record, finish(state, ()))

    return before, after
