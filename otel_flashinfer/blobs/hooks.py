"""Level 10 in the span wrapper: a (before, after) hook pair around each call.

``before`` hands the call's bound arguments to the BlobRecorder (inputs staged in
stream order, no host sync); ``after`` stages outputs and leaves a Pending on the
span, which gets ``flashinfer.blob.manifest`` or ``flashinfer.blob.skipped``.
"""

from __future__ import annotations

import inspect
from time import time_ns
from typing import Any

from ..config import Settings
from ..pipeline import CallRecord
from .capture import BlobRecorder


def make_hooks(settings: Settings, recorder: BlobRecorder) -> tuple[Any, Any]:
    """(before, after) for ``spans.make_wrapper`` at level 10."""

    def before(record: CallRecord, plan: Any, args: tuple, kwargs: dict) -> Any:
        signature = plan.signature
        bound: inspect.BoundArguments | dict[str, Any]
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
        else:
            bound = plan.bind(args, kwargs)
        return recorder.before(
            record.name, plan.module, plan.qualname,
            record.attributes.get("flashinfer.instance.id"), record.trace_id,
            record.span_id, record.parent_span_id, time_ns(), bound,
        )

    def after(record: CallRecord, capture: Any, result: Any, error: Any) -> None:
        capture.after(None if error is not None else result,
                      error if isinstance(error, BaseException) else None)
        record.pending.append(capture.pending(record))

    return before, after
