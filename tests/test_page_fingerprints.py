"""Level 10's page fingerprints (``blobs.fingerprint``): pages the writer stored before
are not encoded, hashed or stored again, and what the manifest names is the same as
without fingerprints.  The fingerprints run on the GPU in use; torch runs the same ops
here on CPU tensors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from otel_flashinfer.blobs import encode, manifest
from otel_flashinfer.blobs.capture import BlobRecorder, _Held
from otel_flashinfer.blobs.fingerprint import LANES, PageMemo, page_fingerprints
from otel_flashinfer.config import Settings


def _pages(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 16, 4, 8, generator=g).to(torch.float16)  # 2 KB pages


def test_equal_pages_match_and_any_changed_word_changes_both_lanes() -> None:
    pages = _pages()
    fps = page_fingerprints(pages)
    assert fps is not None and fps.shape == (12, LANES) and fps.dtype == torch.int64
    assert torch.equal(page_fingerprints(pages.clone()), fps)  # deterministic
    words = pages.reshape(12, -1).view(torch.int64)
    for page, word, bit in [(0, 0, 0), (3, 17, 63), (11, words.shape[1] - 1, 31)]:
        changed = words.clone()
        changed[page, word] ^= 1 << bit if bit < 63 else -(1 << 63)
        got = page_fingerprints(changed.view(torch.float16).reshape(pages.shape))
        assert (got[page] != fps[page]).all(), (page, word, bit)  # both lanes
        others = [i for i in range(12) if i != page]
        assert torch.equal(got[others], fps[others])
    # two words swapped within a page (a permutation) is a change too
    swapped = words.clone()
    swapped[5, 0], swapped[5, 1] = words[5, 1], words[5, 0]
    assert (page_fingerprints(swapped)[5] != fps[5]).any()


@pytest.mark.parametrize(("bit", "words"), [(63, 2), (62, 4), (60, 16), (56, 256)])
def test_changes_in_the_high_bits_of_several_words_do_not_cancel(bit: int, words: int) -> None:
    """Over whole 64-bit words, ``words`` changes of bit ``bit`` summed to 2**64 = 0 in
    both lanes whatever the odd weights: two fp16 sign flips four elements apart made a
    changed page look stored, and its manifest named the old bytes."""
    n_words = max(words, 8)
    pages = torch.randn(2, n_words * 4, generator=torch.Generator().manual_seed(1)
                        ).to(torch.float16)
    w64 = pages.view(torch.int64).clone()  # (2, n_words)
    delta = torch.tensor(-(1 << 63) if bit == 63 else 1 << bit, dtype=torch.int64)
    w64[1, :words] ^= delta
    changed = w64.view(torch.float16)
    fps = page_fingerprints(torch.stack([pages[1], changed[1]]))
    assert (fps[0] != fps[1]).all()


def test_two_fp16_sign_flips_are_a_changed_page() -> None:
    pages = _pages(1)
    step = pages.clone()
    flat = step[0].view(-1)
    flat[3], flat[7] = -flat[3], -flat[7]  # the sign bits of words 0 and 1
    assert (page_fingerprints(step) != page_fingerprints(pages)).all()


def test_pages_that_are_not_whole_words_are_not_fingerprinted() -> None:
    assert page_fingerprints(torch.zeros(4, 3, dtype=torch.float16)) is None  # 6 bytes
    assert page_fingerprints(torch.zeros(0, 8)) is None
    assert page_fingerprints(torch.zeros(4, 0)) is None


def test_memo_is_bounded_and_keyed_by_what_the_object_depends_on() -> None:
    memo = PageMemo(entries=2)
    pages = torch.zeros(3, 8, dtype=torch.float16)
    a = (1, 2, memo.kind(pages, "safetensors"))
    assert a != (1, 2, memo.kind(pages.view(torch.int16), "safetensors"))  # dtype
    assert a != (1, 2, memo.kind(pages.reshape(3, 2, 4), "safetensors"))  # page shape
    assert a != (1, 2, memo.kind(pages, "npy"))  # format
    assert a == (1, 2, memo.kind(torch.ones(5, 8, dtype=torch.float16), "safetensors"))
    memo.put(a, {"hash": "a"})
    memo.put(("b",), {"hash": "b"})
    assert memo.lookup([a, ("x",)]) == [{"hash": "a"}, None]  # a: now the most recent
    memo.put(("c",), {"hash": "c"})
    assert len(memo) == 2 and memo.lookup([("b",), a]) == [None, {"hash": "a"}]


def _held(pages: torch.Tensor, ids: list[int], fingerprints: bool) -> _Held:
    held = _Held({"t": "paged_kv", "dtype": "float16", "shape": list(pages.shape)})
    held.host = pages
    held.ids = torch.tensor(ids)
    held.fps = page_fingerprints(pages) if fingerprints else None
    return held


@pytest.fixture
def recorder(tmp_path):  # noqa: ANN001, ANN201
    rec = BlobRecorder(dataclasses.replace(Settings(blob_url=str(tmp_path))),
                       install_handlers=False)
    yield rec
    rec.shutdown(5)


def test_pages_stored_before_are_not_hashed_or_stored_again(recorder, tmp_path,
                                                            monkeypatch) -> None:  # noqa: ANN001
    pages = _pages()
    ids = list(range(100, 112))
    puts: list[bytes] = []
    put_content = recorder.store.put_content

    def counting(data, fmt):  # noqa: ANN001, ANN202
        puts.append(bytes(data) if not isinstance(data, list) else b"".join(map(bytes, data)))
        return put_content(data, fmt)

    monkeypatch.setattr(recorder.store, "put_content", counting)
    first = _held(pages, ids, fingerprints=True)
    assert recorder._store_held(first) == pages.numel() * 2  # noqa: SLF001 - all new
    assert len(puts) == 12
    # the next step: one token written into page 7, the rest as they were
    step = pages.clone()
    step[7, 0, 3] += 1
    second = _held(step, ids, fingerprints=True)
    assert recorder._store_held(second) == pages[0].numel() * 2  # noqa: SLF001
    assert len(puts) == 13 and recorder.counters["pages_unchanged"] == 11
    # the manifest entry names what hashing every page names, byte for byte
    plain = _held(step, ids, fingerprints=False)
    recorder._store_held(plain)  # noqa: SLF001
    assert second.entry["pages"] == plain.entry["pages"]
    assert second.entry["page_ids"] == ids
    for i, page in enumerate(second.entry["pages"]):
        data = (tmp_path / page["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == page["hash"]
        assert torch.equal(encode.decode(data, "safetensors").reshape(step[i].shape), step[i])


def test_pages_left_on_the_device_are_fetched_only_when_not_stored_before(
        recorder, monkeypatch) -> None:  # noqa: ANN001
    """The caller copies only ids and fingerprints; the writer fetches the pages it has
    not stored (on the GPU from our gathered copy: here a CPU tensor stands in)."""
    pages = _pages()
    ids = list(range(100, 112))
    fetched: list[list[int]] = []
    fetch = recorder._fetch_pages  # noqa: SLF001

    def spy(dev, positions):  # noqa: ANN001, ANN202
        fetched.append(list(positions))
        return fetch(dev, positions)

    monkeypatch.setattr(recorder, "_fetch_pages", spy)

    def on_device(p: torch.Tensor) -> _Held:
        held = _held(p, ids, fingerprints=True)
        held.dev, held.host = held.host, None
        return held

    first = on_device(pages)
    assert recorder._store_held(first) == pages.numel() * 2  # noqa: SLF001
    step = pages.clone()
    step[7, 0, 3] += 1
    step[2, 1, 0] -= 1
    second = on_device(step)
    assert recorder._store_held(second) == 2 * pages[0].numel() * 2  # noqa: SLF001
    assert fetched == [list(range(12)), [2, 7]]
    plain = _held(step, ids, fingerprints=False)  # every page hashed from host bytes
    recorder._store_held(plain)  # noqa: SLF001
    assert second.entry["pages"] == plain.entry["pages"]


def test_a_cache_s_unchanged_pages_are_taken_from_its_last_call(recorder, monkeypatch,
                                                                tmp_path) -> None:  # noqa: ANN001
    """A decode step changes a few pages: only those are looked up in the memo (the
    rest compared with the same cache's last call in one tensor op), a call with no
    change reuses the last call's page list whole, and every manifest entry still
    names what hashing every page would."""
    pages = _pages()
    ids = list(range(100, 112))
    looked: list[int] = []
    lookup = recorder.page_memo.lookup
    monkeypatch.setattr(recorder.page_memo, "lookup",
                        lambda keys: (looked.append(len(keys)), lookup(keys))[1])
    puts: list[str] = []
    put_content = recorder.store.put_content
    monkeypatch.setattr(recorder.store, "put_content",
                        lambda data, fmt: (puts.append(fmt), put_content(data, fmt))[1])

    def store(p: torch.Tensor, cache: int = 1) -> _Held:
        held = _held(p, ids, fingerprints=True)
        held.source_key = cache
        recorder._store_held(held)  # noqa: SLF001
        plain = _held(p, ids, fingerprints=False)  # every page hashed, no memo
        recorder._store_held(plain)  # noqa: SLF001
        assert held.entry["pages"] == plain.entry["pages"]
        assert held.entry["page_ids"] == ids
        return held

    store(pages)
    assert looked == [12] and len(puts) == 12 + 12
    step = pages.clone()
    step[7, 0, 3] += 1
    second = store(step)
    assert looked == [12, 1] and len(puts) == 24 + 1 + 12  # only page 7 looked up, stored
    third = store(step)  # nothing changed: the last call's list itself
    assert looked == [12, 1] and third.entry["pages"] is second.entry["pages"]
    back = store(pages)  # page 7 as in the first call: in the memo, not stored again
    assert looked == [12, 1, 1] and len(puts) == 37 + 12 + 12
    recorder.page_memo._memo.clear()  # noqa: SLF001 - evicted: the last call still knows
    again = pages.clone()
    again[2, 1, 1] -= 1
    store(again)
    assert looked == [12, 1, 1, 1] and len(puts) == 61 + 1 + 12
    assert back.entry["pages"][2] != recorder._last_pages[(1, 0, 12)].found[2]  # noqa: SLF001
    store(again, cache=2)  # another cache with the same ids: nothing of cache 1 assumed
    assert looked == [12, 1, 1, 1, 12]
    assert json.loads(manifest.dumps({"kv": second.entry}))["kv"]["page_ids"] == ids


@pytest.mark.parametrize("fingerprints", [True, False])
def test_pages_referenced_twice_or_out_of_order_are_stored_once_each(
        recorder, fingerprints) -> None:  # noqa: ANN001
    """Page ids as a call's indices give them: a page twice, not sorted. The manifest
    lists each page once, sorted, with the bytes of its first occurrence."""
    pages = _pages()[:5]
    ids = [7, 3, 7, 1, 3]
    held = _held(pages, ids, fingerprints=fingerprints)
    recorder._store_held(held)  # noqa: SLF001
    assert held.entry["page_ids"] == [1, 3, 7]
    plain = [_held(pages[i:i + 1], [pid], fingerprints=False) for i, pid in ((3, 1), (1, 3),
                                                                             (0, 7))]
    for h in plain:
        recorder._store_held(h)  # noqa: SLF001
    assert held.entry["pages"] == [h.entry["pages"][0] for h in plain]


def test_a_change_against_the_last_call_is_found_with_pages_out_of_order(recorder) -> None:  # noqa: ANN001
    """The last-call comparison with page ids unsorted and repeated: a change at a
    page's first occurrence is stored, one at a later repeat of it is not the page's
    (the manifest keeps first occurrences), and the entries match hashing every page."""
    pages = _pages()[:5]
    ids = [7, 3, 7, 1, 3]

    def store(p: torch.Tensor) -> _Held:
        held = _held(p, ids, fingerprints=True)
        held.source_key = 5
        recorder._store_held(held)  # noqa: SLF001
        return held

    first = store(pages)
    step = pages.clone()
    step[3, 0, 0] += 1  # page 1's only occurrence
    step[4, 1, 1] += 1  # page 3's second occurrence: not what the manifest keeps
    second = store(step)
    assert second.entry["page_ids"] == [1, 3, 7]
    assert second.entry["pages"][0] != first.entry["pages"][0]
    assert second.entry["pages"][1:] == first.entry["pages"][1:]
    plain = _held(step[[3, 1, 0]], [1, 3, 7], fingerprints=False)
    recorder._store_held(plain)  # noqa: SLF001
    assert second.entry["pages"] == plain.entry["pages"]
    assert store(step).entry["pages"] is second.entry["pages"]


def test_manifest_pages_joined_from_their_own_json_are_the_canonical_bytes() -> None:
    """A page list made of pre-encoded pages writes exactly what encoding it whole
    would, wherever it sits; strings that look like the stand-in stay as they are."""
    import json

    from otel_flashinfer.blobs import manifest

    pages = [manifest.StoredPage(f"{i:064x}", f"objects/{i:02x}/{i:064x}.safetensors",
                                 65536 + i) for i in range(5)]
    token_like = manifest._TOKEN[:-1] + "x0"  # noqa: SLF001
    meta = {"schema": 1, "z": [1, "@otel-flashinfer-pages-0", token_like],
            "args": [{"name": "q", "value": {"t": "tensor", "hash": "ab"}},
                     {"name": "kv", "value": manifest.PagedEntry(
                         t="paged_kv", page_ids=manifest.EncodedInts([3, 1, 2]),
                         pages=manifest.EncodedPages(pages[:3]))},
                     {"name": "nested", "value": {"t": "tuple", "items": [
                         manifest.PagedEntry(t="paged_kv",
                                             pages=manifest.EncodedPages(pages[3:])),
                         {"t": "paged_kv", "pages": manifest.EncodedPages([])}]}}]}
    plain = json.loads(json.dumps(meta))  # the same, as ordinary lists and dicts
    expected = json.dumps(plain, sort_keys=True, allow_nan=False,
                          separators=(",", ":")).encode()
    assert manifest.dumps(meta) == expected
    assert meta["args"][1]["value"]["pages"][0] == pages[0]  # the manifest is left as it was
    assert json.loads(manifest.dumps(meta))["z"][2] == token_like


def test_a_stored_pages_json_is_what_the_encoder_writes() -> None:
    """A page's JSON is formatted, not encoded: the same bytes for any key and size."""
    import json

    from otel_flashinfer.blobs import manifest

    for key in ("objects/ab/" + "ab" * 32 + ".safetensors", 'odd "key"\\\n\u00e9'):
        page = manifest.StoredPage("ab" * 32, key, 1 << 40)
        assert page.json == json.dumps(dict(page), sort_keys=True, separators=(",", ":"))


def test_a_manifest_encoded_on_two_threads_at_once_is_right_on_both() -> None:
    """A paged entry's lists are joined from their JSON without being swapped in place:
    a writer thread (or a signal's handler on the same thread, as SIGTERM's crash path
    runs) encoding the same manifest while another encoding is under way gets the same
    bytes, and the entry is as it was.  Swapped in place, the second saw tokens."""
    import json
    import threading

    from otel_flashinfer.blobs import manifest

    pages = [manifest.StoredPage(f"{i:064x}", f"objects/{i:02x}/{i:064x}.safetensors",
                                 65536 + i) for i in range(4)]
    kv = manifest.PagedEntry(t="paged_kv", page_ids=manifest.EncodedInts([1, 2, 7]),
                             pages=manifest.EncodedPages(pages[:3]))
    inside, go = threading.Event(), threading.Event()
    owner = threading.get_ident()
    nested: list[bytes] = []

    class Pause(dict):
        """Encoded after ``args``: the first thread waits in here, mid-encoding."""

        def items(self):  # noqa: ANN202
            if threading.get_ident() != owner:
                inside.set()
                assert go.wait(10)
            elif not nested:  # a handler on this thread, encoding the same manifest
                nested.append(b"")
                nested[0] = manifest.dumps(meta)
            return super().items()

    meta = {"schema": 1, "args": [{"name": "kv", "value": kv}],
            "result": {"t": "tuple", "items": [kv, {"t": "paged_kv", "pages": kv["pages"]}]},
            "zz": Pause(x=1)}
    plain = json.loads(json.dumps(meta))
    expected = json.dumps(plain, sort_keys=True, allow_nan=False,
                          separators=(",", ":")).encode()
    got: list[bytes] = []
    other = threading.Thread(target=lambda: got.append(manifest.dumps(meta)))
    other.start()
    assert inside.wait(10)
    try:
        assert manifest.dumps(meta) == expected  # while the other is paused mid-way
        assert nested == [expected]
    finally:
        go.set()
        other.join(10)
    assert got == [expected]
    assert type(kv["pages"]) is manifest.EncodedPages and kv["page_ids"] == [1, 2, 7]


def test_fused_gather_declines_a_cache_at_an_odd_offset() -> None:
    """The kernel reads 32-bit halves: a contiguous view that starts two bytes into its
    storage would be a misaligned read on the GPU (a sticky error for the engine's
    context), so it is left to the torch ops before the extension is called."""
    from otel_flashinfer.blobs.fingerprint import gather_fused

    class Extension:
        calls = 0

        def gather_fingerprints(self, *args):  # noqa: ANN002, ANN202
            Extension.calls += 1
            return args[0][:0], torch.zeros(0, 3, dtype=torch.int64)

    ids = torch.arange(4, dtype=torch.int32)
    odd = torch.zeros(1 + 8 * 16, dtype=torch.float16)[1:].view(8, 16)
    assert odd.is_contiguous() and odd.data_ptr() % 8 == 2
    assert gather_fused(Extension(), odd, ids, 4) is None
    aligned = torch.zeros(8, 16, dtype=torch.float16)
    assert gather_fused(Extension(), aligned, ids, 4) is not None and Extension.calls == 1


def _fused_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from otel_flashinfer.stats import kernel as stats_kernel

    module = stats_kernel.get(wait=True, timeout=600)
    assert module is not None, "the statistics extension did not build"
    return module


@pytest.mark.gpu
@pytest.mark.parametrize(("shape", "dtype"), [
    ((64, 2, 16, 8, 128), torch.float16),  # FlashInfer NHD pages: the 16-byte path
    ((40, 2, 3, 4), torch.int32),  # 96-byte pages: 16-byte path, small
    ((30, 2, 3), torch.float32),  # 24-byte pages: 6 halves, the scalar path
    ((50, 5), torch.float64),  # 40-byte pages, the scalar path
])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_fused_gather_is_the_torch_ops_bit_for_bit(shape, dtype, index_dtype) -> None:
    """The kernel's pages, ids and both lanes equal index_select + page_fingerprints,
    out-of-range ids clamped to the cache as the torch path clamps them."""
    from otel_flashinfer.blobs.fingerprint import gather_fused

    module = _fused_module()
    g = torch.Generator(device="cuda").manual_seed(3)
    cache = (torch.randn(shape, generator=g, device="cuda") * 1000).to(dtype)
    pages = shape[0]
    ids = torch.randint(0, pages, (37,), generator=g, device="cuda")
    ids[3], ids[9], ids[20] = -3, pages, 1 << 20  # clamped, as the torch path does
    ids = ids.to(index_dtype)
    for n in (37, 20, 1):
        got = gather_fused(module, cache, ids, n)
        assert got is not None
        gathered, meta = got
        want_ids = ids[:n].long().clamp(0, pages - 1)
        want = cache.index_select(0, want_ids)
        assert gathered.shape == want.shape and gathered.dtype == cache.dtype
        assert torch.equal(gathered.view(torch.uint8), want.view(torch.uint8))
        assert meta.shape == (n, 3) and meta.dtype == torch.int64
        assert torch.equal(meta[:, 0], want_ids)
        assert torch.equal(meta[:, 1:], page_fingerprints(want))
    gathered, meta = gather_fused(module, cache, ids, 0)
    assert gathered.shape[0] == 0 and meta.shape == (0, 3)
    gathered, meta = gather_fused(module, cache, ids, 1000)  # past the indices: all of them
    assert meta.shape == (37, 3)


@pytest.mark.gpu
def test_fused_gather_declines_what_it_cannot_read() -> None:
    """None (the torch ops then) for pages that are not whole 8-byte words, a cache that
    is not contiguous, indices on another device or of a float dtype."""
    from otel_flashinfer.blobs.fingerprint import gather_fused

    module = _fused_module()
    cache = torch.zeros(8, 2, 16, 8, 16, dtype=torch.float16, device="cuda")
    ids = torch.arange(8, dtype=torch.int32, device="cuda")
    assert gather_fused(module, cache, ids, 8) is not None
    assert gather_fused(None, cache, ids, 8) is None  # not built yet
    assert gather_fused(module, torch.zeros(8, 3, dtype=torch.float16, device="cuda"),
                        ids, 8) is None  # 6-byte pages
    assert gather_fused(module, cache[:, 0], ids, 8) is None  # k of a (k, v) cache: strided
    assert gather_fused(module, cache, ids.cpu(), 8) is None
    assert gather_fused(module, cache, ids.float(), 8) is None


@pytest.mark.gpu
def test_stage_copies_queues_every_span_and_one_event() -> None:
    """One call copies each source's span (a strided view's whole span from its first
    element) into its pinned buffer and records one event; a size past a source's
    storage or its buffer is refused before anything is queued."""
    module = _fused_module()
    base = torch.arange(4096, dtype=torch.int32, device="cuda")
    view = base[96:].view(-1, 8)[:, ::2]  # strided, from element 96
    meta = torch.arange(30, dtype=torch.int64, device="cuda").view(10, 3)
    span = encode.span_numel(view.shape, view.stride())
    bufs = [torch.zeros(16384, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    event = module.stage_copies([view, meta], bufs, [span * 4, meta.numel() * 8])
    try:
        module.event_wait(event)
    finally:
        module.event_free(event)
    assert span == 1 + 499 * 8 + 3 * 2
    assert torch.equal(bufs[0][:span * 4].view(torch.int32), base[96:96 + span].cpu())
    assert torch.equal(bufs[1][:240].view(torch.int64).view(10, 3), meta.cpu())
    fresh = torch.zeros(16384, dtype=torch.uint8, pin_memory=True)
    with pytest.raises(RuntimeError, match="past a source's storage"):
        module.stage_copies([meta, view], [fresh, fresh], [8, (4096 - 96) * 4 + 4])
    with pytest.raises(RuntimeError, match="past a source's storage or its buffer"):
        module.stage_copies([base], [fresh[:16]], [64])
    with pytest.raises(RuntimeError, match="one device"):
        module.stage_copies([base, base.cpu()], [fresh, fresh], [4, 4])
    torch.cuda.synchronize()
    assert not fresh.any()  # the refused calls queued nothing


@pytest.mark.gpu
def test_staged_copies_store_a_conjugated_or_negated_view_as_its_values(tmp_path) -> None:
    """``stage_copies`` copies raw bytes; a lazily conjugated (or negated) view's bytes
    are not its values, so it is staged through ``copy_``, which applies the bit, and
    plain tensors, strided views included, are staged raw and stored exactly."""
    import inspect

    from otel_flashinfer.blobs import manifest as manifest_mod

    _fused_module()
    rec = BlobRecorder(Settings(blob_url=str(tmp_path)), install_handlers=False)

    def f(a, b, c):  # noqa: ANN001, ANN202
        return a

    z = torch.randn(6, dtype=torch.complex64, device="cuda")
    strided = torch.arange(40.0, device="cuda").view(5, 8)[:, ::3]
    args = (z.conj(), torch.randn(4, dtype=torch.complex64, device="cuda").conj()._neg_view(),
            strided)
    cap = rec.before("f", __name__, "f", None, 1, 1, None, 1,
                     inspect.signature(f).bind(*args))
    cap.after(args[0], None)
    assert rec.flush(30)
    m = manifest_mod.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    for entry, want in zip([a["value"] for a in m["args"]], args, strict=True):
        flat = encode.decode((tmp_path / entry["key"]).read_bytes(), "safetensors")
        got = encode.rebuild(flat, entry["dtype"], entry["shape"], entry["stride"],
                             entry["storage_offset"])
        assert torch.equal(got, want.resolve_conj().resolve_neg().cpu())
    rec.shutdown(5)
