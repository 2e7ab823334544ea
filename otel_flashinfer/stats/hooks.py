"""Level 5 in the span wrapper: statistics of inputs before the call and of outputs
after it, on the caller's stream.

Eagerly, each side leaves a Pending on the span; under CUDA graph capture the
statistics launch is captured with the call and each sampled replay snapshots its
own results (``graphs.Capture.add_replay_hook``).  A decode/prefill wrapper's paged
KV cache is measured over the pages its planned indices reference.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import graphs
from ..pipeline import CallRecord
from .recorder import PagedSpec, StatsRecorder

_PAGED_NAMES = ("paged_kv_cache", "kv_cache")


def _paged(owner: Any, name: str, value: Any) -> PagedSpec | None:
    """The wrapper's planned page indices for its KV-cache argument, if it has them."""
    if name not in _PAGED_NAMES or owner is None:
        return None
    indices = getattr(owner, "_paged_kv_indices_buf", None)
    indptr = getattr(owner, "_paged_kv_indptr_buf", None)
    if not isinstance(indices, torch.Tensor) or not isinstance(indptr, torch.Tensor):
        return None
    batch = getattr(owner, "_batch_size", None) or indptr.numel() - 1
    return PagedSpec(name, value, indices, indptr, int(batch))


def input_entries(plan: Any, args: tuple, kwargs: dict) -> list[Any]:
    owner = args[0] if plan.skip_self and args else None
    entries: list[Any] = []
    for name, value in plan.bind(args, kwargs).items():
        paged = _paged(owner, name, value)
        if paged is not None:
            entries.append(paged)
        elif isinstance(value, torch.Tensor):
            entries.append((name, value))
        elif isinstance(value, (tuple, list)):
            entries.extend((f"{name}.{i}", v) for i, v in enumerate(value[:8])
                           if isinstance(v, torch.Tensor))
    return entries


def output_entries(result: Any) -> list[Any]:
    if isinstance(result, torch.Tensor):
        return [("result.0", result)]
    if isinstance(result, (tuple, list)):
        return [(f"result.{i}", v) for i, v in enumerate(result[:8])
                if isinstance(v, torch.Tensor)]
    return []


def make_hooks(recorder: StatsRecorder) -> tuple[Any, Any]:
    """(before, after) for ``spans.make_wrapper`` at level 5 and up."""

    def attach(record: CallRecord, outcome: Any) -> None:
        if outcome is None:
            return
        snapshot = getattr(outcome, "snapshot", None)
        if snapshot is not None:  # captured: resolved per replay
            capture = graphs.capture_state()
            if capture is not None:
                capture.add_replay_hook(record, lambda stream, child: snapshot(stream))
            return
        record.pending.append(outcome)

    def before(record: CallRecord, plan: Any, args: tuple, kwargs: dict) -> Any:
        attach(record, recorder.before(input_entries(plan, args, kwargs)))
        return None

    def after(record: CallRecord, state: Any, result: Any, error: Any) -> None:
        if error is None:
            attach(record, recorder.after(output_entries(result)))

    return before, after
