"""Level 10 inside CUDA graphs: one snapshot per sampled replay.

Host code does not run when a captured graph replays, so the eager recorder (a
pinned copy and an event per call) cannot see replay-time contents.  Instead,
while the graph is captured, device-to-device copies of each call's input
tensors (before the call) and outputs (after it) are captured *into the graph*,
into device buffers allocated once, during capture, from the graph's pool.
Every replay refills them at the call's own position in the stream, so they
hold the contents as they were at that call inside the replay, not at its end.

After each sampled replay (``graphs.emit_replay``), ``GraphBlobCall.on_replay``
stages those buffers to pinned host memory on the replay's stream (async copy
plus one event; no host sync) and hands a per-replay manifest, named by the
replay child span's ids, to the recorder's writer thread.  A full staging pool,
a full writer queue or an exhausted budget skips that replay's snapshot
(``flashinfer.blob.skipped``); memory stays bounded: the device buffers are per
captured call, allocated once, and host memory comes from the bounded pool.

Paged KV caches are gathered on the device through the wrapper's planned index
buffer (``index_select`` captured in the graph), over the first ``n`` entries,
``n`` being the index count planned before capture.  ``crash_safe`` does not
apply here (nothing can be written synchronously while a graph replays).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .. import health
from . import encode, layout, manifest
from .capture import (
    PAGED_ARG_NAMES,
    BlobRecorder,
    CallCapture,
    _arguments,
    _Held,
    _paged_plan,
    skipped,
)


class _Slot:
    """One tensor's capture-time destination: a device buffer the graph refills
    (flat span, or ``[n, *page]`` pages plus their ids), or a CPU clone."""

    __slots__ = ("dev", "ids")

    def __init__(self, dev: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        self.dev = dev
        self.ids = ids

    @property
    def nbytes(self) -> int:
        n = self.dev.numel() * self.dev.element_size()
        return n + (0 if self.ids is None else self.ids.numel() * self.ids.element_size())


def _capture_copy(src: torch.Tensor, paged: tuple | None) -> _Slot:
    """Capture the copy of ``src`` into a new buffer (a graph node under capture)."""
    if src.device.type != "cuda":
        # Not part of the graph: its contents at capture time are what replays see.
        if paged is not None:
            idx = paged[0][: paged[1]].to(dtype=torch.long).clamp(0, max(src.shape[0] - 1, 0))
            return _Slot(src.index_select(0, idx.to(src.device)), idx.cpu().clone())
        return _Slot(encode.flat_span(src).clone())
    if paged is not None:
        buf, n = paged
        idx = buf[:n].to(device=src.device, dtype=torch.long)
        idx = idx.clamp(0, max(src.shape[0] - 1, 0))
        return _Slot(src.index_select(0, idx), idx)  # both fresh graph-pool tensors
    flat = encode.flat_span(src)
    dev = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)
    dev.copy_(flat)
    return _Slot(dev)


def _entries(value: Any) -> list[dict]:
    """Tensor and paged-KV entries of a manifest value, in a fixed order."""
    out: list[dict] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            tag = v.get("t")
            if tag in ("tensor", "paged_kv"):
                out.append(v)
            elif tag in ("tuple", "list"):
                for item in v["items"]:
                    walk(item)
            elif tag == "dict":
                for _, item in v["items"]:
                    walk(item)

    walk(value)
    return out


class GraphBlobCall:
    """The graph-side capture of one captured call (see the module docstring)."""

    def __init__(self, recorder: BlobRecorder, template: dict) -> None:
        self.recorder = recorder
        self.template = template  # manifest without ids, times, hashes
        self.slots: list[_Slot] = []
        self.result_slots: list[_Slot] = []
        self.skipped: str | None = None

    # -- capture time (caller's thread, stream capturing) -------------------------------
    def _collector(self, slots: list[_Slot], paged: tuple | None):
        fmt = self.recorder.format

        def ref(tensor: torch.Tensor) -> dict:
            if paged is not None and tensor.dim() >= 2:
                entry = manifest.PagedEntry(
                    t="paged_kv", dtype=encode.dtype_name(tensor.dtype),
                    shape=list(tensor.shape), device=str(tensor.device), format=fmt)
                slots.append(_capture_copy(tensor, paged))
            else:
                entry = {"t": "tensor", "dtype": encode.dtype_name(tensor.dtype),
                         "shape": list(tensor.shape), "stride": list(tensor.stride()),
                         "storage_offset": 0, "source_storage_offset": tensor.storage_offset(),
                         "device": str(tensor.device), "format": fmt}
                slots.append(_capture_copy(tensor, None))
            return entry

        return ref

    def capture_inputs(self, bound: Any, instance_id: str | None) -> None:
        args, obj = _arguments(bound)
        paged = _paged_plan(obj, instance_id, self.recorder._plan_numel)
        entries = []
        for name, kind, value in args:
            ref = self._collector(self.slots, paged if name in PAGED_ARG_NAMES else None)
            entries.append({"name": name, "kind": kind,
                            "value": manifest.plain_value(value, ref)})
        self.template["args"] = entries

    def capture_outputs(self, result: Any, error: BaseException | None) -> None:
        if self.skipped is not None:
            return
        if error is not None:
            self.template["status"] = "error"
            self.template["error"] = {"type": type(error).__qualname__,
                                      "message": str(error)[:2000]}
            return
        self.template["result"] = manifest.plain_value(
            result, self._collector(self.result_slots, None))
        limit = self.recorder.staging.max_bytes
        if sum(s.nbytes for s in (*self.slots, *self.result_slots)) > limit:
            self.skipped = "staging_full"  # could never be staged: keep no buffers
            self.slots, self.result_slots = [], []

    # -- after each sampled replay (caller's thread, no host sync) -----------------------
    def on_replay(self, stream: Any, child: Any) -> Any:
        """Stage this replay's buffers on ``stream``; the child span's Pending."""
        rec = self.recorder
        try:
            return self._on_replay(stream, child)
        except Exception as exc:  # noqa: BLE001 - never break the observed program
            health.report("blob_errors", "graph blob snapshot failed", exc)
            rec.counters["skipped.error"] += 1
            return skipped("error")

    def _skip(self, reason: str) -> Any:
        self.recorder.counters[f"skipped.{reason}"] += 1
        return skipped(reason)

    def _on_replay(self, stream: Any, child: Any) -> Any:
        rec = self.recorder
        if self.skipped is not None:
            return self._skip(self.skipped)
        if os.getpid() != rec._pid:
            rec._init_process_state()
        if len(rec._queue) >= rec.queue_max:
            return self._skip("queue_full")
        meta = copy.deepcopy(self.template)
        parent = child.parent_span_id
        meta.update(
            trace_id=layout.trace_hex(child.trace_id), span_id=layout.span_hex(child.span_id),
            parent_span_id=None if parent is None else layout.span_hex(parent),
            start_ns=int(child.start_ns), seq=next(rec._seq), pid=os.getpid(),
            process=rec.process,
            cuda_graph_replay=child.attributes.get("flashinfer.cuda_graph.replay"),
        )
        slots = [*self.slots, *self.result_slots]
        targets = [e for arg in meta["args"] for e in _entries(arg["value"])]
        targets += _entries(meta["result"])
        if len(targets) != len(slots):  # cannot happen: same walk order as capture
            raise RuntimeError("graph blob entries and buffers disagree")
        nbytes = sum(s.dev.numel() * s.dev.element_size() for s in slots)
        reason = rec.store.budget.reserve(1, nbytes)
        if reason is not None:
            return self._skip(reason)
        cap = CallCapture(rec, meta)
        cap.reserved_bytes = nbytes
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            # Every pinned buffer first, copies after: a replay that does not fit
            # issues no copy, so nothing can land in a buffer given back to the pool.
            for slot, entry in zip(slots, targets, strict=True):
                held = _Held(entry)
                cap.held.append(held)
                if slot.dev.device.type != "cuda":
                    held.host, held.ids = slot.dev, slot.ids  # captured once, read-only
                    continue
                held.host = self._pinned(held, slot.dev, copies)
                if slot.ids is not None:
                    held.ids = self._pinned(held, slot.ids, copies)
                if held.host is None or (slot.ids is not None and held.ids is None):
                    rec._drop(cap, "staging_full")
                    return cap.pending(child)
            if copies:
                event = torch.cuda.Event()
                with torch.cuda.stream(stream):
                    for dst, src in copies:
                        dst.copy_(src, non_blocking=True)
                    event.record()
                for held in cap.held:
                    if held.pinned:
                        held.event = event
        except BaseException:
            rec._drop(cap, "error")
            raise
        rec._enqueue(cap)
        return cap.pending(child)

    def _pinned(self, held: _Held, dev: torch.Tensor,
                copies: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """A pinned host view shaped like ``dev`` (its copy queued in ``copies``)."""
        nbytes = dev.numel() * dev.element_size()
        buf = self.recorder.staging.acquire_pinned(nbytes)
        if buf is None:
            return None
        held.pinned.append(buf)
        if not nbytes:
            return torch.empty(dev.shape, dtype=dev.dtype)
        view = buf[:nbytes].view(dev.dtype).view(dev.shape)
        copies.append((view, dev))
        return view


def capture_inputs(recorder: BlobRecorder, api: str, module: str, qualname: str,
                   instance_id: str | None, bound: Any) -> GraphBlobCall:
    """Capture the input copies of a call being captured into a CUDA graph."""
    template = {
        "schema": manifest.SCHEMA, "api": api, "module": module, "qualname": qualname,
        "pid": os.getpid(), "instance_id": instance_id, "status": "ok", "error": None,
        "format": recorder.format, "result": None, "skipped": None,
    }
    call = GraphBlobCall(recorder, template)
    try:
        call.capture_inputs(bound, instance_id)
    except Exception as exc:  # noqa: BLE001
        health.report("blob_errors", "could not capture graph blob copies", exc)
        call.skipped = "error"
        call.slots = []
    return call
