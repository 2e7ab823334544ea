"""The C++ level-5 hooks (csrc/stats_hooks.cpp) against the Python ones they replace:
the same events and attributes for every argument shape, the fast path taken where it
should be, the Python path where it must be, and no host sync."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from otel_flashinfer import native, spans
from otel_flashinfer.pipeline import CallRecord
from otel_flashinfer.stats import hooks, kernel
from otel_flashinfer.stats.pending import StatsPending
from otel_flashinfer.stats.recorder import StatsRecorder

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


class Wrapper:
    """A decode wrapper's shape: planned page indices on the instance."""

    def __init__(self, indices: torch.Tensor, indptr: torch.Tensor, batch: Any) -> None:
        self._paged_kv_indices_buf = indices
        self._paged_kv_indptr_buf = indptr
        self._batch_size = batch

    def run(self, q, paged_kv_cache, *rest, out=None, scale=1.0):  # noqa: ANN001
        return q


def plain(a, b, *more, flag=True, extra=None):  # noqa: ANN001
    return a


class Counted:
    """The Python hook, counting the calls the C++ hook hands back to it."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


@pytest.fixture(scope="module")
def ext():
    module = kernel.get(wait=True, timeout=600)
    assert module is not None, "statistics kernel failed to build"
    assert hasattr(module, "make_span_hooks")
    return module


def _recorder(ext, max_mb: float = 64.0) -> StatsRecorder:
    rec = StatsRecorder(stats_max_mb=max_mb)
    ring = rec._ring(torch.device("cuda", torch.cuda.current_device()))
    ring.device_base(ext)
    assert ring.wait_ready(60)
    return rec


def _pairs(ext, rec):
    before, after = hooks.python_hooks(rec)
    cb, ca = Counted(before), Counted(after)
    nb, na = hooks.native_hooks(ext, rec, cb, ca)
    return (before, after), (nb, na), (cb, ca)


def _call(pair, plan, args, kwargs, result, error=None) -> CallRecord:
    record = CallRecord.for_call("x", 1, 2, None, {})
    record.own()
    state = pair[0](record, plan, args, kwargs)
    pair[1](record, state, result, error)
    return record


def _resolved(record: CallRecord) -> tuple[list, dict]:
    torch.cuda.synchronize()
    for pending in record.pending:
        assert pending.ready()
        pending.apply(record)
    events = [(name, _norm(attrs)) for name, attrs, _ in record.events]
    return events, dict(record.attributes)


def _norm(attrs: dict) -> dict:
    return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
            for k, v in attrs.items()}


def _same(ext, plan, args, kwargs, result, error=None, max_mb=64.0, fast=True):
    rec = _recorder(ext, max_mb)
    py, nat, (cb, ca) = _pairs(ext, rec)
    want = _resolved(_call(py, plan, args, kwargs, result, error))
    record = _call(nat, plan, args, kwargs, result, error)
    if fast:
        assert (cb.calls, ca.calls) == (0, 0), "the C++ hooks handed the call back"
        assert len(record.pending) == 1 and type(record.pending[0]) is StatsPending
    got = _resolved(record)
    assert got == want
    ring = next(iter(rec._rings.values()))
    assert len(ring._free) == ring.host.shape[0], "a slot was not given back"
    return got


def _cuda(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    return torch.randint(0, 100, shape, device="cuda", generator=gen).to(dtype)


def test_paged_decode_shape_matches_python(ext):
    cache = _cuda(64, 2, 16, 8, 128, dtype=torch.float16)
    cache[40, 0, 3, 1, 7] = float("nan")  # referenced page
    cache[63, 1, 0, 0, 0] = float("inf")  # not referenced
    indices = torch.arange(0, 48, dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 16, 32, 48], dtype=torch.int32, device="cuda")
    w = Wrapper(indices, indptr, 3)
    q = _cuda(3, 32, 128, dtype=torch.float16)
    plan = spans.ArgPlan(Wrapper.run, True)
    events, attrs = _same(ext, plan, (w, q, cache), {}, q.clone())
    names = [a["flashinfer.tensor"] for _, a in events]
    assert names == ["q", "paged_kv_cache", "result.0"]
    paged = events[1][1]
    assert paged["scope"] == "referenced_pages" and paged["nan_count"] == 1
    assert paged["inf_count"] == 0
    assert attrs["flashinfer.nonfinite"] is True


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_last_page_len_masks_like_python(ext, layout):
    nhd = layout == "NHD"
    cache = _cuda(64, 2, *((16, 8, 128) if nhd else (8, 16, 128)), dtype=torch.float16)
    stale = (47, 1, 9, 2, 3) if nhd else (47, 1, 2, 9, 3)  # slot 9 of a 9-token last page
    cache[stale] = float("nan")
    indices = torch.arange(0, 48, dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 16, 32, 48], dtype=torch.int32, device="cuda")
    w = Wrapper(indices, indptr, 3)
    w._paged_kv_last_page_len_buf = torch.tensor([16, 3, 9], dtype=torch.int32, device="cuda")
    w._kv_layout = layout
    q = _cuda(3, 32, 128, dtype=torch.float16)
    plan = spans.ArgPlan(Wrapper.run, True)
    events, attrs = _same(ext, plan, (w, q, cache), {}, q.clone())
    paged = events[1][1]
    assert paged["nan_count"] == 0
    assert paged["numel"] == (46 * 16 + 3 + 9) * 2 * 8 * 128  # 48 pages, 2 partly filled
    assert "flashinfer.nonfinite" not in attrs


def test_batch_from_indptr_and_kv_pair(ext):
    k, v = _cuda(8, 16, 4, 64, dtype=torch.bfloat16), _cuda(8, 16, 4, 64, dtype=torch.bfloat16)
    indices = torch.tensor([1, 3, 5], dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 2, 3], dtype=torch.int32, device="cuda")
    w = Wrapper(indices, indptr, None)  # batch from indptr
    q = _cuda(2, 8, 64, dtype=torch.bfloat16)
    plan = spans.ArgPlan(Wrapper.run, True)
    events, _ = _same(ext, plan, (w, q), {"paged_kv_cache": (k, v)}, (q, None, q[0]))
    assert [a["flashinfer.tensor"] for _, a in events] == [
        "q", "paged_kv_cache", "result.0", "result.2"]
    assert events[1][1]["numel"] == 3 * 16 * 4 * 64 * 2


def test_every_argument_shape_matches_python(ext):
    a = _cuda(33, 7)
    a[0, 0] = float("nan")
    a[1, 1] = float("-inf")
    b = _cuda(16, 16, dtype=torch.float16).t()  # strided
    ints = _cuda(100, dtype=torch.int32)
    flags = torch.zeros(5, dtype=torch.bool, device="cuda")
    empty = torch.empty(0, 3, device="cuda")
    fp8 = _cuda(64, dtype=torch.float16).to(torch.float8_e4m3fn)
    cplx = torch.zeros(4, dtype=torch.complex64, device="cuda")  # no statistic: skipped
    plan = spans.ArgPlan(plain, False)
    args = (a, [b, 3, ints], flags, empty, "text", (fp8, cplx))
    kwargs = {"extra": a[2:5], "flag": False}
    events, _ = _same(ext, plan, args, kwargs, [empty, a.sum(0)])
    names = [x["flashinfer.tensor"] for _, x in events]
    assert names == ["a", "b.0", "b.2", "more.0", "more.1", "more.3.0", "extra",
                     "result.0", "result.1"]
    assert events[0][1]["nan_count"] == 1 and events[0][1]["min"] == float("-inf")


def test_sampled_and_too_many_tensors(ext):
    big = _cuda(4096, 64)  # 1 MiB against a 0.25 MiB limit: sampled
    many = [_cuda(3, seed=i) for i in range(70)]  # past the 64 input rows
    plan = spans.ArgPlan(plain, False)
    events, attrs = _same(ext, plan, (big, *many), {}, big[0], max_mb=0.25)
    assert events[0][1]["scope"] == "sampled"
    assert attrs["flashinfer.stats.dropped"] == "too_many_tensors:7"


def test_error_and_no_result(ext):
    a = _cuda(10)
    plan = spans.ArgPlan(plain, False)
    events, _ = _same(ext, plan, (a, a), {}, None, error=RuntimeError("boom"))
    assert [x["flashinfer.tensor"] for _, x in events] == ["a", "b"]
    events, _ = _same(ext, plan, (a, a), {}, 42)
    assert len(events) == 2


def test_cpu_tensors_go_to_python(ext):
    plan = spans.ArgPlan(plain, False)
    cpu = torch.tensor([1.0, float("nan"), 3.0])
    rec = _recorder(ext)
    _, nat, (cb, ca) = _pairs(ext, rec)
    record = _call(nat, plan, (cpu, cpu), {}, cpu)
    assert cb.calls == 1 and ca.calls == 1
    events, _ = _resolved(record)
    assert [x["nan_count"] for _, x in events] == [1, 1, 1]


class _InterruptOnce(Wrapper):
    """A wrapper whose first ``_batch_size`` read is where a Ctrl-C lands (a signal's
    handler runs at the next bytecode, here inside the C++ hook's planning)."""

    pending: list[type[BaseException]] = []

    def __init__(self, indices: torch.Tensor, indptr: torch.Tensor, batch: int) -> None:
        self._paged_kv_indices_buf = indices
        self._paged_kv_indptr_buf = indptr
        self._batch = batch

    @property
    def _batch_size(self) -> int:
        if _InterruptOnce.pending:
            raise _InterruptOnce.pending.pop()()
        return self._batch


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_the_hooks_still_reaches_the_program(ext, fatal):
    """The C++ hooks clear what fails while they plan a call and hand it to the Python
    path; an exception that is not an ``Exception`` is the program's, so it is raised
    again at the interpreter's next check (py_defer.h), not cleared with ours."""
    cache = _cuda(64, 2, 16, 8, 128, dtype=torch.float16)
    indices = torch.arange(0, 48, dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 16, 32, 48], dtype=torch.int32, device="cuda")
    w = _InterruptOnce(indices, indptr, 3)
    q = _cuda(3, 32, 128, dtype=torch.float16)
    plan = spans.ArgPlan(Wrapper.run, True)
    rec = _recorder(ext)
    _, nat, (cb, _) = _pairs(ext, rec)
    _InterruptOnce.pending[:] = [fatal]
    with pytest.raises(fatal):
        _call(nat, plan, (w, q, cache), {}, q.clone())
        sum(range(100))  # the interpreter's next check is at the latest in here
    assert not _InterruptOnce.pending
    _InterruptOnce.pending[:] = [ValueError]  # ours: cleared, the Python path decides
    calls = cb.calls
    record = _call(nat, plan, (w, q, cache), {}, q.clone())
    assert sum(range(100)) == 4950 and not _InterruptOnce.pending
    assert cb.calls == calls + 1
    events, _ = _resolved(record)
    assert [a["flashinfer.tensor"] for _, a in events] == ["q", "paged_kv_cache", "result.0"]


def test_outputs_on_another_stream(ext):
    a = _cuda(1000)
    plan = spans.ArgPlan(plain, False)
    rec = _recorder(ext)
    _, nat, (cb, ca) = _pairs(ext, rec)
    side = torch.cuda.Stream()
    record = CallRecord.for_call("x", 1, 2, None, {})
    record.own()
    state = nat[0](record, plan, (a, a), {})
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = a * 2
        nat[1](record, state, out, None)
    assert (cb.calls, ca.calls) == (0, 0)
    events, _ = _resolved(record)
    assert events[2][1]["max"] == pytest.approx(2 * a.max().item())


def test_no_host_sync(ext):
    a = _cuda(1 << 20)
    plan = spans.ArgPlan(plain, False)
    rec = _recorder(ext)
    _, nat, (cb, ca) = _pairs(ext, rec)
    records = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(50):
            records.append(_call(nat, plan, (a, a), {}, a))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (cb.calls, ca.calls) == (0, 0)
    for record in records:
        events, _ = _resolved(record)
        assert len(events) == 3


def test_switch_goes_native_when_built(ext, monkeypatch):
    if native.switch_type() is None:
        pytest.skip("the C hot path is not built")
    before, after = hooks.make_hooks(StatsRecorder())
    assert type(before.target).__name__ == "builtin_function_or_method"
    assert type(after.target).__name__ == "builtin_function_or_method"
    monkeypatch.setattr(hooks, "use_native", False)
    b, _ = hooks.make_hooks(StatsRecorder())
    assert not hasattr(b, "target")


def test_metas_reused_while_the_call_site_repeats(ext):
    rec = _recorder(ext)
    _, nat, (cb, ca) = _pairs(ext, rec)
    plan = spans.ArgPlan(plain, False)
    a, b = _cuda(10), _cuda(20)
    r1 = _call(nat, plan, (a, b), {}, a)
    r2 = _call(nat, plan, (a, b), {}, a)
    assert r1.pending[0].metas is r2.pending[0].metas  # nothing new for the collector
    assert r1.pending[0].out_metas is r2.pending[0].out_metas
    r3 = _call(nat, plan, (b, a), {}, b)  # other sizes: new metas with the right numels
    assert [m[2] for m in r3.pending[0].metas] == [20, 10]
    assert [m[2] for m in r3.pending[0].out_metas] == [20]
    assert (cb.calls, ca.calls) == (0, 0)
    numels = [[e["numel"] for _, e in _resolved(r)[0]] for r in (r1, r2, r3)]
    assert numels == [[10, 20, 10], [10, 20, 10], [20, 10, 20]]


def test_a_state_from_elsewhere_is_refused(ext):
    rec = _recorder(ext)
    _, (_, na), _ = _pairs(ext, rec)
    with pytest.raises(ValueError, match="not a state"):
        na(CallRecord.for_call("x", 1, 2, None, {}), 5, None, None)


def test_stamps_time_the_call_instead_of_events(ext):
    from gpu_decode import busy_gpu

    rec = _recorder(ext)
    rec.gpu_time = True
    _, (nb, na), (cb, ca) = _pairs(ext, rec)
    x = _cuda(2048, 2048)
    x @ x  # cuBLAS set up
    plan = spans.ArgPlan(plain, False)
    calls = []
    for error in (None, None, None, RuntimeError("after the kernel"), None):
        record = CallRecord.for_call("x", 1, 2, None, {})
        record.own()
        busy_gpu(1.0)  # a queue: the stamps then hold GPU work only
        state = nb(record, plan, (x, x), {})
        assert record.gpu is False  # the hot path records no events for it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = x @ x
        end.record()
        na(record, state, None if error else y, error)
        assert record.gpu is None
        calls.append((record, start, end))
    assert (cb.calls, ca.calls) == (0, 0)
    for record, start, end in calls:
        _, attrs = _resolved(record)
        ours, hand = attrs["flashinfer.gpu.time_ns"], start.elapsed_time(end) * 1e6
        assert abs(ours - hand) <= max(0.05 * hand, 5000), (ours, hand)


def test_no_stamps_without_gpu_timing(ext):
    rec = _recorder(ext)
    _, (nb, na), _ = _pairs(ext, rec)
    a = _cuda(100)
    record = CallRecord.for_call("x", 1, 2, None, {})
    record.own()
    na(record, nb(record, spans.ArgPlan(plain, False), (a, a), {}), a, None)
    assert record.gpu is None
    _, attrs = _resolved(record)
    assert "flashinfer.gpu.time_ns" not in attrs
