"""Level-5 statistics semantics on CPU tensors (torch-op path) against numpy, the row
decoder on hand-built rows, and the recorder's CPU behaviour."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from otel_flashinfer.stats import kernel
from otel_flashinfer.stats.decode import (
    SCOPE_FULL,
    SCOPE_PAGES,
    SCOPE_SAMPLED,
    RowMeta,
    decode_buffer,
    decode_row,
    decode_rows,
    is_nonfinite,
)
from otel_flashinfer.stats.layout import ROW_WORDS, SIGN
from otel_flashinfer.stats.recorder import PagedSpec, StatsRecorder, plan
from otel_flashinfer.stats.torch_ops import merge_rows, tensor_row

NAN, INF = float("nan"), float("inf")


class _Rec:
    def __init__(self) -> None:
        self.events: list = []
        self.attributes: dict = {}


def _stats(t: torch.Tensor, **kw) -> dict:
    return decode_row(tensor_row(t, **kw).tolist(), RowMeta("t", SCOPE_FULL, t.numel()))


def _numpy_ref(a: np.ndarray) -> dict:
    a = a.astype(np.float64).ravel()
    nan = np.isnan(a)
    inf = np.isinf(a)
    fin = ~nan & ~inf
    non_nan = a[~nan]
    return {
        "min": non_nan.min(), "max": non_nan.max(), "mean": a[fin].mean(),
        "nan_count": int(nan.sum()), "inf_count": int(inf.sum()),
    }


def test_nan_excluded_from_mean_inf_in_min_max():
    t = torch.tensor([1.0, NAN, 3.0, INF, -INF, NAN, 2.0])
    s = _stats(t)
    assert s["nan_count"] == 2 and s["inf_count"] == 2
    assert s["min"] == -INF and s["max"] == INF
    assert s["mean"] == pytest.approx(2.0)
    assert s["numel"] == 7 and s["scope"] == "full"
    assert is_nonfinite([s])


def test_random_floats_match_numpy():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 70, generator=gen) * 100
    x[3, 4] = NAN
    x[7, 1] = -INF
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t = x.to(dtype)
        ref = _numpy_ref(t.to(torch.float64).numpy())
        s = _stats(t)
        assert s["min"] == ref["min"] and s["max"] == ref["max"]
        assert s["mean"] == pytest.approx(ref["mean"], rel=1e-9)
        assert (s["nan_count"], s["inf_count"]) == (ref["nan_count"], ref["inf_count"])


def test_float8_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    e4m3 = _stats(codes.view(torch.float8_e4m3fn))
    assert e4m3["nan_count"] == 2 and e4m3["inf_count"] == 0  # S.1111.111 twice
    assert (e4m3["min"], e4m3["max"]) == (-448.0, 448.0)
    e5m2 = _stats(codes.view(torch.float8_e5m2))
    assert e5m2["inf_count"] == 2 and e5m2["nan_count"] == 6
    assert (e5m2["min"], e5m2["max"]) == (-INF, INF)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64])
def test_integers(dtype):
    values = [0, 5, 100, 7] if dtype == torch.uint8 else [-100, 5, 100, 7, -3]
    s = _stats(torch.tensor(values, dtype=dtype))
    assert (s["min"], s["max"]) == (min(values), max(values))
    assert s["mean"] == pytest.approx(sum(values) / len(values))
    assert s["nan_count"] == s["inf_count"] == 0


def test_bool_and_large_int64():
    s = _stats(torch.tensor([True, False, True, True]))
    assert (s["min"], s["max"], s["mean"]) == (0.0, 1.0, 0.75)
    big = torch.tensor([-(2**40), 2**40], dtype=torch.int64)
    s = _stats(big)
    assert (s["min"], s["max"], s["mean"]) == (-(2.0**40), 2.0**40, 0.0)


def test_strided_views_and_storage_offsets():
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    for view in (base.t(), base[2:, 3:7], base[::2, ::3], base.view(-1)[7:],
                 base[:1].expand(4, 10), base[3, 4]):
        ref = view.contiguous().to(torch.float64)
        s = _stats(view)
        assert s["min"] == ref.min().item() and s["max"] == ref.max().item()
        assert s["mean"] == pytest.approx(ref.mean().item())
        assert s["numel"] == view.numel()


def test_empty_and_all_nan():
    s = _stats(torch.empty(0, 4))
    assert s["numel"] == 0 and "min" not in s and "mean" not in s
    assert s["nan_count"] == 0 and not is_nonfinite([s])
    s = _stats(torch.full((3,), NAN))
    assert math.isnan(s["min"]) and math.isnan(s["max"]) and math.isnan(s["mean"])
    s = _stats(torch.tensor([INF, INF]))
    assert s["min"] == INF and math.isnan(s["mean"]) and s["inf_count"] == 2


def test_sampled_scope_on_small_threshold():
    t = torch.arange(1000, dtype=torch.float32)
    t[1] = NAN  # not on the sample grid: not seen
    jobs, metas, left = plan([("t", t)], max_bytes=400, max_rows=8)  # 100 floats
    assert jobs[0].step == 10 and metas[0].scope == "sampled" and left == 0
    row = tensor_row(t, step=jobs[0].step).tolist()
    s = decode_row(row, metas[0])
    assert s["scope"] == "sampled" and s["numel"] == 1000 and s["sampled_numel"] == 100
    assert (s["min"], s["max"]) == (0.0, 990.0) and s["nan_count"] == 0
    recorder = StatsRecorder(stats_max_mb=400 / 2**20)
    rec = _Rec()
    recorder.before([("t", t), ("small", torch.ones(10))]).apply(rec)
    events = {a["flashinfer.tensor"]: a for _, a, _ in rec.events}
    assert events["t"]["sampled_numel"] == 100 and events["small"]["scope"] == "full"


def test_referenced_pages_and_kv_pair():
    cache = torch.zeros(8, 2, 3)
    cache[5, 1, 2] = NAN  # referenced
    cache[6, 0, 0] = INF  # not referenced
    cache[2] = 4.0
    indices = torch.tensor([2, 5, 1, 6], dtype=torch.int32)
    indptr = torch.tensor([0, 1, 3], dtype=torch.int32)  # batch 2 -> pages 2, 5, 1
    s = decode_row(tensor_row(cache, 1, indices, indptr, 2).tolist(), RowMeta("kv", SCOPE_PAGES))
    assert s["numel"] == 18 and s["nan_count"] == 1 and s["inf_count"] == 0
    assert s["max"] == 4.0 and s["mean"] == pytest.approx(24.0 / 17)
    rec = _Rec()
    StatsRecorder().before([PagedSpec("kv", (cache, -cache), indices, indptr, 2)]).apply(rec)
    (_, attrs, _), = rec.events
    assert attrs["scope"] == "referenced_pages" and attrs["numel"] == 36
    assert (attrs["min"], attrs["max"], attrs["nan_count"]) == (-4.0, 4.0, 2)
    assert rec.attributes["flashinfer.nonfinite"] is True


def test_page_ids_and_bounds_outside_the_cache_are_left_out():
    """An engine's bad page ids (the bug a user may be chasing) name no data: they are
    left out, not read as a neighbouring page, and an indptr past the indices stops at
    their end (the kernel does the same instead of faulting before the call)."""
    cache = torch.zeros(4, 2, 3)
    cache[3] = 7.0  # the last page: a clamp would read it for every bad id
    cache[1, 0, 0] = NAN
    indices = torch.tensor([1, 1 << 24, -5, 4], dtype=torch.int32)
    indptr = torch.tensor([0, 2, 4], dtype=torch.int32)
    s = decode_row(tensor_row(cache, 1, indices, indptr, 2).tolist(), RowMeta("kv", SCOPE_PAGES))
    assert s["numel"] == 6 and s["nan_count"] == 1 and s["max"] == 0.0
    past = torch.tensor([0, 9], dtype=torch.int32)  # 9 entries claimed, 4 held
    s = decode_row(tensor_row(cache, 1, torch.tensor([3, 0, 2, 3], dtype=torch.int32), past,
                              1).tolist(), RowMeta("kv", SCOPE_PAGES))
    assert s["numel"] == 24 and s["max"] == 7.0 and s["mean"] == pytest.approx(7.0 * 12 / 24)


def _filled_values(cache, indices, indptr, last_page_len, slot_axis):  # noqa: ANN001, ANN202
    """What a request's pages hold, page by page: every slot, but only the first
    last_page_len slots of its last page (an oracle by narrowing, no masks)."""
    out = []
    for b in range(len(last_page_len)):
        pages = indices[indptr[b]:indptr[b + 1]].tolist()
        for k, page in enumerate(pages):
            values = cache[page]
            if k == len(pages) - 1:
                values = values.narrow(slot_axis, 0, int(last_page_len[b]))
            out.append(values.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_last_page_slots_past_last_page_len_are_left_out(layout):
    from otel_flashinfer.stats.planning import SLOT_DIMS

    pages, P, H, D = 7, 4, 2, 3
    nhd = layout == "NHD"
    cache = torch.randn(pages, 2, *((P, H, D) if nhd else (H, P, D)))
    slot_axis = 1 if nhd else 2  # in a page's dims [2, ...]
    indices = torch.tensor([3, 0, 5, 6], dtype=torch.int32)
    indptr = torch.tensor([0, 2, 3, 3], dtype=torch.int32)  # pages [3, 0], [5], none
    last_page_len = torch.tensor([2, 3, 0], dtype=torch.int32)

    def at(page, slot):  # noqa: ANN001, ANN202
        return (page, 0, slot, 1, 2) if nhd else (page, 0, 1, slot, 2)

    cache[at(0, 2)] = NAN  # last page of request 0, slot 2 >= 2: stale, left out
    cache[at(0, 1)] = INF  # slot 1 < 2: this call's data
    cache[at(5, 3)] = NAN  # last page of request 1, slot 3 >= 3: left out
    cache[at(3, 3)] = NAN  # not a last page: every slot counts
    cache[6] = NAN  # not referenced
    row = tensor_row(cache, 1, indices, indptr, 3, last_page_len, SLOT_DIMS[layout])
    s = decode_row(row.tolist(), RowMeta("kv", SCOPE_PAGES))
    expect = _filled_values(cache, indices, indptr, last_page_len, slot_axis)
    assert s["numel"] == expect.numel() == 48 + 24 + 36
    assert (s["nan_count"], s["inf_count"]) == (1, 1)
    numbers, finite = expect[~torch.isnan(expect)], expect[torch.isfinite(expect)]
    assert s["min"] == numbers.min().item() and s["max"] == numbers.max().item() == INF
    assert s["mean"] == pytest.approx(finite.double().mean().item())
    # Unmasked, as before: the stale NaNs flag the call.
    unmasked = decode_row(tensor_row(cache, 1, indices, indptr, 3).tolist(),
                          RowMeta("kv", SCOPE_PAGES))
    assert unmasked["numel"] == 3 * cache[0].numel() and unmasked["nan_count"] == 3


def test_last_page_mask_of_a_kv_pair_through_the_recorder():
    from otel_flashinfer.stats.planning import SLOT_DIMS

    k, v = torch.ones(4, 8, 2, 16), torch.ones(4, 8, 2, 16)  # NHD pages [P=8, H, D]
    v[1, 5:] = NAN  # request 0's last page (1) holds 5 tokens: slots 5.. are stale
    indices = torch.tensor([2, 1], dtype=torch.int32)
    indptr = torch.tensor([0, 2], dtype=torch.int32)
    lpl = torch.tensor([5], dtype=torch.int32)
    rec = _Rec()
    StatsRecorder().before([PagedSpec("kv", (k, v), indices, indptr, 1, lpl,
                                      SLOT_DIMS["NHD"])]).apply(rec)
    (_, attrs, _), = rec.events
    assert attrs["numel"] == 2 * (8 + 5) * 2 * 16 and attrs["nan_count"] == 0
    assert rec.attributes.get("flashinfer.nonfinite") is not True


def test_merge_rows_matches_concatenation():
    a, b = torch.tensor([1.0, NAN, -2.0]), torch.tensor([INF, 5.0])
    merged = merge_rows(tensor_row(a), tensor_row(b)).tolist()
    assert merged == tensor_row(torch.cat([a, b])).tolist()


def _key(d: float) -> int:
    b = struct.unpack("<Q", struct.pack("<d", d))[0]
    return (~b & ((1 << 64) - 1)) if b & SIGN else b | SIGN


def test_decode_hand_built_row():
    """The layout the CUDA kernel writes (unsigned 64-bit words) decodes the same."""
    words = [0] * ROW_WORDS
    words[0] = ~_key(-1.5) & ((1 << 64) - 1)
    words[1] = _key(2.5)
    words[2] = struct.unpack("<Q", struct.pack("<d", 3.0))[0]
    words[3], words[4], words[5], words[6] = 3, 1, 0, 4
    s = decode_row(words, RowMeta("x", SCOPE_FULL, 4))
    assert (s["min"], s["max"], s["mean"], s["nan_count"]) == (-1.5, 2.5, 1.0, 1)
    assert decode_row([0] * ROW_WORDS, RowMeta("x", SCOPE_FULL, 0))["numel"] == 0


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(v, float) and math.isnan(v) and math.isnan(b[k])) or v == b[k]
        for k, v in a.items())


def test_decode_buffer_matches_decode_rows_on_the_slot_bytes():
    """The background resolver decodes a pinned slot's raw bytes (``decode_buffer``);
    it must say exactly what ``decode_rows`` says of the same rows."""
    x = torch.randn(300, dtype=torch.float64)
    x[3], x[7], x[9] = NAN, INF, -INF
    rows = torch.stack([
        tensor_row(x), tensor_row(torch.full((4,), NAN)), tensor_row(torch.empty(0)),
        tensor_row(torch.arange(-5, 60, dtype=torch.int64)), tensor_row(x, step=7),
        tensor_row(torch.tensor([-0.0, 1e300, -1e-300], dtype=torch.float64)),
    ])
    metas = [RowMeta("a", SCOPE_FULL, 300), RowMeta("nan", SCOPE_FULL, 4),
             RowMeta("e", SCOPE_FULL, 0), ("ints", SCOPE_FULL, 65), ("s", SCOPE_SAMPLED, 300),
             ("kv", SCOPE_PAGES, 0)]
    expected = decode_rows(rows.tolist(), [m if isinstance(m, RowMeta) else RowMeta(*m)
                                           for m in metas])
    raw = rows.numpy().tobytes()
    got = decode_buffer(raw, metas)
    assert len(got) == len(expected) == 6
    assert all(_same(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)
    assert got[0]["nan_count"] == 1 and got[0]["inf_count"] == 2 and got[0]["min"] == -INF
    # an offset picks up later rows (a call's outputs after its inputs)
    assert _same(decode_buffer(raw, metas[3:4], 3 * ROW_WORDS * 8)[0], expected[3])


def test_recorder_cpu_skips_non_tensors_and_limits_rows():
    recorder = StatsRecorder(rows_per_slot=2)
    rec = _Rec()
    recorder.before([("a", torch.ones(2)), ("n", 3), ("c", torch.ones(2, dtype=torch.complex64)),
                     ("b", torch.zeros(2)), ("d", torch.ones(1))]).apply(rec)
    assert [a["flashinfer.tensor"] for _, a, _ in rec.events] == ["a", "b"]
    assert rec.attributes["flashinfer.stats.dropped"] == "too_many_tensors:1"
    assert "flashinfer.nonfinite" not in rec.attributes
    assert recorder.before([("n", 1)]) is None


def test_kernel_sources_are_found_and_loader_never_raises():
    src = kernel.source_dir()
    assert src is not None and (src / "tensor_stats_kernel.cu").is_file()
    if not torch.cuda.is_available():
        assert kernel.get(wait=True, timeout=60) is None
        assert kernel.disabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int8, torch.uint8, torch.int16, torch.int32,
                                   torch.int64, torch.bool])
def test_clean_cpu_fast_path_writes_the_masked_paths_row(dtype):
    """CPU tensors without NaN/Inf take three passes in their own dtype; the row must be
    the one the general (masked, float64) path writes, word for word (the sum to the
    last bits: the two may add in another order)."""
    from otel_flashinfer.stats import torch_ops

    gen = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        base = torch.rand(3000, generator=gen) > 0.3
    elif dtype.is_floating_point:
        base = (torch.randn(3000, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    else:
        info = torch.iinfo(dtype)
        base = torch.randint(info.min, info.max, (3000,), generator=gen, dtype=dtype)
        base[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    views = [base, base.reshape(60, 50).t(), base[5:2995:7]]
    for view in views:
        fast = torch_ops._clean_cpu_row(view.reshape(-1))
        assert fast is not None
        slow = torch_ops.row_of(view.reshape(-1))
        words = [i for i in range(ROW_WORDS) if i != 2]
        assert fast[words].tolist() == slow[words].tolist()
        fast_sum = fast[2:3].view(torch.float64).item()
        slow_sum = slow[2:3].view(torch.float64).item()
        assert fast_sum == pytest.approx(slow_sum, rel=1e-12, abs=1e-9)
        # what a span gets: tensor_row takes the fast path for CPU tensors
        assert tensor_row(view).tolist()[:2] == slow.tolist()[:2]


def test_nonfinite_cpu_tensors_keep_the_masked_path():
    from otel_flashinfer.stats import torch_ops

    x = torch.tensor([1.0, NAN, -INF, 3.0])
    assert torch_ops._clean_cpu_row(x) is None
    s = _stats(x)
    assert (s["min"], s["max"], s["mean"], s["nan_count"], s["inf_count"]) == (
        -INF, 3.0, 2.0, 1, 1)
    assert torch_ops._clean_cpu_row(torch.empty(0)) is None
    assert torch_ops._clean_cpu_row(torch.zeros(4, dtype=torch.complex64)) is None


class _Part:
    """One device's statistics: in or not, and what became of them."""

    def __init__(self, ready: bool) -> None:
        self.is_ready, self.fate = ready, None

    def ready(self) -> bool:
        return self.is_ready

    def apply(self, record) -> None:  # noqa: ANN001
        self.fate = "applied"

    def abandon(self, record, reason: str) -> None:  # noqa: ANN001
        self.fate = f"abandoned:{reason}"


def test_a_call_on_two_devices_keeps_the_statistics_of_the_one_that_finished() -> None:
    """A span given up while one device's statistics were in and the other's were not
    lost both (the pipeline abandons a pending that is not wholly ready), and counted
    the finished device's as dropped too."""
    from otel_flashinfer.stats.pending import MultiPending

    done, late = _Part(True), _Part(False)
    multi = MultiPending([done, late])
    assert not multi.ready()
    multi.abandon(object(), "timeout")
    assert done.fate == "applied" and late.fate == "abandoned:timeout"
