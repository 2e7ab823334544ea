"""The level-5 fast path on CPU: flat planning, argument naming without ``bind``, and
the recorder's begin/finish protocol against a fake kernel module that does what
csrc ``stats_slot`` does (accumulate into zero-at-rest rows, publish them into the
pinned slot and zero them again)."""

from __future__ import annotations

import math

import pytest
import torch

from otel_flashinfer.spans import ArgPlan
from otel_flashinfer.stats import hooks
from otel_flashinfer.stats import recorder as rec_mod
from otel_flashinfer.stats.layout import ROW_WORDS
from otel_flashinfer.stats.planning import (
    ITEM_INTS,
    PagedSpec,
    _flat_of,
    _jobs_of,
    _plan_flat,
    plan,
)
from otel_flashinfer.stats.recorder import StatsRecorder
from otel_flashinfer.stats.ring import SlotRing
from otel_flashinfer.stats.torch_ops import merge_rows, tensor_row


class _Rec:
    def __init__(self) -> None:
        self.name = "rmsnorm"  # the span's name: the hooks pass it to the recorder
        self.events: list = []
        self.attributes: dict = {}
        self.pending: list = []

    def add_pending(self, p) -> None:  # noqa: ANN001
        self.pending.append(p)

    def resolve(self) -> _Rec:
        for p in self.pending:
            assert p.ready()
            p.apply(self)
        return self


def _events(rec: _Rec) -> list[tuple]:
    def norm(v):  # noqa: ANN001, ANN202
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    return [tuple(sorted((k, norm(v)) for k, v in attrs.items())) for _, attrs, _ in rec.events]


class FakeKernel:
    """``stats_slot`` with torch ops on CPU tensors, ``device`` 0 standing for 'cuda:0'."""

    def __init__(self, ring: SlotRing) -> None:
        self.ring = ring
        self.dev: dict[int, torch.Tensor] = {}
        self.calls: list[tuple] = []
        self.capturing = False
        self.fail_when = None
        self.stream = 7

    def stats_slot(self, tensors, items, device, dev_rows, capacity, row_lo, row_hi,  # noqa: ANN001
                   pub_ptr, counter, event, prev_stream):
        self.calls.append((len(items) // ITEM_INTS, row_lo, row_hi, event, prev_stream))
        assert len(items) % ITEM_INTS == 0 and 0 <= row_lo <= row_hi <= capacity
        assert row_lo == row_hi or (pub_ptr and counter)
        if self.fail_when is not None and self.fail_when(tensors):
            raise RuntimeError("more than 8 non-mergeable dims")
        if self.capturing:
            return -1
        if any(getattr(t, "_other_device", False) for t in tensors):
            return -2
        buf = self.dev.setdefault(dev_rows, torch.zeros((capacity, ROW_WORDS),
                                                       dtype=torch.int64))
        assert not buf.any()  # zero at rest
        for job in _jobs_of(list(tensors), list(items)):
            assert row_lo <= job.row < row_hi
            buf[job.row] = merge_rows(buf[job.row], tensor_row(
                job.tensor, job.step, job.indices, job.indptr, job.batch, job.last_page_len,
                job.slot_dim))
        if row_hi > row_lo:
            slot, rest = divmod(pub_ptr - self.ring._pub_base, self.ring._slot_bytes)
            assert rest == 0 and counter == self.ring.counter(slot, 1 if row_lo else 0)
            self.ring.host[slot, row_lo:row_hi] = buf[row_lo:row_hi]
            buf[row_lo:row_hi] = 0
        return self.stream

    def event_create(self) -> int:
        return 1

    def event_query(self, event: int) -> int:
        return 0


@pytest.fixture
def fast(monkeypatch):  # noqa: ANN001, ANN201
    """A recorder whose device-0 ring is on the host and whose kernel is FakeKernel."""
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    recorder = StatsRecorder(rows_per_slot=4, slots=4)
    ring = SlotRing(torch.device("cuda", 0), 4, 8, pin_memory=False)
    ring._dev_base = 1 << 40
    ring._ctr_base = 1 << 41
    ring._pub_base = 1 << 42
    ring._native = [1] * 4
    recorder._rings[0] = ring
    kernel = FakeKernel(ring)
    monkeypatch.setattr(rec_mod._kernel, "get", lambda wait=False, timeout=None: kernel)
    return recorder, ring, kernel


class Wrapper:
    def run(self, q, paged_kv_cache, *rest, out=None, scale=1.0):  # noqa: ANN001
        pass


def _reference(entries_in, entries_out, rows=4) -> _Rec:  # noqa: ANN001
    ref = _Rec()
    recorder = StatsRecorder(rows_per_slot=rows, use_kernel=False)
    for p in (recorder.before(entries_in), recorder.after(entries_out)):
        if p is not None:
            p.apply(ref)
    return ref


def _case():
    w = Wrapper()
    w._paged_kv_indices_buf = torch.tensor([2, 5, 1, 6], dtype=torch.int32)
    w._paged_kv_indptr_buf = torch.tensor([0, 1, 3], dtype=torch.int32)
    w._batch_size = 2
    q = torch.randn(3, 4)
    q[0, 1] = float("nan")
    cache = torch.randn(8, 2, 3)
    return w, q, cache


def test_plan_flat_matches_plan_and_keeps_row_semantics():
    t = torch.arange(1000, dtype=torch.float32)
    cache = torch.zeros(8, 2, 3)
    ix, ip = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    entries = [("t", t), ("n", 3), ("c", torch.ones(2, dtype=torch.complex64)),
               PagedSpec("kv", (cache, -cache), ix, ip, 1), ("kv2", cache, ix, ip, 1),
               ("e", torch.empty(0)), ("x", torch.ones(2)), ("y", torch.ones(2))]
    jobs, metas, left = plan(entries, max_bytes=400, max_rows=5)
    assert [(m.name, m.scope, m.numel) for m in metas] == [
        ("t", "sampled", 1000), ("kv", "referenced_pages", 0), ("kv2", "referenced_pages", 0),
        ("e", "full", 0), ("x", "full", 2)]
    assert left == 1
    assert [(j.row, j.step, j.batch, j.indices is ix) for j in jobs] == [
        (0, 10, 0, False), (1, 1, 1, True), (1, 1, 1, True), (2, 1, 1, True), (3, 1, 0, False),
        (4, 1, 0, False)]
    assert jobs[2].tensor.sum() == 0 and jobs[0].tensor is t
    _, items, flat_metas, left = _plan_flat(entries, 400, 5, row0=3)
    assert [items[k + 1] for k in range(0, len(items), ITEM_INTS)] == [3, 4, 4, 5, 6, 7]
    assert [m[0] for m in flat_metas] == ["t", "kv", "kv2", "e", "x"] and left == 1
    # A last_page_len travels with each part of its cache, through both list forms.
    lpl = torch.tensor([1], dtype=torch.int32)
    masked = [PagedSpec("kv", (cache, -cache), ix, ip, 1, lpl, 3), ("kv2", cache, ix, ip, 1),
              ("kv3", cache, ix, ip, 1, lpl, 2)]
    tensors, items, _, _ = _plan_flat(masked, 400, 5)
    jobs = _jobs_of(tensors, items)
    assert [(j.last_page_len is lpl, j.slot_dim) for j in jobs] == [
        (True, 3), (True, 3), (False, 0), (True, 2)]
    again = _jobs_of(*_flat_of(jobs))
    assert [(j.row, j.last_page_len is lpl, j.slot_dim, j.indices is ix) for j in again] == [
        (j.row, j.last_page_len is lpl, j.slot_dim, j.indices is ix) for j in jobs]


def _old_input_entries(plan_, args, kwargs):  # noqa: ANN001, ANN202
    """hooks.input_entries as it was (``bind``, ``PagedSpec``), as tuples."""
    owner = args[0] if plan_.skip_self and args else None
    out = []
    for name, value in plan_.bind(args, kwargs).items():
        paged = hooks._paged(owner, name, value)
        if paged is not None:
            out.append(paged)
        elif isinstance(value, torch.Tensor):
            out.append((name, value))
        elif isinstance(value, (tuple, list)):
            out.extend((f"{name}.{i}", v) for i, v in enumerate(value[:8])
                       if isinstance(v, torch.Tensor))
    return out


def test_input_entries_names_like_bind():
    w, q, cache = _case()
    plan_ = ArgPlan(Wrapper.run, True)
    extra = torch.ones(2)
    calls = [
        ((w, q, cache), {}),
        ((w, q, (cache, -cache)), {"out": torch.empty(3)}),
        ((w, q, cache, extra, 5, [extra, 1, extra]), {"scale": 2.0}),
        ((w, q), {"paged_kv_cache": cache}),
        ((w,), {}),
    ]
    for args, kwargs in calls:
        new = hooks.input_entries(plan_, args, kwargs)
        old = _old_input_entries(plan_, args, kwargs)
        assert [(e[0], *map(id, e[1:])) for e in new] == [(e[0], *map(id, e[1:])) for e in old]
    assert [e[0] for e in hooks.input_entries(plan_, calls[2][0], calls[2][1])] == [
        "q", "paged_kv_cache", "rest.0", "rest.2.0", "rest.2.2"]
    paged = hooks.input_entries(plan_, (w, q, cache), {})[1]
    assert paged[2:] == (w._paged_kv_indices_buf, w._paged_kv_indptr_buf, 2, None, 0)
    w._paged_kv_last_page_len_buf = torch.tensor([1, 2], dtype=torch.int32)
    w._kv_layout = "HND"
    paged = hooks.input_entries(plan_, (w, q, cache), {})[1]
    assert paged[5] is w._paged_kv_last_page_len_buf and paged[6] == 2
    w._kv_layout = ["NHD"]  # not a layout: no masking rather than an error
    assert hooks.input_entries(plan_, (w, q, cache), {})[1][5:] == (None, 0)
    plain = ArgPlan(lambda a, b=None: None, False)
    assert [e[0] for e in hooks.input_entries(plain, (q,), {"b": q})] == ["a", "b"]


def test_hooks_one_pending_per_call_same_events_as_reference(fast):
    recorder, ring, kernel = fast
    w, q, cache = _case()
    plan_ = ArgPlan(Wrapper.run, True)
    before, after = hooks.make_hooks(recorder)
    out = torch.tensor([1.0, float("inf")])
    record = _Rec()
    state = before(record, plan_, (w, q, cache), {})
    assert recorder.is_open(state) and not record.pending and len(ring._free) == 3
    after(record, state, (out, out * 2), None)
    assert len(record.pending) == 1 and len(kernel.calls) == 2
    (n_in, zero_in, copy_in, ev_in, prev_in), (n_out, zero_out, copy_out, ev_out, prev_out) = \
        kernel.calls
    assert (n_in, zero_in, copy_in, ev_in, prev_in) == (2, 0, 2, 0, -1)  # rows [0, 2)
    assert (n_out, zero_out, copy_out, ev_out, prev_out) == (2, 2, 4, 1, kernel.stream)
    record.resolve()
    ref = _reference(_old_input_entries(plan_, (w, q, cache), {}),
                     [("result.0", out), ("result.1", out * 2)])
    assert _events(record) == _events(ref) and len(record.events) == 4
    assert record.attributes["flashinfer.nonfinite"] is True
    assert len(ring._free) == 4  # slot back


def test_error_in_call_still_reports_inputs(fast):
    recorder, _, kernel = fast
    w, q, cache = _case()
    before, after = hooks.make_hooks(recorder)
    record = _Rec()
    state = before(record, ArgPlan(Wrapper.run, True), (w, q, cache), {})
    after(record, state, None, RuntimeError("boom"))
    assert kernel.calls[-1][:4] == (0, 2, 2, 1)  # no outputs: the event alone
    assert [a["flashinfer.tensor"] for _, a, _ in record.resolve().events] == [
        "q", "paged_kv_cache"]


def test_row_limits_and_notes_per_side(fast):
    recorder, _, _ = fast
    ins = [(f"i{k}", torch.full((2,), float(k))) for k in range(6)]
    outs = [(f"o{k}", torch.full((2,), -float(k))) for k in range(5)]
    state = recorder.begin(ins)
    record = _Rec()
    record.add_pending(recorder.finish(state, outs))
    record.resolve()
    names = [a["flashinfer.tensor"] for _, a, _ in record.events]
    assert names == ["i0", "i1", "i2", "i3", "o0", "o1", "o2", "o3"]
    assert record.attributes["flashinfer.stats.dropped"] == "too_many_tensors:1"  # outputs'
    assert [a["mean"] for _, a, _ in record.events] == [0.0, 1.0, 2.0, 3.0, 0.0, -1.0, -2.0,
                                                        -3.0]


def test_capture_and_foreign_tensors_take_the_general_path(fast):
    recorder, ring, kernel = fast
    x = torch.ones(3)
    kernel.capturing = True  # general path: CPU tensors here, so computed right away
    p = recorder.begin([("x", x)])
    assert not recorder.is_open(p) and len(ring._free) == 4
    rec = _Rec()
    p.apply(rec)
    assert rec.events[0][1]["mean"] == 1.0
    kernel.capturing = False
    state = recorder.begin([("x", x)])
    y = torch.full((2,), 2.0)
    y._other_device = True  # the kernel says: not for me -> inputs alone + general outputs
    outcome = recorder.finish(state, [("y", y)])
    assert isinstance(outcome, tuple) and len(ring._free) == 3
    rec = _Rec()
    for part in outcome:
        assert part.ready()
        part.apply(rec)
    assert [(a["flashinfer.tensor"], a["mean"]) for _, a, _ in rec.events] == [
        ("x", 1.0), ("y", 2.0)]
    assert len(ring._free) == 4


def test_kernel_error_on_outputs_keeps_inputs(fast):
    recorder, ring, kernel = fast
    state = recorder.begin([("x", torch.ones(3))])
    bad = torch.ones(2)
    kernel.fail_when = lambda tensors: any(t is bad for t in tensors)
    outcome = recorder.finish(state, [("bad", bad)])
    rec = _Rec()
    for part in outcome:
        part.apply(rec)
    assert [a["flashinfer.tensor"] for _, a, _ in rec.events] == ["x"]
    assert rec.attributes["flashinfer.stats.dropped"] == "error"
    assert len(ring._free) == 4


def test_ring_full_and_standalone_record(fast):
    recorder, ring, kernel = fast
    held = [recorder.begin([("x", torch.ones(1))]) for _ in range(4)]
    assert all(recorder.is_open(h) for h in held) and not ring._free
    # no slot: the general path decides (CPU tensors here: computed on the host)
    p = recorder.record([("x", torch.ones(1))])
    assert p.ready() and not recorder.is_open(p)
    for h in held:
        recorder.finish(h, []).apply(_Rec())
    p = recorder.record([("z", torch.zeros(2))])
    assert kernel.calls[-1][1:4] == (0, 1, 1)  # publish rows [0, 1) and event in one call
    rec = _Rec()
    p.apply(rec)
    assert rec.events[0][1]["max"] == 0.0 and len(ring._free) == 4
    abandoned = recorder.record([("z", torch.zeros(2))])
    abandoned.abandon(rec, "timeout")
    assert len(ring._free) == 4 and rec.attributes["flashinfer.stats.dropped"] == "timeout"


def test_ring_makes_every_slot_event_before_the_fast_path(monkeypatch):  # noqa: ANN001
    """cudaEventCreate costs tens of microseconds: the background set-up makes each
    slot's event, so no traced call creates one; an event a caller made before is
    kept."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    class Module:
        def __init__(self) -> None:
            self.created, self.destroyed = 0, []

        def host_device_ptr(self, ptr: int) -> int:
            return ptr

        def event_create(self) -> int:
            self.created += 1
            return 100 + self.created

        def event_destroy(self, event: int) -> None:
            self.destroyed.append(event)

    ring = SlotRing(torch.device("cpu"), 3, 2, pin_memory=False)
    module = Module()
    assert ring.native_event(1, module) == 101  # a caller's event before the set-up
    assert ring.device_base(module) == 0  # starts the background set-up
    assert ring.wait_ready(10)
    assert ring._native == [102, 101, 103]
    assert module.destroyed == []
    created = module.created
    assert [ring.native_event(s, module) for s in range(3)] == [102, 101, 103]
    assert module.created == created


def test_ring_wakes_the_resolver_once_per_half_taken() -> None:
    """The worker polls on a timer; a busy engine filled the ring between two polls and
    lost statistics, so taking half the slots wakes it (once per crossing)."""
    wakes = []
    ring = SlotRing(torch.device("cpu"), 8, 2, pin_memory=False, on_low=lambda: wakes.append(1))
    taken = [ring.acquire() for _ in range(3)]
    assert wakes == []
    taken.append(ring.acquire())  # 4 of 8 taken
    assert wakes == [1]
    taken += [ring.acquire() for _ in range(4)]
    assert ring.acquire() is None and wakes == [1]
    for slot in taken[:5]:
        ring.release(slot)
    ring.acquire()  # 5 free -> 4 free: crossing again
    assert wakes == [1, 1]


def test_a_failing_wake_up_never_loses_the_slot() -> None:
    from otel_flashinfer import health

    health.reset()

    def broken() -> None:
        raise RuntimeError("wake-up failed")

    ring = SlotRing(torch.device("cpu"), 2, 2, pin_memory=False, on_low=broken)
    assert ring.acquire() == 0  # 1 of 2 free: the wake-up runs and fails
    assert health.counters().get("stats_errors") == 1
    assert ring.acquire() == 1 and ring.acquire() is None


def test_runtime_wires_the_ring_to_the_pipeline() -> None:
    from otel_flashinfer.config import load_settings
    from otel_flashinfer.runtime import Runtime

    rt = Runtime(load_settings(level=5, journal_dir=""))
    try:
        assert rt.stats.on_low == rt.pipeline.wake
    finally:
        rt.stop(1)
