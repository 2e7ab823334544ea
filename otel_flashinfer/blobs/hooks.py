"""Level 10 in the span wrapper: a (before, after) hook pair around each call.

Eager calls: ``before`` hands the call's bound arguments to the BlobRecorder
(inputs staged in stream order, no host sync); ``after`` stages outputs and
leaves a Pending on the span, which gets ``flashinfer.blob.manifest`` or
``flashinfer.blob.skipped``.

Calls captured into a CUDA graph (``graphs.capture_state()`` set): the copies are
captured into the graph instead (``blobs.graph``), and each sampled replay's child
span gets its own manifest through ``Capture.add_replay_hook``.  A capture that
our graph hooks did not see (another thread, unpatched graph API) is skipped
with ``flashinfer.blob.skipped = "capturing"``: an eager copy would break it.

``OTEL_FLASHINFER_BLOB_INCLUDE/_BLOB_EXCLUDE`` (``filters.blob_selected``) leave a
call's payload out before anything is copied; its span still gets its statistics
and says ``flashinfer.blob.skipped = "filtered"``.
"""

from __future__ import annotations

import inspect
from time import time_ns
from typing import Any

import torch

from .. import graphs
from ..config import Settings
from ..filters import BlobFilter
from ..pipeline import CallRecord
from . import graph as _graph
from .capture import BlobRecorder, skipped


def _capturing_unseen() -> bool:
    """A stream capture is open that ``graphs`` does not know about."""
    try:
        return bool(torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001
        return False


def make_hooks(settings: Settings, recorder: BlobRecorder) -> tuple[Any, Any]:
    """(before, after) for ``spans.make_wrapper`` at level 10."""
    wanted = BlobFilter(getattr(settings, "blob_include", ()),
                        getattr(settings, "blob_exclude", ()))

    def before(record: CallRecord, plan: Any, args: tuple, kwargs: dict) -> Any:
        keep = wanted(record.name)
        is_plan = plan.is_plan
        if not keep and not is_plan:
            recorder.counters["skipped.filtered"] += 1
            return skipped("filtered")
        if not is_plan and recorder.store.budget.count_spent() and \
                graphs.capture_state() is None:
            # BLOB_MAX_COUNT reached (1,000 calls by default, soon in a decode loop):
            # skipped before binding and describing the arguments, which cost a call
            # 100-150 us only to be refused by the budget
            recorder.counters["skipped.max_count"] += 1
            return skipped("max_count")
        signature = plan.signature
        bound: inspect.BoundArguments | dict[str, Any]
        try:
            bound = signature.bind(*args, **kwargs) if signature is not None else \
                plan.bind(args, kwargs)
        except TypeError:
            # Arguments the API refuses: the call raises the user's own error; its span
            # records that, without a payload (not an internal error of ours).
            recorder.counters["skipped.bad_arguments"] += 1
            return skipped("bad_arguments")
        instance_id = record.instance_id()
        if is_plan:  # its runs gather pages by its count, whatever becomes of its payload
            recorder.note_plan(instance_id, bound)
        if not keep:
            recorder.counters["skipped.filtered"] += 1
            return skipped("filtered")
        if graphs.capture_state() is not None:
            return _graph.capture_inputs(recorder, record.name, plan.module, plan.qualname,
                                         instance_id, bound)
        if _capturing_unseen():
            recorder.counters["skipped.capturing"] += 1
            return skipped("capturing")
        return recorder.before(
            record.name, plan.module, plan.qualname, instance_id, record.trace_id,
            record.span_id, record.parent_span_id, time_ns(), bound,
        )

    def after(record: CallRecord, state: Any, result: Any, error: Any) -> None:
        error = error if isinstance(error, BaseException) else None
        if isinstance(state, _graph.GraphBlobCall):
            state.capture_outputs(None if error is not None else result, error)
            capture = graphs.capture_state()
            if capture is not None:
                capture.add_replay_hook(record, state.on_replay)
            return
        state.after(None if error is not None else result, error)
        record.add_pending(state.pending(record))

    return before, after
