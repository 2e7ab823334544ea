"""The statistics kernel on a real GPU: equal to torch on every dtype and layout,
numel past 2^31, referenced-pages mode, CUDA graph replays, and no host sync."""

from __future__ import annotations

import math
import time

import pytest
import torch

from otel_flashinfer.stats import kernel
from otel_flashinfer.stats.decode import RowMeta, decode_row
from otel_flashinfer.stats.layout import ROW_WORDS
from otel_flashinfer.stats.recorder import GraphStatsSlot, PagedSpec, StatsRecorder
from otel_flashinfer.stats.torch_ops import tensor_row

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
          torch.float8_e5m2]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool]


class _Rec:
    def __init__(self) -> None:
        self.events: list = []
        self.attributes: dict = {}


@pytest.fixture(scope="module")
def ext():
    module = kernel.get(wait=True, timeout=600)
    assert module is not None, "statistics kernel failed to build"
    return module


def _kernel_row(ext, t, step=1, indices=None, indptr=None, batch=0, lpl=None, slot_dim=0):
    out = torch.full((1, ROW_WORDS), 12345, dtype=torch.int64, device="cuda")
    if lpl is None:
        ext.stats_into(out, [t], [0], [step], [indices], [indptr], [batch], True)
    else:
        ext.stats_into(out, [t], [0], [step], [indices], [indptr], [batch], True, [lpl],
                       [slot_dim])
    return out[0].tolist()


def _ref_row(t, step=1, indices=None, indptr=None, batch=0, lpl=None, slot_dim=0):
    cpu = t.cpu()
    idx = indices.cpu() if indices is not None else None
    ptr = indptr.cpu() if indptr is not None else None
    lp = lpl.cpu() if lpl is not None else None
    return tensor_row(cpu, step, idx, ptr, batch, lp, slot_dim).tolist()


def _same(a, b, name=""):
    meta = RowMeta(name, "full", 0)
    da, db = decode_row(a, meta), decode_row(b, meta)
    for key in ("nan_count", "inf_count"):
        assert da[key] == db[key], (name, key, da, db)
    assert a[6] == b[6], (name, "seen", a[6], b[6])
    for key in ("min", "max"):
        if key in db:
            va, vb = da[key], db[key]
            assert (math.isnan(va) and math.isnan(vb)) or va == vb, (name, key, da, db)
    if "mean" in db:
        va, vb = da["mean"], db["mean"]
        assert (math.isnan(va) and math.isnan(vb)) or math.isclose(
            va, vb, rel_tol=1e-5, abs_tol=1e-6), (name, da, db)


def _values(dtype, shape, gen):
    if dtype in FLOATS:
        x = torch.randn(shape, generator=gen) * 3
        flat = x.view(-1)
        if flat.numel() > 10:
            flat[3] = float("nan")
            flat[7] = float("inf")
            flat[-2] = float("-inf")
        return x.to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    lo, hi = (0, 255) if dtype == torch.uint8 else (-120, 120)
    if dtype == torch.int64:
        lo, hi = -(2**40), 2**40
    return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def _layouts(base):
    """(name, view) pairs over one CUDA tensor: the layouts FlashInfer passes."""
    yield "contiguous", base
    yield "transposed", base.transpose(0, 1)
    yield "offset_slice", base[1:, 3:]
    yield "step_slice", base[::2, ::3]
    yield "expanded", base[:1].expand(5, *base.shape[1:])
    yield "misaligned", base.view(-1)[1:]
    yield "scalar", base.view(-1)[5]
    yield "empty", base[:0]


@pytest.mark.parametrize("dtype", FLOATS + INTS + [torch.float64])
def test_kernel_equals_torch_every_dtype_and_layout(ext, dtype):
    gen = torch.Generator().manual_seed(0)
    base = _values(dtype, (37, 129), gen).cuda()
    for name, view in _layouts(base):
        _same(_kernel_row(ext, view), _ref_row(view), f"{dtype}/{name}")
    big = _values(dtype, (3, 1000, 333), gen).cuda()  # many blocks
    _same(_kernel_row(ext, big), _ref_row(big), f"{dtype}/big")
    rank8 = _values(dtype, (2, 3, 2, 3, 2, 3, 2, 5), gen).cuda().permute(7, 6, 5, 4, 3, 2, 1, 0)
    _same(_kernel_row(ext, rank8), _ref_row(rank8), f"{dtype}/rank8")
    sampled = big.transpose(1, 2)
    _same(_kernel_row(ext, sampled, step=7), _ref_row(sampled, step=7), f"{dtype}/sampled")


def test_adversarial_values(ext):
    nan, inf = float("nan"), float("inf")
    cases = {
        "all_nan": torch.full((1000,), nan),
        "all_inf": torch.full((1000,), inf),
        "neg_inf_and_nan": torch.tensor([nan, -inf, nan]),
        "huge": torch.tensor([3e38] * 8 + [-1.0]),  # float partial sums would overflow
        "mixed_inf": torch.tensor([1.0, -float("inf"), 2.0, float("inf")] * 4),
        "tiny": torch.tensor([1e-45, -1e-45, 0.0]),
    }
    for name, x in cases.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2):
            t = x.to(dtype).cuda()
            _same(_kernel_row(ext, t), _ref_row(t), f"{name}/{dtype}")
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).cuda()
    _same(_kernel_row(ext, e4m3), _ref_row(e4m3), "e4m3 every code")
    e5m2 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2).cuda()
    _same(_kernel_row(ext, e5m2), _ref_row(e5m2), "e5m2 every code")
    ints = torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32).cuda()
    _same(_kernel_row(ext, ints), _ref_row(ints), "int32 extremes")


def test_numel_past_2_pow_31(ext):
    n = 2_200_000_000
    try:
        t = torch.ones(n, dtype=torch.int8, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    t[n - 1] = -5
    t[n - 3] = 7
    row = decode_row(_kernel_row(ext, t), RowMeta("big", "full", n))
    assert row["min"] == -5 and row["max"] == 7
    assert row["mean"] == pytest.approx((n - 2 - 5 + 7) / n, rel=1e-12)
    strided = t.view(2, n // 2)[:, 1:]  # non-contiguous, still past 2^31
    row = decode_row(_kernel_row(ext, strided), RowMeta("s", "full", strided.numel()))
    assert row["min"] == -5 and row["max"] == 7
    del t, strided
    b = torch.zeros(n, dtype=torch.bool, device="cuda")
    b[n - 1] = True
    words = _kernel_row(ext, b)
    assert words[6] == n
    assert decode_row(words, RowMeta("b", "full", n))["max"] == 1.0
    del b
    torch.cuda.empty_cache()


def _paged_case(layout="nhd"):
    gen = torch.Generator().manual_seed(1)
    pages, page_size, heads, dim = 64, 16, 4, 32
    cache = torch.randn(pages, page_size, heads, dim, generator=gen).half().cuda()
    if layout == "hnd":
        cache = torch.randn(pages, heads, page_size, dim, generator=gen).half().cuda()
    indices = torch.tensor([5, 9, 33, 2, 40, 41], dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device="cuda")
    return cache, indices, indptr


def test_referenced_pages_find_planted_nan(ext):
    cache, indices, indptr = _paged_case()
    cache[33, 3, 1, 7] = float("nan")  # referenced
    cache[34, 0, 0, 0] = float("nan")  # not referenced
    cache[60, 0, 0, 0] = float("inf")  # not referenced
    words = _kernel_row(ext, cache, 1, indices, indptr, 3)
    ref = _ref_row(cache, 1, indices, indptr, 3)
    _same(words, ref, "paged")
    row = decode_row(words, RowMeta("kv", "referenced_pages"))
    assert row["nan_count"] == 1 and row["inf_count"] == 0
    assert row["numel"] == 6 * cache[0].numel()
    # strided pages (a view of a combined [P, 2, ...] cache) take the generic path
    kv = torch.randn(64, 2, 16, 4, 32, device="cuda").half()
    kv[9, 1, 0, 0, 0] = float("-inf")
    for part in (kv[:, 0], kv[:, 1]):
        _same(_kernel_row(ext, part, 1, indices, indptr, 3),
              _ref_row(part, 1, indices, indptr, 3), "paged strided")
    # the count is read on the device: changing indptr's contents changes the result
    indptr.copy_(torch.tensor([0, 1, 2, 2], dtype=torch.int32))
    row = decode_row(_kernel_row(ext, cache, 1, indices, indptr, 3),
                     RowMeta("kv", "referenced_pages"))
    assert row["nan_count"] == 0 and row["numel"] == 2 * cache[0].numel()


@pytest.mark.parametrize("case", ["nhd-vector", "hnd-vector", "nhd-scalar", "nhd-strided"])
def test_last_page_len_leaves_stale_slots_out(ext, case):
    """Slots of a request's last page at or past its last_page_len are not read, on the
    vector, scalar and strided paths, with the limit read on the device."""
    gen = torch.Generator().manual_seed(3)
    P = 16
    if case == "nhd-vector":
        cache, slot_dim = torch.randn(64, 2, P, 8, 128, generator=gen).half().cuda(), 3
    elif case == "hnd-vector":
        cache, slot_dim = torch.randn(64, 2, 8, P, 128, generator=gen).half().cuda(), 2
    elif case == "nhd-scalar":  # a slot of 2*3 floats is 24 bytes: not whole vectors
        cache, slot_dim = torch.randn(64, P, 2, 3, generator=gen).cuda(), 3
    else:  # every other head_dim pair: pages [P, H, D] that do not coalesce (strided path)
        cache = torch.randn(64, P, 4, 2, 32, generator=gen).half().cuda()[:, :, :, 0]
        slot_dim = 3
    axis = cache.dim() - slot_dim  # the slot axis in the cache's dims

    def at(page, slot):  # noqa: ANN001, ANN202
        index = [page] + [0] * (cache.dim() - 1)
        index[axis] = slot
        index[-1] = 1
        return tuple(index)

    indices = torch.tensor([5, 9, 33, 2, 40, 41], dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device="cuda")
    lpl = torch.tensor([5, 16, 1], dtype=torch.int32, device="cuda")  # last pages 9, 33, 41
    cache[at(9, 5)] = float("nan")  # stale
    cache[at(41, 1)] = float("nan")  # stale
    cache[at(41, 15)] = float("inf")  # stale
    cache[at(33, 15)] = float("nan")  # request 1's last page is full: counted
    cache[at(5, 15)] = float("-inf")  # not a last page: counted
    words = _kernel_row(ext, cache, 1, indices, indptr, 3, lpl, slot_dim)
    _same(words, _ref_row(cache, 1, indices, indptr, 3, lpl, slot_dim), case)
    row = decode_row(words, RowMeta("kv", "referenced_pages"))
    slot_numel = cache[0].numel() // P
    assert row["numel"] == (3 * P + 5 + 16 + 1) * slot_numel, case
    assert (row["nan_count"], row["inf_count"]) == (1, 1), case
    lpl.fill_(P)  # read on the device, as a graph replay needs: now every slot counts
    row = decode_row(_kernel_row(ext, cache, 1, indices, indptr, 3, lpl, slot_dim),
                     RowMeta("kv", "referenced_pages"))
    assert (row["numel"], row["nan_count"], row["inf_count"]) == (6 * P * slot_numel, 3, 2)


def _resolve(pending, timeout=30.0):
    deadline = time.time() + timeout
    while not pending.ready():
        assert time.time() < deadline, "statistics never became ready"
        time.sleep(0.001)
    rec = _Rec()
    pending.apply(rec)
    return rec


def test_recorder_eager_under_sync_debug_error(ext):
    for use_kernel in (True, False):
        rec = StatsRecorder(stats_max_mb=1, use_kernel=use_kernel)
        x = torch.randn(4096, device="cuda")
        x[10] = float("nan")
        big = torch.randn(1024, 1024, device="cuda")  # 4 MB > 1 MB: sampled
        cache, indices, indptr = _paged_case()
        cache[2, 0, 0, 0] = float("inf")
        k_v = (cache, cache.clone())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            many = [(f"t{i}", torch.full((i + 1,), float(i), device="cuda")) for i in range(20)]
            pend = rec.before([("x", x), ("big", big), ("n", 3),
                               PagedSpec("kv", k_v, indices, indptr, 3), *many])
            pend_out = rec.after([("out", x * 2)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        got = _resolve(pend)
        by_name = {attrs["flashinfer.tensor"]: attrs for _, attrs, _ in got.events}
        assert by_name["x"]["nan_count"] == 1 and by_name["x"]["scope"] == "full"
        assert by_name["big"]["scope"] == "sampled"
        assert by_name["big"]["sampled_numel"] <= 2**20 // 4 + 1
        assert by_name["kv"]["scope"] == "referenced_pages"
        assert by_name["kv"]["inf_count"] == 2  # page 2 referenced, in k and v
        assert by_name["t19"]["mean"] == 19.0 and by_name["t19"]["numel"] == 20
        assert got.attributes["flashinfer.nonfinite"] is True
        out = _resolve(pend_out)
        assert out.events[0][1]["nan_count"] == 1


def test_ring_full_drops_instead_of_blocking(ext):
    rec = StatsRecorder(slots=2)
    x = torch.randn(16, device="cuda")
    pendings = [rec.before([("x", x)]) for _ in range(3)]
    last = _resolve(pendings[2])
    assert last.attributes["flashinfer.stats.dropped"] == "ring_full"
    for p in pendings[:2]:
        assert _resolve(p).events
    assert _resolve(rec.before([("x", x)])).events  # slots came back


def _capture_on_side(rec, static, call):
    """(graph, call()) with ``call`` captured on a side stream, after a warm-up of the
    recorder outside capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        rec.before([("x", static)])  # warm-up outside capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            out = call()
    return graph, out


@pytest.mark.parametrize("use_kernel", [True, False])
def test_graph_capture_each_replay_has_its_own_stats(ext, use_kernel):
    rec = StatsRecorder(use_kernel=use_kernel)
    static = torch.zeros(1000, device="cuda")
    cache, indices, indptr = _paged_case()

    def call():
        y = static * 2
        return (rec.before([("x", static), PagedSpec("kv", cache, indices, indptr, 3)]),
                rec.after([("y", y)]))

    graph, (slot, slot_out) = _capture_on_side(rec, static, call)
    assert isinstance(slot, GraphStatsSlot) and isinstance(slot_out, GraphStatsSlot)
    results = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for replay in range(4):
            static.fill_(float(replay))
            if replay == 2:  # slices + fill_: setitem with a scalar would sync
                static[5:6].fill_(float("nan"))
                cache[9, 0, 0, 0:1].fill_(float("nan"))
            if replay == 3:
                indptr.fill_(0)  # this replay references no page
            graph.replay()
            stream = torch.cuda.current_stream()
            results.append((slot.snapshot(stream), slot_out.snapshot(stream)))
            if replay == 2:
                cache[9, 0, 0, 0:1].fill_(0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for replay, (pin, pout) in enumerate(results):
        got = {a["flashinfer.tensor"]: a for _, a, _ in _resolve(pin).events}
        out = _resolve(pout).events[0][1]
        assert got["x"]["max"] == float(replay)
        assert out["max"] == 2.0 * replay
        assert got["x"]["nan_count"] == (1 if replay == 2 else 0)
        assert got["kv"]["nan_count"] == (1 if replay == 2 else 0)
        assert got["kv"]["numel"] == (0 if replay == 3 else 6 * cache[0].numel())


def test_captured_call_shares_one_buffer_for_inputs_and_outputs(ext):
    """begin/finish under capture (the span hooks): one memset node, the inputs' and the
    outputs' launches into one buffer, and one snapshot per replay covering both."""
    rec = StatsRecorder()
    static = torch.zeros(1000, device="cuda")
    cache, indices, indptr = _paged_case()

    def call():
        state = rec.begin([("x", static), PagedSpec("kv", cache, indices, indptr, 3)])
        assert rec.is_open(state)
        y = static * 2
        return rec.finish(state, [("y", y), ("z", static[:10])])

    graph, slot = _capture_on_side(rec, static, call)
    assert isinstance(slot, GraphStatsSlot)
    assert [m.name for m in slot.metas] == ["x", "kv", "y", "z"]
    assert slot.out.shape[0] == 4  # replays copy the rows in use only
    results = []
    for replay in range(3):
        static.fill_(float(replay))
        if replay == 1:
            static[5:6].fill_(float("nan"))
        graph.replay()
        results.append(slot.snapshot(torch.cuda.current_stream()))
    for replay, pending in enumerate(results):
        got = {a["flashinfer.tensor"]: a for _, a, _ in _resolve(pending).events}
        nan = 1 if replay == 1 else 0
        assert got["x"]["nan_count"] == nan and got["y"]["nan_count"] == nan
        assert got["y"]["max"] == 2.0 * replay and got["z"]["max"] == float(replay)
        assert got["kv"]["numel"] == 6 * cache[0].numel()


@pytest.mark.parametrize("case", ["vector", "scalar", "strided"])
def test_page_ids_outside_the_cache_are_left_out_not_read(ext, case):
    """Bad page ids and an indptr past the indices (an engine bug a user is chasing)
    must not fault our kernel before the call: they are left out, as the torch path
    leaves them out, and the stream stays healthy."""
    gen = torch.Generator().manual_seed(5)
    if case == "vector":
        cache = torch.randn(16, 2, 16, 8, 128, generator=gen).half().cuda()
    elif case == "scalar":
        cache = torch.randn(16, 16, 2, 3, generator=gen).cuda()
    else:
        cache = torch.randn(16, 16, 4, 2, 32, generator=gen).half().cuda()[:, :, :, 0]
    indices = torch.tensor([3, 1 << 24, -7, 15, 16], dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32, device="cuda")
    words = _kernel_row(ext, cache, 1, indices, indptr, 2)
    torch.cuda.synchronize()  # raises if the kernel read outside the cache
    _same(words, _ref_row(cache, 1, indices, indptr, 2), case)
    row = decode_row(words, RowMeta("kv", "referenced_pages"))
    assert row["numel"] == 2 * cache[0].numel(), case  # pages 3 and 15 only
    indptr.copy_(torch.tensor([0, 2, 1 << 20], dtype=torch.int32))  # past the indices
    row = decode_row(_kernel_row(ext, cache, 1, indices, indptr, 2),
                     RowMeta("kv", "referenced_pages"))
    torch.cuda.synchronize()
    assert row["numel"] == 2 * cache[0].numel(), case
