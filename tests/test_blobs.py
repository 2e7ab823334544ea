"""Blob store, manifests, dedup, limits (threads, processes) and crash paths."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import gc
import hashlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest
import torch

from otel_flashinfer.blobs import encode, layout, manifest, timed_io
from otel_flashinfer.blobs import store as store_mod
from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
from otel_flashinfer.blobs.store import BlobStore, StoreError
from otel_flashinfer.config import Settings


def settings(url, **kw):
    return dataclasses.replace(Settings(blob_url=str(url)), **kw)


def record(rec, fn, trace, span, *args, **kwargs):
    cap = rec.before(fn.__name__, fn.__module__, fn.__qualname__, None, trace, span, None,
                     span, inspect.signature(fn).bind(*args, **kwargs))
    out = fn(*args, **kwargs)
    cap.after(out, None)
    return cap


def add(x, y):
    return x + y


def test_layout_keys_and_listing_order():
    h = "ab" + "0" * 62
    assert layout.object_key(h, "safetensors") == f"objects/ab/{h}.safetensors"
    assert layout.manifest_key(1, 5, 255) == (
        "traces/00000000000000000000000000000001/00000000000000000005-00000000000000ff.json")
    name = "00000000000000000005-00000000000000ff.json"
    assert layout.parse_manifest_name(name) == (5, "ff".zfill(16))
    for bad in ("../x", "objects/ab/../../etc.safetensors", f"objects/cd/{h}.safetensors"):
        with pytest.raises(ValueError):
            layout.check_object_key(bad, h, "safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_encode_keeps_exact_layout(fmt):
    base = torch.arange(120, dtype=torch.float16).reshape(4, 5, 6)
    views = [base, base[1:, ::2, 1:5], base.transpose(0, 2), base.expand(2, 4, 5, 6)[1],
             torch.zeros(0, 3), torch.tensor(3.5)]
    for t in views:
        data = encode.encode(encode.flat_span(t).clone(), fmt)
        flat = encode.decode(data, fmt, allow_pickle=True)  # our own bytes
        back = encode.rebuild(flat, "float16" if t.dtype == torch.float16
                              else encode.dtype_name(t.dtype), list(t.shape), list(t.stride()), 0)
        assert torch.equal(back, t) and back.stride() == t.stride()
        # deterministic bytes: equal contents, equal names
        assert data == encode.encode(encode.flat_span(t).clone(), fmt)


def test_a_view_into_a_staging_buffer_is_encoded_without_a_copy():
    """The writer encodes views into pinned staging buffers bigger than the tensor: the
    object holds exactly the view's bytes (what safetensors itself writes for a copy of
    it), and the payload is the buffer's own memory (a copy per tensor cost the writer
    an allocation and a pass over the bytes, under the GIL the engine needs)."""
    import numpy as np
    from safetensors.torch import load, save

    staging = torch.arange(4096, dtype=torch.uint8)
    for dtype, lo, n in ((torch.float16, 64, 300), (torch.float32, 128, 7), (torch.int64, 0, 1)):
        view = staging[lo:lo + n * torch.empty(0, dtype=dtype).element_size()].view(dtype)
        parts = encode.encode_parts(view, "safetensors")
        data = b"".join(bytes(p) for p in parts)
        assert data == save({"t": view.clone()})
        assert torch.equal(load(data)["t"].view(torch.uint8), view.view(torch.uint8))
        payload = np.frombuffer(parts[1], dtype=np.uint8)
        assert np.shares_memory(payload, staging.numpy())
        # the header is made once per (dtype, length), and is the same bytes each time
        assert encode.encode_parts(view.clone(), "safetensors")[0] is parts[0]


def test_store_not_writable_is_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(StoreError, match=str(ro / "blobs")):
            BlobStore(str(ro / "blobs"))
    finally:
        ro.chmod(0o700)


def test_store_not_writable_root_user(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable") as err:
        BlobStore(str(blocker / "sub"))
    assert str(blocker / "sub") in str(err.value)


def test_manifest_and_objects_read_back(tmp_path):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    x = torch.randn(4, 3)
    cap = record(rec, add, 0xAB, 7, x, 2.0)
    assert rec.flush(10)
    m = manifest.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    assert m["status"] == "ok" and m["api"] == "add" and m["trace_id"] == f"{0xAB:032x}"
    ref = m["args"][0]["value"]
    data = (tmp_path / ref["key"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref["hash"] and len(data) == ref["nbytes"]
    assert torch.equal(encode.decode(data, "safetensors").reshape(4, 3), x)
    assert m["args"][1]["value"] == 2.0
    assert cap.manifest_url == "file://" + str(tmp_path / cap.manifest_key)


def test_dedup_same_bytes_stored_once(tmp_path):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    x = torch.ones(1000)
    for span in range(1, 6):
        record(rec, add, 1, span, x, x)
    assert rec.flush(10)
    objs = list((tmp_path / "objects").rglob("*.safetensors"))
    assert len(objs) == 2  # ones and twos
    assert rec.counters["bytes_written"] == 8000
    assert rec.store.budget.usage() == (5, 8000)


def test_folders_deleted_under_a_store_are_made_again(tmp_path, monkeypatch):
    """Folders are made once (no makedirs per object), yet a store whose folders were
    deleted meanwhile still writes objects, manifests and index entries."""
    import shutil

    store = BlobStore(str(tmp_path / "s"))
    made = []
    real = os.makedirs
    monkeypatch.setattr(store_mod.os, "makedirs",
                        lambda p, *a, **k: (made.append(p), real(p, *a, **k))[1])
    store.put_content(b"a" * 64, "safetensors")
    store.put_content(b"a" * 64, "safetensors")  # known: no write at all
    for name in ("x", "x2", "x3"):
        store.put_marker(f"processes/1-a/calls/{name}")
    store.put_manifest("traces/ab/1.json", b"{}")
    store.put_manifest("traces/ab/2.json", b"{}")
    assert len(made) == len(set(made)) >= 3  # each folder made once, not once a write
    shutil.rmtree(tmp_path / "s" / "objects")
    shutil.rmtree(tmp_path / "s" / "processes")
    digest, key, new = store.put_content(b"c" * 64, "safetensors")
    assert new == 64 and store.get(key) == b"c" * 64
    assert hashlib.sha256(b"c" * 64).hexdigest() == digest
    store.put_marker("processes/1-a/calls/y")
    assert (tmp_path / "s" / "processes" / "1-a" / "calls" / "y").read_bytes() == b""
    store.put_manifest("traces/ab/m.json", b"{}")
    assert store.get("traces/ab/m.json") == b"{}"
    assert not [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]


def test_an_object_is_written_whole_however_short_the_kernels_writes(tmp_path, monkeypatch):
    """Objects go to disk with writev, which may write less than asked: every byte of
    every part lands, in order, whatever the split (here 7 bytes a call, and more
    parts than one writev takes)."""
    real = os.writev
    calls = []

    def short(fd, buffers):
        calls.append(len(buffers))
        flat = b"".join(bytes(b) for b in buffers)[:7]
        return real(fd, [flat])

    monkeypatch.setattr(store_mod.os, "writev", short)
    store = BlobStore(str(tmp_path / "s"))
    parts = [bytes([i]) * (i % 5) for i in range(40)] + [memoryview(bytearray(b"tail"))]
    want = b"".join(bytes(p) for p in parts)
    digest, key, new = store.put_content(parts, "safetensors")
    assert new == len(want) and digest == hashlib.sha256(want).hexdigest()
    assert (tmp_path / "s" / key).read_bytes() == want
    assert len(calls) == -(-len(want) // 7) and max(calls) <= 16


def test_a_process_killed_mid_write_leaves_no_object_file(tmp_path):
    """An object is written unnamed (O_TMPFILE) and linked in whole: a process killed
    in the middle of writing one leaves no file behind, neither a torn object nor a
    temp file that nobody deletes."""
    if not BlobStore(str(tmp_path / "probe"))._unnamed:
        pytest.skip("no O_TMPFILE on this platform")
    script = textwrap.dedent(f"""
        import os, signal
        from otel_flashinfer.blobs import store as store_mod
        real = store_mod.write_all

        def write_then_die(fd, parts, deadline=None):
            real(fd, parts[:1])
            os.kill(os.getpid(), signal.SIGKILL)

        store_mod.write_all = write_then_die
        store = store_mod.BlobStore({str(tmp_path / "s")!r})
        store.put_content([b"a" * 4096, b"b" * 4096], "safetensors")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "s" / "objects").is_dir()  # it got as far as the object's folder
    assert [p for p in (tmp_path / "s" / "objects").rglob("*") if p.is_file()] == []


def test_a_new_manifest_is_linked_in_and_an_existing_one_replaced(tmp_path, monkeypatch):
    """A manifest the writer has not written before is linked in without a rename; one
    that is there after all (a CRASH_SAFE pending manifest) is replaced, not kept."""
    store = BlobStore(str(tmp_path / "s"))
    renamed = []
    real = os.replace
    monkeypatch.setattr(store_mod.os, "replace", lambda a, b: (renamed.append(b), real(a, b)))
    store.put_manifest("traces/ab/1.json", b'{"status": "ok"}', new=True)
    assert (tmp_path / "s" / "traces" / "ab" / "1.json").read_bytes() == b'{"status": "ok"}'
    assert renamed == ([] if store._unnamed else [str(tmp_path / "s/traces/ab/1.json")])
    store.put_manifest("traces/ab/1.json", b'{"status": "crashed"}', new=True)
    assert (tmp_path / "s/traces/ab/1.json").read_bytes() == b'{"status": "crashed"}'
    store.put_manifest("traces/ab/1.json", b'{"status": "x"}')
    assert (tmp_path / "s/traces/ab/1.json").read_bytes() == b'{"status": "x"}'
    assert sorted(p.name for p in (tmp_path / "s/traces/ab").iterdir()) == ["1.json"]


@pytest.mark.parametrize("refuse", ["open", "link", "sandbox"])
def test_a_filesystem_without_unnamed_files_writes_temp_files_instead(tmp_path, monkeypatch,
                                                                       refuse):
    """Where O_TMPFILE is refused (a filesystem without it) or the link through /proc
    is (no /proc mounted; a sandboxed kernel's own error), objects are written to a temp
    file and renamed, and the store stops trying after the first refusal."""
    tried = []
    real_open, real_link = os.open, os.link
    o_tmpfile = getattr(os, "O_TMPFILE", 0)

    def no_unnamed(path, flags, *args, **kwargs):
        if o_tmpfile and flags & o_tmpfile == o_tmpfile:
            tried.append(path)
            if refuse == "open":
                raise OSError(errno.EOPNOTSUPP, "not here")
        return real_open(path, flags, *args, **kwargs)

    def no_proc(src, dst, **kwargs):
        if src.startswith("/proc/self/fd/"):
            if refuse == "sandbox":
                raise OSError(errno.EINVAL, "refused", src)
            raise FileNotFoundError(errno.ENOENT, "no /proc", src)
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(store_mod.os, "open", no_unnamed)
    monkeypatch.setattr(store_mod.os, "link", no_proc)
    store = BlobStore(str(tmp_path / "s"))
    for data in (b"a" * 100, b"b" * 100):
        _, key, new = store.put_content(data, "safetensors")
        assert new == 100 and (tmp_path / "s" / key).read_bytes() == data
    assert len(tried) == (1 if o_tmpfile else 0) and not store._unnamed
    files = [p.name for p in (tmp_path / "s" / "objects").rglob("*") if p.is_file()]
    assert sorted(files) == sorted(f"{hashlib.sha256(d).hexdigest()}.safetensors"
                                   for d in (b"a" * 100, b"b" * 100))


def test_an_object_name_taken_by_a_dangling_link_is_replaced(tmp_path):
    """A name taken by something other than a file (a dangling symlink) does not count
    as the object stored: it is replaced, and the object reads back."""
    store = BlobStore(str(tmp_path / "s"))
    data = b"z" * 100
    key = layout.object_key(hashlib.sha256(data).hexdigest(), "safetensors")
    path = tmp_path / "s" / key
    path.parent.mkdir(parents=True)
    path.symlink_to(tmp_path / "nowhere")
    assert store.put_content(data, "safetensors") == (hashlib.sha256(data).hexdigest(), key,
                                                      100)
    assert not path.is_symlink() and path.read_bytes() == data


def test_the_count_is_seen_spent_without_a_look_and_free_again_after_a_release(tmp_path):
    """``count_spent``, asked by every level-10 call before it describes its arguments:
    true only while a call would surely be refused by the count, in memory (remote
    stores) and with the shared counter file (local ones)."""
    memory = store_mod._Budget(2, 10**9, None)
    assert not memory.count_spent()
    assert memory.reserve(1, 10) is None and memory.reserve(1, 10) is None
    assert memory.count_spent() and memory.reserve(1, 10) == "max_count"
    memory.release(1, 10)
    assert not memory.count_spent() and memory.reserve(1, 10) is None
    shared = store_mod._Budget(2, 10**9, str(tmp_path / "counter"))
    assert shared.reserve(1, 10) is None and shared.reserve(1, 10) is None
    assert shared.reserve(1, 10) == "max_count" and shared.count_spent()
    shared.release(1, 10)
    assert not shared.count_spent() and shared.reserve(1, 10) is None
    shared.close()


@pytest.mark.parametrize("crash_safe", [False, True])
def test_files_are_fsynced_only_when_crash_safe(tmp_path, monkeypatch, crash_safe):
    """Objects and manifests are put into place whole (no reader and no crash of the
    process sees one torn); fsynced first only with CRASH_SAFE, which is for crashes
    that may take the machine: an fsync per new object and per manifest held the
    writers under a decode loop's rate, and calls past the staging budget were lost."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    rec = BlobRecorder(settings(tmp_path, crash_safe=crash_safe), install_handlers=False)
    cap = record(rec, add, 0xAB, 7, torch.arange(12.0), torch.ones(12))
    assert rec.flush(10)
    rec.shutdown(5)
    objects = [p for p in synced if "/objects/" in p]
    manifests = [p for p in synced if p.startswith(str(tmp_path / cap.manifest_key))]
    if crash_safe:  # x, y and the result once each; the pending manifest and the final
        assert len(objects) == 3 and len(manifests) == 2
        # before they got their names: objects unnamed (O_TMPFILE) where the filesystem
        # has it, else temp files renamed after; manifests are replaced by a rename
        unnamed = rec.store._unnamed
        assert all(p.endswith(" (deleted)") if unnamed else ".tmp-" in p for p in objects)
        assert all(".tmp-" in p for p in manifests)
    else:
        assert synced == []
    m = manifest.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    assert m["status"] == "ok" and [a["name"] for a in m["args"]] == ["x", "y"]
    for arg in m["args"]:
        data = (tmp_path / arg["value"]["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == arg["value"]["hash"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_dropped_call_s_pinned_buffers_go_back_only_after_its_copies(tmp_path):
    """A call dropped between its async copies and the writer (a failing store, an
    error after the call) must not hand its pinned buffers back while the GPU may still
    write into them: a writer waits on the call's event first."""
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    released: list[torch.Tensor] = []
    rec.staging.release_pinned = released.append
    done = threading.Event()
    waited: list[int] = []

    class Copies:  # the call's CUDA event: its copies finish when ``done`` is set
        def synchronize(self) -> None:
            done.wait(10)
            waited.append(1)

    from otel_flashinfer.blobs.capture import CallCapture, _Held

    cap = CallCapture(rec, None)
    held = _Held({"t": "tensor"})
    bufs = [torch.empty(16, dtype=torch.uint8), torch.empty(16, dtype=torch.uint8)]
    held.pinned, held.event = list(bufs), Copies()
    cap.held = [held]
    rec._release_held(cap)  # noqa: SLF001 - as _drop does, on the call's thread
    time.sleep(0.2)
    assert released == [] and waited == []  # the copies are still running
    done.set()
    assert rec.flush(10)
    assert waited == [1] and [id(b) for b in released] == [id(b) for b in bufs]
    waited_before = len(waited)
    plain = _Held({"t": "tensor"})  # copies waited for already: back at once
    plain.pinned = [torch.empty(8, dtype=torch.uint8)]
    cap.held = [plain]
    rec._release_held(cap)  # noqa: SLF001
    assert len(released) == 3 and len(waited) == waited_before
    rec.shutdown(5)


def test_recording_cpu_tensors_starts_no_extension_build(tmp_path):
    """The staging extension serves CUDA tensors only: a process that records CPU
    tensors at level 10 must not start building (or loading) it, a thread that imports
    torch's compiler tooling (it ran beside a SIGTERM handler and the test before this
    one timed out once in CI)."""
    code = textwrap.dedent("""
        import inspect, sys, threading, torch
        from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
        from otel_flashinfer.config import Settings
        from otel_flashinfer.stats import kernel
        rec = BlobRecorder(Settings(blob_url=sys.argv[1]), install_handlers=False)
        def add(x, y): return x + y
        c = rec.before("add", "m", "add", None, 9, 1, None, 1,
                       inspect.signature(add).bind(torch.ones(4), 1.0))
        c.after(add(torch.ones(4), 1.0), None)
        assert rec.flush(10)
        print(kernel._thread is None, sorted(t.name for t in threading.enumerate()))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("True "), out.stdout + out.stderr
    assert "otel-fi-stats-build" not in out.stdout


def test_a_folder_that_exists_is_fine_whatever_mkdir_says(tmp_path, monkeypatch):
    """Some filesystems answer mkdir on an existing folder with another error than
    EEXIST (EACCES on a read-only parent, ...): makedirs then settles it."""
    store = BlobStore(str(tmp_path / "s"))
    (tmp_path / "s" / "traces" / "ab").mkdir(parents=True)
    real = os.mkdir

    def mkdir(path, *a, **k):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real(path, *a, **k)

    monkeypatch.setattr(store_mod.os, "mkdir", mkdir)
    store.put_manifest("traces/ab/1.json", b"{}")
    assert store.get("traces/ab/1.json") == b"{}"


def test_concurrent_duplicate_put_leaves_one_intact_object(tmp_path):
    store = BlobStore(str(tmp_path))
    data = encode.encode_parts(torch.arange(300_000, dtype=torch.float32), "safetensors")
    want = b"".join(bytes(p) for p in data)
    barrier = threading.Barrier(6)
    results = []

    def put():
        barrier.wait()
        results.append(store.put_content(data, "safetensors"))

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    digest = hashlib.sha256(want).hexdigest()
    assert {r[:2] for r in results} == {(digest, layout.object_key(digest, "safetensors"))}
    assert sorted(r[2] for r in results) == [0] * 5 + [len(want)]  # counted once
    files = [f for f in (tmp_path / "objects").rglob("*") if f.is_file()]
    assert [f.name for f in files] == [f"{digest}.safetensors"]  # no temp files left
    assert files[0].read_bytes() == want


def test_two_writers_store_every_call_and_flush_waits(tmp_path):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False, writers=2)
    caps = [record(rec, add, 3, span, torch.full((50_000,), float(span % 7)), 1.0)
            for span in range(1, 41)]
    assert rec.flush(30)
    assert len(rec._threads) == 2
    assert all(c.done.is_set() and c.skipped is None for c in caps)
    assert rec.counters["manifests"] == 40
    for span, cap in enumerate(caps, 1):
        m = json.loads((tmp_path / cap.manifest_key).read_text())
        x = m["args"][0]["value"]
        flat = encode.decode((tmp_path / x["key"]).read_bytes(), "safetensors")
        assert torch.equal(flat, torch.full((50_000,), float(span % 7)))
    # inputs hold 0..6, outputs (x + 1) 1..7: 8 distinct contents, each stored and
    # counted once although the two writers race on them
    assert len(list((tmp_path / "objects").rglob("*.safetensors"))) == 8
    assert rec.counters["bytes_written"] == 8 * 200_000


def test_count_limit_exact_under_threads(tmp_path):
    rec = BlobRecorder(settings(tmp_path, blob_max_count=37), install_handlers=False)
    caps = []
    lock = threading.Lock()

    def worker(k):
        for i in range(20):
            c = record(rec, add, 2, k * 100 + i + 1, torch.full((8,), float(k * 100 + i)), 1.0)
            with lock:
                caps.append(c)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.flush(30)
    kept = [c for c in caps if c.skipped is None]
    assert len(kept) == 37
    assert {c.skipped for c in caps if c.skipped} == {"max_count"}
    assert len(list((tmp_path / "traces").rglob("*.json"))) == 37


def test_byte_limit(tmp_path):
    rec = BlobRecorder(settings(tmp_path, blob_max_gb=10_000 / 1024**3), install_handlers=False)
    a = record(rec, add, 3, 1, torch.zeros(1000), torch.zeros(1))  # output dedups: 4004 kept
    assert rec.flush(10) and rec.store.budget.usage() == (1, 4004)
    b = record(rec, add, 3, 2, torch.ones(1000), torch.zeros(1))  # 8004 + 4000 out > 10000
    assert rec.flush(10) and rec.store.budget.usage() == (2, 8004)
    c = record(rec, add, 3, 3, torch.full((1000,), 2.0), torch.zeros(1))
    assert rec.flush(10)
    assert a.skipped is None and b.skipped is None and c.skipped == "max_bytes"
    mb = json.loads((tmp_path / b.manifest_key).read_text())
    assert mb["skipped"] == "max_bytes" and mb["result"] is None
    assert rec.store.budget.usage()[1] <= 10_000


def test_staging_full_skips(tmp_path):
    rec = BlobRecorder(settings(tmp_path), staging_mb=0.001, install_handlers=False)
    cap = record(rec, add, 4, 1, torch.zeros(10_000), 1.0)
    assert cap.skipped == "staging_full"
    assert rec.store.budget.usage() == (0, 0)


def test_while_staging_is_too_full_calls_skip_before_describing_their_arguments(
        tmp_path, monkeypatch):
    """With the writers behind (here: one blocked on the store), a call that would not
    fit is skipped as ``staging_full`` before its arguments are described and copied,
    judged by what the API's last kept call took; one call tries all the same every
    STAGING_PROBE_S, so smaller calls that fit are kept again; once the writer catches
    up, so is every call."""
    from otel_flashinfer.blobs import capture as capture_mod

    described = []
    real = capture_mod._arguments
    monkeypatch.setattr(capture_mod, "_arguments",
                        lambda bound: (described.append(1), real(bound))[1])
    monkeypatch.setattr(capture_mod, "STAGING_PROBE_S", 3600.0)  # no probe until said
    rec = BlobRecorder(settings(tmp_path), staging_mb=0.06, install_handlers=False)
    gate = threading.Event()
    real_put = rec.store.put_content
    monkeypatch.setattr(rec.store, "put_content",
                        lambda *a: (gate.wait(30), real_put(*a))[1])
    try:
        first = record(rec, add, 7, 1, torch.ones(10_000), 1.0)  # 40 KB of a 61 KB staging
        assert first.skipped is None
        later = [record(rec, add, 7, 2 + i, torch.full((10_000,), float(i)), 1.0)
                 for i in range(20)]
        assert {c.skipped for c in later} == {"staging_full"}
        small = record(rec, add, 7, 50, torch.ones(100), 1.0)  # 400 bytes would fit
        assert small.skipped == "staging_full"
        assert len(described) == 1  # the first call's arguments only
        assert rec.counters["skipped.staging_full"] == 21
        monkeypatch.setattr(capture_mod, "STAGING_PROBE_S", 0.0)  # the probe's turn
        small = record(rec, add, 7, 51, torch.ones(100), 1.0)
        assert small.skipped is None and len(described) == 2
    finally:
        gate.set()
    assert rec.flush(10)
    kept = record(rec, add, 7, 99, torch.full((10_000,), 5.0), 1.0)
    assert kept.skipped is None and rec.flush(10)
    assert rec.counters["manifests"] == 3
    rec.shutdown(5)


def test_outputs_that_do_not_fit_keep_the_inputs(tmp_path):
    """The outputs' copy failing (staging full) costs the result, not the inputs already
    taken: the manifest still has them, and every staged byte goes back."""
    rec = BlobRecorder(settings(tmp_path), staging_mb=0.05, install_handlers=False)

    def grow(x):
        return x.repeat(20)  # 20x the input: past the staging budget

    x = torch.arange(1000, dtype=torch.float32)
    cap = record(rec, grow, 4, 1, x)
    assert rec.flush(10)
    assert cap.skipped is None
    m = json.loads((tmp_path / cap.manifest_key).read_text())
    assert m["skipped"] == "staging_full" and m["result"] is None
    (arg,) = m["args"]
    data = (tmp_path / arg["value"]["key"]).read_bytes()
    assert torch.equal(encode.decode(data, "safetensors"), x)
    assert rec.staging.used == 0
    rec.shutdown(5)


@pytest.mark.parametrize("failing", [2, 3])  # the second input's copy; the output's
def test_a_copy_that_fails_gives_its_budget_back(tmp_path, monkeypatch, failing):
    """Not a _Skip: an error such as running out of device memory while copying. The
    call goes on, and what it reserved in the store's budget (kept in a file, shared by
    processes) and in staging goes back."""
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    to_host = rec._to_host
    seen = [0]

    def boom(cap, held, src, **kw):  # noqa: ANN001, ANN003, ANN202
        seen[0] += 1
        if seen[0] == failing:
            raise RuntimeError("simulated out of memory")
        return to_host(cap, held, src, **kw)

    monkeypatch.setattr(rec, "_to_host", boom)
    x, y = torch.arange(1000, dtype=torch.float32), torch.ones(1000)
    cap = record(rec, add, 1, 1, x, y)
    assert rec.flush(10)
    if failing == 2:  # in before: the call is not kept
        assert cap.skipped == "error"
        assert rec.store.budget.usage() == (0, 0)
    else:  # the output: the inputs are kept, the result is not
        assert cap.skipped is None
        m = json.loads((tmp_path / cap.manifest_key).read_text())
        assert m["skipped"] == "error" and m["result"] is None and len(m["args"]) == 2
        assert rec.store.budget.usage() == (1, 8000)  # what was written, nothing more
    assert rec.staging.used == 0
    rec.shutdown(5)


CHILD_COUNT = textwrap.dedent('''
    import dataclasses, inspect, sys, torch
    from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
    from otel_flashinfer.config import Settings
    s = dataclasses.replace(Settings(blob_url=sys.argv[1]), blob_max_count=int(sys.argv[2]))
    rec = BlobRecorder(s, install_handlers=False)
    def add(x, y): return x + y
    kept = 0
    for i in range(40):
        x = torch.full((16,), float(i + 1000 * int(sys.argv[3])))
        cap = rec.before("add", "m", "add", None, 5, 1 + i + 1000 * int(sys.argv[3]), None, i,
                         inspect.signature(add).bind(x, 1.0))
        cap.after(add(x, 1.0), None)
        kept += cap.skipped is None
    rec.flush(30)
    print(kept)
''')


def test_count_limit_across_two_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_COUNT, str(tmp_path), "50", str(k)],
                              stdout=subprocess.PIPE, text=True, env=env) for k in (1, 2)]
    kept = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(kept) == 50
    assert len(list((tmp_path / "traces").rglob("*.json"))) == 50


# ---- the store budget's per-process lease ------------------------------------------------

def _counter(path) -> tuple[int, int]:
    """What the shared counter file holds: reservations and leases of every process."""
    counter = path / layout.USAGE_DIR / "counter"
    raw = counter.read_bytes() if counter.exists() else b""
    return store_mod._COUNTER.unpack(raw) if raw else (0, 0)


def _budget(path, max_count=640, max_bytes=64_000) -> store_mod._Budget:
    return store_mod._Budget(max_count, max_bytes, str(path / layout.USAGE_DIR / "counter"))


def _lease(budget) -> tuple[int, int]:
    return budget._lease.calls, budget._lease.nbytes


def test_budgets_of_two_processes_never_exceed_the_limits(tmp_path):
    """Two budgets over one counter file, as two processes have: whatever the mix of
    reservations and releases, what they hand out stays within both limits, and the file
    counts exactly what is reserved plus what each holds as lease."""
    rng = random.Random(7)
    budgets = [_budget(tmp_path, max_count=256), _budget(tmp_path, max_count=256)]
    out = [[0, 0], [0, 0]]  # per budget: calls, bytes reserved and not released
    refused = set()
    for _ in range(3000):
        k = rng.randrange(2)
        b, o = budgets[k], out[k]
        op = rng.random()
        if op < 0.6:
            calls, nbytes = rng.choice([(1, rng.randrange(0, 300)), (0, rng.randrange(1, 2000))])
            reason = b.reserve(calls, nbytes)
            if reason is None:
                o[0] += calls
                o[1] += nbytes
            refused.add(reason)
        elif op < 0.9:  # what dedup saved
            nbytes = rng.randrange(0, min(o[1], 1500) + 1)
            b.release(0, nbytes)
            o[1] -= nbytes
        elif o[0]:  # a call dropped
            nbytes = rng.randrange(0, min(o[1], 1500) + 1)
            b.release(1, nbytes)
            o[0] -= 1
            o[1] -= nbytes
        calls = out[0][0] + out[1][0]
        nbytes = out[0][1] + out[1][1]
        assert calls <= 256 and nbytes <= 64_000
        leases = [_lease(x) for x in budgets]
        assert _counter(tmp_path) == (calls + leases[0][0] + leases[1][0],
                                      nbytes + leases[0][1] + leases[1][1])
        assert budgets[k].usage() == (calls + leases[1 - k][0], nbytes + leases[1 - k][1])
    assert {"max_count", "max_bytes"} <= refused  # both limits were reached
    for b in budgets:
        b.close()
    assert _counter(tmp_path) == (out[0][0] + out[1][0], out[0][1] + out[1][1])


def test_no_lease_is_kept_at_the_edge_of_the_budget(tmp_path):
    """Near a limit a budget keeps no lease: one process can fill the budget to the last
    call, and what it gives back there is at once there for another."""
    a, b = _budget(tmp_path), _budget(tmp_path)
    kept = 0
    while a.reserve(1, 10) is None:
        kept += 1
    assert kept == 640 and _lease(a)[0] == 0  # the bytes are far from their limit
    assert _counter(tmp_path)[0] == 640 and a.usage() == (640, 6400)
    a.release(1, 10)
    assert _counter(tmp_path)[0] == 639 and a.usage() == (639, 6390)
    assert b.reserve(1, 10) is None and b.reserve(1, 10) == "max_count"
    assert _counter(tmp_path)[0] == 640
    c = _budget(tmp_path / "bytes")
    kept = 0
    while c.reserve(0, 1000) is None:
        kept += 1
    assert kept == 64 and c.usage() == (0, 64_000) and _lease(c)[1] == 0


def test_small_reservations_seldom_lock_the_counter_file(tmp_path, monkeypatch):
    """The point of the lease: N reservations and releases as the recorder makes them
    (one call and its bytes, then what dedup saved) take far fewer than N file locks."""
    locks = []
    lockf = fcntl.lockf

    def counting(fd, how, *args):  # noqa: ANN001, ANN002, ANN202
        if how == fcntl.LOCK_EX:
            locks.append(how)
        return lockf(fd, how, *args)

    budget = _budget(tmp_path, max_count=1000, max_bytes=10**9)
    monkeypatch.setattr(fcntl, "lockf", counting)
    n = 400
    for _ in range(n):
        assert budget.reserve(1, 4096) is None
        budget.release(0, 4000)
    assert len(locks) <= n // 8 + 5  # a refill every 8 calls, and a look every 0.1 s
    assert budget.usage() == (n, n * 96)
    while budget.reserve(1, 0) is None:
        pass
    locks.clear()
    for _ in range(n):  # over the limit: the refusal stands a while without a look
        assert budget.reserve(1, 0) == "max_count"
    assert len(locks) <= 5
    budget.close()
    assert _counter(tmp_path) == (1000, n * 96)


CHILD_LEASE = textwrap.dedent('''
    import random, sys
    from otel_flashinfer.blobs.store import BlobStore
    store = BlobStore(sys.argv[1], max_count=2560, max_bytes=1_000_000)
    rng = random.Random(int(sys.argv[2]))
    calls = nbytes = 0
    for _ in range(1500):
        n = rng.randrange(0, 1000)
        if store.budget.reserve(1, n) is None:
            saved = rng.randrange(0, n + 1)
            store.budget.release(0, saved)
            calls, nbytes = calls + 1, nbytes + n - saved
    print(calls, nbytes)
''')


def test_leases_of_concurrent_processes_stay_within_the_limits(tmp_path):
    """Three processes at once, each leasing from one counter file: together they keep no
    more than the limits allow, and once they exit the file counts what they kept."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD_LEASE, str(tmp_path), str(k)],
                              stdout=subprocess.PIPE, text=True, env=env) for k in range(3)]
    kept = [tuple(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    calls, nbytes = sum(k[0] for k in kept), sum(k[1] for k in kept)
    assert calls <= 2560 and nbytes <= 1_000_000
    assert calls + 3 * 16 >= 2560 or nbytes + 3 * 62_500 >= 1_000_000  # a limit was reached
    assert _counter(tmp_path) == (calls, nbytes)


def test_usage_excludes_the_lease_and_close_gives_it_back(tmp_path):
    budget = _budget(tmp_path)
    assert budget.reserve(1, 100) is None
    assert _lease(budget) > (0, 0)
    assert _counter(tmp_path) == (1 + _lease(budget)[0], 100 + _lease(budget)[1])
    assert budget.usage() == (1, 100)
    budget.close()
    assert _counter(tmp_path) == (1, 100) and _lease(budget) == (0, 0)
    assert budget.reserve(1, 100) is None  # still usable, straight on the file
    assert _counter(tmp_path) == (2, 200) and budget.usage() == (2, 200)
    store = BlobStore(str(tmp_path))  # BlobStore.close, and a budget collected
    assert store.budget.reserve(1, 1) is None and _counter(tmp_path) > (3, 201)
    store.close()
    assert _counter(tmp_path) == (3, 201)
    again = _budget(tmp_path)
    assert again.reserve(1, 1) is None and _counter(tmp_path) > (4, 202)
    del again
    gc.collect()
    assert _counter(tmp_path) == (4, 202)


def test_the_lease_goes_back_at_exit(tmp_path):
    code = textwrap.dedent('''
        import sys
        from otel_flashinfer.blobs.store import BlobStore
        store = BlobStore(sys.argv[1])
        assert store.budget.reserve(1, 100) is None
        assert store.budget._lease.calls > 0
    ''')
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    assert _counter(tmp_path) == (1, 100)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_lease(tmp_path):
    """The parent's lease is counted in the file once: a child spending it too would
    overrun the limits, so the child starts empty and leases its own."""
    budget = _budget(tmp_path)
    assert budget.reserve(1, 100) is None
    parent_lease = _lease(budget)
    assert parent_lease > (0, 0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            empty = _lease(budget)
            sees = budget.usage()  # the parent's lease counts as used here
            ok = budget.reserve(1, 100) is None
            budget.close()
            os.write(write, json.dumps([empty, sees, ok]).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    empty, sees, ok = json.loads(os.read(read, 4096).decode())
    os.close(read)
    assert empty == [0, 0] and ok
    assert sees == [1 + parent_lease[0], 100 + parent_lease[1]]
    assert _lease(budget) == parent_lease
    assert budget.usage() == (2, 200)
    budget.close()
    assert _counter(tmp_path) == (2, 200)


def test_a_budget_that_missed_the_fork_hook_drops_the_parents_lease(tmp_path):
    """The same without ``os.register_at_fork`` having run: the pid seen at the next look
    tells the budget it is in a new process."""
    budget = _budget(tmp_path)
    assert budget.reserve(1, 100) is None
    parent_lease = _lease(budget)
    budget._lease._pid = -1  # as if forked
    assert budget.usage() == (1 + parent_lease[0], 100 + parent_lease[1])
    assert _lease(budget) == (0, 0)


CHILD_TERM = textwrap.dedent('''
    import inspect, signal, sys, time, torch
    from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
    from otel_flashinfer.config import Settings
    seen = []
    signal.signal(signal.SIGTERM, lambda s, f: (seen.append(s), print("app handler", flush=True),
                                                sys.exit(3)))
    rec = BlobRecorder(Settings(blob_url=sys.argv[1]))
    def slow(x):
        print("running", flush=True)
        # Short sleeps: the kernel may deliver SIGTERM to a writer thread, and then
        # CPython runs the handler only when the main thread next wakes up.
        for _ in range(1200):
            time.sleep(0.05)
        return x
    def add(x, y): return x + y
    for i in range(5):
        x = torch.full((64,), float(i))
        c = rec.before("add", "m", "add", None, 6, i + 1, None, i,
                       inspect.signature(add).bind(x, 1.0))
        c.after(add(x, 1.0), None)
    x = torch.arange(32.)
    c = rec.before("slow", "m", "slow", None, 6, 99, None, 99, inspect.signature(slow).bind(x))
    slow(x)
''')


def test_sigterm_mid_call_leaves_complete_manifests(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.Popen([sys.executable, "-c", CHILD_TERM, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "running"
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3 and "app handler" in out  # the app's handler still ran
    store = BlobStore(str(tmp_path), check_writable=False)
    keys = store.list_manifests(6)
    assert len(keys) == 6
    for key in keys:
        m = manifest.parse(store.get(key), key)
        for obj in manifest.manifest_objects(m):
            data = store.get(obj["key"])
            assert hashlib.sha256(data).hexdigest() == obj["hash"]
    last = manifest.parse(store.get(keys[-1]), keys[-1])
    assert last["status"] == "crashed" and last["span_id"] == f"{99:016x}"
    ref = last["args"][0]["value"]
    assert torch.equal(encode.decode(store.get(ref["key"]), "safetensors"), torch.arange(32.))


CHILD_TERM_GRACEFUL = textwrap.dedent('''
    import inspect, json, os, signal, sys, time, torch
    from otel_flashinfer.blobs.capture import BlobRecorder
    from otel_flashinfer.config import Settings
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))  # a graceful stop: a flag
    rec = BlobRecorder(Settings(blob_url=sys.argv[1]))
    def step(x):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the call runs
        time.sleep(0.05)
        return x * 2
    x = torch.ones(4)
    c = rec.before("step", "m", "step", None, 7, 1, None, 1, inspect.signature(step).bind(x))
    c.after(step(x), None)
    assert stop and rec.flush(10)
    print(json.dumps({"key": c.manifest_key, "skipped": c.skipped}), flush=True)
''')


def test_sigterm_an_application_handles_leaves_its_calls_to_complete(tmp_path):
    """An application that stops gracefully on SIGTERM (its handler returns): the call
    in flight completes with its outputs.  It was recorded as crashed, result null."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", CHILD_TERM_GRACEFUL, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["skipped"] is None
    m = manifest.parse((tmp_path / report["key"]).read_bytes(), report["key"])
    assert m["status"] == "ok" and m["result"]["t"] == "tensor"


CHILD_TERM_DEFAULT = textwrap.dedent('''
    import inspect, sys, time, torch
    from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
    from otel_flashinfer.config import Settings
    rec = BlobRecorder(Settings(blob_url=sys.argv[1]))
    def add(x, y): return x + y
    for i in range(3):
        x = torch.full((64,), float(i))
        c = rec.before("add", "m", "add", None, 9, i + 1, None, i,
                       inspect.signature(add).bind(x, 1.0))
        c.after(add(x, 1.0), None)
    rec.before("add", "m", "add", None, 9, 99, None, 99,
               inspect.signature(add).bind(torch.arange(32.), 1.0))
    assert rec.store.budget._lease.calls > 0
    print("ready", flush=True)
    for _ in range(600):  # short sleeps: a signal the kernel hands to another thread
        time.sleep(0.1)   # wakes no sleeping main thread, whose handler then waits
''')


def test_sigterm_by_default_leaves_no_lease_counted(tmp_path):
    """SIGTERM with its default action runs no atexit: the handler gives the budget's
    lease back before the process dies, so the counter file holds the calls kept."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.Popen([sys.executable, "-c", CHILD_TERM_DEFAULT, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    os.kill(p.pid, signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM
    assert len(BlobStore(str(tmp_path), check_writable=False).list_manifests(9)) == 4
    assert _counter(tmp_path)[0] == 4


def test_atexit_completes_inflight(tmp_path):
    code = textwrap.dedent('''
        import inspect, sys, torch
        from otel_flashinfer.blobs.capture import BlobRecorder, StoreBreaker
        from otel_flashinfer.config import Settings
        rec = BlobRecorder(Settings(blob_url=sys.argv[1]))
        def f(x): return x
        rec.before("f", "m", "f", None, 7, 1, None, 1, inspect.signature(f).bind(torch.ones(3)))
    ''')
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=60)
    store = BlobStore(str(tmp_path), check_writable=False)
    (key,) = store.list_manifests(7)
    assert manifest.parse(store.get(key), key)["status"] == "crashed"
    assert _counter(tmp_path)[0] == 1  # the budget's lease went back at exit too


def test_crash_safe_writes_pending_before_call(tmp_path):
    rec = BlobRecorder(settings(tmp_path, crash_safe=True), install_handlers=False)
    seen = {}

    def probe(x):
        seen["m"] = json.loads((tmp_path / cap.manifest_key).read_text())
        return x * 2

    x = torch.ones(5)
    cap = rec.before("probe", "m", "probe", None, 8, 1, None, 1,
                     inspect.signature(probe).bind(x))
    out = probe(x)
    cap.after(out, None)
    assert rec.flush(10)
    assert seen["m"]["status"] == "pending" and seen["m"]["args"][0]["value"]["hash"]
    assert json.loads((tmp_path / cap.manifest_key).read_text())["status"] == "ok"


def test_write_failure_marks_call_and_engine_goes_on(tmp_path):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)

    def boom(key, data):
        raise OSError("disk full")

    rec.store.put_object = boom
    cap = record(rec, add, 9, 1, torch.ones(3), 1.0)
    assert rec.flush(10)
    assert cap.skipped == "write_failed" and rec.counters["write_failures"] == 1
    assert not (tmp_path / cap.manifest_key).exists()


def test_store_breaker_pauses_probes_and_backs_off():
    b = StoreBreaker()
    g = b.admit(0.0)
    assert not b.refuses(0.0) and g is not None  # closed: every call, every write
    late = b.admit(0.0)  # a write admitted before the breaker opens
    b.failed(10.0, g)
    assert b.refuses(10.5) and b.admit(10.5) is None  # open for the first pause
    b.succeeded(late)  # its result is stale: it neither closes the breaker ...
    b.failed(10.5, late)  # ... nor doubles the pause
    assert b.pause == StoreBreaker.FIRST_PAUSE_S and b.refuses(10.5)
    assert not b.refuses(11.0)  # the pause is over: the next queued write probes ...
    probe = b.admit(11.0)
    assert probe is not None
    assert b.refuses(11.0) and b.admit(11.0) is None  # ... alone: the others still skip
    b.failed(17.0, probe)  # the probe failed (after the client's retries): twice the pause
    assert b.refuses(18.9) and not b.refuses(19.0)
    for t in range(20):
        b.failed(100.0 + t, b.admit(1e9))
    assert b.pause == StoreBreaker.MAX_PAUSE_S
    probe = b.admit(1e9)
    b.inconclusive(probe)  # the probe broke on its own bytes, not the store's
    assert not b.refuses(1e9)
    probe = b.admit(1e9)
    b.succeeded(probe)
    assert not b.refuses(1e9) and b.pause == 0.0
    b.failed(2e9, b.admit(2e9))
    assert b.pause == StoreBreaker.FIRST_PAUSE_S  # a success starts the back-off over


class _ClientError(Exception):
    """What s3fs's client raises for a dead endpoint: not an OSError."""


@pytest.mark.parametrize("error", [OSError, _ClientError])
def test_while_the_store_fails_calls_skip_without_copying(tmp_path, monkeypatch, error):
    """Before: every call was copied and queued, and every queued write retried the dead
    store for seconds (the client's retries) before it failed, also at exit."""
    monkeypatch.setattr(StoreBreaker, "FIRST_PAUSE_S", 3600.0)
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    tries = []
    real_put = rec.store.put_object
    gate = threading.Event()

    def boom(key, data):
        tries.append(key)
        gate.wait(10)  # the client retrying the dead store
        raise error("store down")

    rec.store.put_object = boom
    first = [record(rec, add, 9, 1 + i, torch.ones(3) + i, 1.0) for i in range(6)]
    deadline = time.monotonic() + 10
    while len(tries) < rec.writers and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    assert rec.flush(10)
    # The writes in flight when it failed fail; those queued behind them are dropped
    # without a write.
    assert len(tries) == rec.writers
    assert sorted(c.skipped for c in first) == (["store_down"] * (6 - rec.writers)
                                               + ["write_failed"] * rec.writers)
    # Open: the next calls keep their spans and skip their payloads at the call.
    caps = [record(rec, add, 9, 10 + i, torch.ones(1000), 1.0) for i in range(5)]
    assert [c.skipped for c in caps] == ["store_down"] * 5
    assert rec.staging.used == 0 and not rec._queue and len(tries) == rec.writers
    assert rec.counters["skipped.store_down"] == 5 + 6 - rec.writers
    # After the pause one call probes; the store is back, so calls are kept again.
    rec.store.put_object = real_put
    rec.breaker.until = 0.0
    probe = record(rec, add, 9, 20, torch.ones(3), 1.0)
    assert rec.flush(10) and probe.skipped is None
    assert (tmp_path / probe.manifest_key).exists()
    kept = record(rec, add, 9, 21, torch.full((3,), 2.0), 1.0)
    assert rec.flush(10) and kept.skipped is None and rec.breaker.pause == 0.0


def test_an_encoding_error_does_not_open_the_breaker(tmp_path, monkeypatch):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)

    def broken(*args, **kwargs):
        raise ValueError("cannot encode")

    monkeypatch.setattr(encode, "encode_parts", broken)
    cap = record(rec, add, 9, 1, torch.ones(3), 1.0)
    assert rec.flush(10) and cap.skipped == "write_failed"
    assert rec.breaker.pause == 0.0 and not rec.breaker.refuses(time.monotonic())


def test_pending_protocol_sets_attributes(tmp_path):
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)

    class Rec:
        attributes: dict

    r = Rec()
    r.attributes = {}
    cap = record(rec, add, 10, 1, torch.ones(3), 1.0)
    p = cap.pending(r)
    deadline = time.monotonic() + 10
    while not p.ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    p.apply(r)
    assert r.attributes == {"flashinfer.blob.manifest": cap.manifest_url}


def test_a_refused_reservation_gives_the_lease_back(tmp_path):
    """Refused at the edge of the budget: the process keeps no lease, so what is left
    goes to whichever process asks next."""
    budget = _budget(tmp_path, max_count=640, max_bytes=64_000)
    assert budget.reserve(1, 100) is None and _lease(budget) > (0, 0)
    assert budget.reserve(1, 100_000) == "max_bytes"
    assert _lease(budget) == (0, 0) and _counter(tmp_path) == (1, 100)
    other = _budget(tmp_path, max_count=640, max_bytes=64_000)
    assert other.reserve(1, 63_900) is None  # all of the rest, none held by the first
    assert other.usage() == (2, 64_000)


def test_a_release_after_close_reaches_the_file(tmp_path):
    """A lease used up exactly, then closed: later releases go to the file at once."""
    budget = _budget(tmp_path, max_count=640, max_bytes=64_000)
    assert budget.reserve(1, 1000) is None
    calls, nbytes = _lease(budget)
    assert budget.reserve(calls, nbytes) is None and _lease(budget) == (0, 0)
    budget.close()
    budget.release(1, 500)
    assert _lease(budget) == (0, 0)
    assert _counter(tmp_path) == (calls, 500 + nbytes)


def test_a_multiprocessing_child_gives_its_lease_back(tmp_path):
    """multiprocessing's fork children end in os._exit (no atexit): the lease still
    goes back through its exit finalizers."""
    import multiprocessing

    def child(root: str) -> None:
        store = BlobStore(root)
        assert store.budget.reserve(1, 100) is None
        assert store.budget._lease.calls > 0  # noqa: SLF001 - a lease to give back

    process = multiprocessing.get_context("fork").Process(target=child,
                                                          args=(str(tmp_path),))
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert _counter(tmp_path) == (1, 100)


def test_an_idle_writer_gives_the_lease_back(tmp_path):
    """Half a second without calls and the lease is back in the file, flush or not."""
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    cap = record(rec, add, 1, 1, torch.ones(10), torch.ones(10))
    assert cap.done.wait(10)
    deadline = time.monotonic() + 5
    while _counter(tmp_path) != (1, 80) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counter(tmp_path) == (1, 80)  # ones once (x is y's bytes), twos once
    rec.shutdown(5)


def test_crash_safe_keeps_no_lease(tmp_path):
    rec = BlobRecorder(settings(tmp_path, crash_safe=True), install_handlers=False)
    cap = record(rec, add, 1, 1, torch.ones(10), torch.ones(10))
    assert cap.done.wait(10)
    assert rec.store.budget._lease.calls == 0  # noqa: SLF001
    assert _counter(tmp_path)[0] == 1
    rec.shutdown(5)


def test_level10_call_with_arguments_the_api_refuses(spans, tmp_path):
    """The user's TypeError comes out as it is, the call still gets its error span, and
    the recorder says why there is no payload (not an internal error of ours)."""
    import otel_flashinfer
    from otel_flashinfer import health

    health.reset()
    otel_flashinfer.instrument(level=10, blob_url=str(tmp_path / "s"), journal_dir="")
    two = otel_flashinfer.traced(lambda x, y: x, name="two")
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        two(torch.ones(2))
    (span,) = spans.by_name("two")
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["flashinfer.blob.skipped"] == "bad_arguments"
    assert "wrapper_errors" not in health.counters()


def test_level10_payloads_written_and_skipped_show_in_counters(spans, tmp_path):
    """counters() says what the recorder wrote and skipped, and why (blob.*): a store
    that turns read-only mid-run must not fail silently."""
    import otel_flashinfer

    store = tmp_path / "s"
    otel_flashinfer.instrument(level=10, blob_url=str(store), journal_dir="")
    f = otel_flashinfer.traced(lambda x: x, name="f")
    f(torch.ones(3))
    assert otel_flashinfer.flush(10)
    got = otel_flashinfer.counters()
    # the result is the argument itself: one object, stored once
    assert got["blob.manifests"] == 1 and got["blob.bytes_written"] == 12
    otel_flashinfer.instrument(level=10, blob_url=str(store), journal_dir="",
                               blob_exclude=["f"])
    f(torch.ones(3))
    got = otel_flashinfer.counters()  # a new runtime: its own recorder's counts
    assert got["blob.skipped.filtered"] == 1 and "blob.manifests" not in got


def test_once_the_count_is_spent_calls_skip_before_describing_their_arguments(
        spans, tmp_path, monkeypatch):
    """Past BLOB_MAX_COUNT (1,000 calls by default, reached within seconds by a decode
    loop) every call is skipped: it is told so before its arguments are bound and
    described, which had cost each call more than its level-5 statistics.  The spans
    still say why, and a call is kept again once budget comes back."""
    import otel_flashinfer
    from otel_flashinfer.blobs import capture as capture_mod

    described = []
    real = capture_mod._arguments
    monkeypatch.setattr(capture_mod, "_arguments",
                        lambda bound: (described.append(1), real(bound))[1])
    otel_flashinfer.instrument(level=10, blob_url=str(tmp_path / "s"), journal_dir="",
                               blob_max_count=2)
    f = otel_flashinfer.traced(lambda x: x, name="f")
    t0 = time.monotonic()
    for i in range(40):
        f(torch.full((3,), float(i)))
    looks = 1 + int((time.monotonic() - t0) / store_mod._FRESH_S)
    assert otel_flashinfer.flush(10)
    got = otel_flashinfer.counters()
    assert got["blob.manifests"] == 2 and got["blob.skipped.max_count"] == 38
    # the two kept, then a refusal after describing them once a _FRESH_S at most
    assert len(described) <= 2 + looks < 40, (len(described), looks)
    # kept spans wait for their manifests, skipped ones do not: in call order
    finished = sorted(spans.by_name("f"), key=lambda s: s.start_time)
    assert [s.attributes.get("flashinfer.blob.skipped") for s in finished] == \
        [None, None] + ["max_count"] * 38
    assert all("flashinfer.blob.manifest" in s.attributes for s in finished[:2])
    from otel_flashinfer import runtime

    runtime.current().blobs.store.budget.release(1, 0)  # a write that failed, say
    time.sleep(0.15)  # past the refusal's _FRESH_S
    f(torch.full((3,), 99.0))
    assert otel_flashinfer.flush(10)
    got = otel_flashinfer.counters()
    assert got["blob.manifests"] == 3 and got["blob.skipped.max_count"] == 38


def test_blob_url_of_a_missing_fsspec_package_names_the_variable(tmp_path):
    """gs:// is a protocol fsspec knows, but gcsfs is not installed: instrument() says
    which variable and which package, instead of a traceback at the first blob."""
    pytest.importorskip("flashinfer")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    code = ("import otel_flashinfer as o\n"
            "try:\n    o.instrument(level=10, blob_url='gs://bucket/x')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OTEL_FLASHINFER_LEVEL": ""})
    assert out.stdout.startswith("ConfigError OTEL_FLASHINFER_BLOB_URL='gs://bucket/x': "), (
        out.stdout, out.stderr)
    assert "gcsfs" in out.stdout and "Traceback" not in out.stderr


HOLD_COUNTER_LOCK = textwrap.dedent('''
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
''')


def _hold_counter_lock(path, seconds: float) -> subprocess.Popen:
    """Another process sharing the store, holding the counter file's lock (its writer
    on a slow disk, or a process stopped mid-look)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_COUNTER_LOCK, str(path / layout.USAGE_DIR / "counter"),
         str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _before_while_held(rec, tmp_path, trace: int, x: torch.Tensor):  # noqa: ANN001, ANN202
    """(capture, seconds the call's ``before`` took) for ``add(x, 1.0)`` while another
    process holds the counter file's lock for a second."""
    holder = _hold_counter_lock(tmp_path, 1.0)
    try:
        t0 = time.perf_counter()
        cap = rec.before("add", "m", "add", None, trace, 2, None, 0,
                         inspect.signature(add).bind(x, 1.0))
        return cap, time.perf_counter() - t0
    finally:
        holder.wait()


def test_calls_never_wait_on_a_slow_counter_file(tmp_path, monkeypatch):
    """A shared file system that takes 30 ms to read the counter file: once a look has
    found it slow, no call looks itself or waits for a look (the lease is topped up
    ahead, on a thread of its own, once half of it is spent), and most calls are still
    served from the lease.  Before, each call that found the lease spent read and wrote
    the file itself: 30 ms and more a time (65 ms with writes as slow)."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    read = _slow_reads(monkeypatch)
    assert budget.reserve(1, 100) is None  # the look that finds it slow (waited once)
    lease = budget._lease
    waits, results, served = [], [], 0
    for _ in range(400):
        t0 = time.perf_counter()
        got = budget.reserve(1, 100)
        waits.append(time.perf_counter() - t0)
        results.append(got)
        served += got is None
        time.sleep(0.002)  # a call's GPU work; 400 calls in about a second
    print(f"\nslowest call {max(waits) * 1e3:.2f} ms, {served} of 400 served")
    assert max(waits) < 0.005, sorted(waits)[-5:]
    assert set(results) <= {None, store_mod.BUSY}
    assert served >= 200  # topped up ahead: most calls find a lease
    assert lease._slow_until > time.monotonic() and lease._chunks(100_000, 10**12)[0] == 4 * 8
    deadline = time.monotonic() + 5
    while lease._topping and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert budget.usage() == (1 + served, 100 * (1 + served))  # nothing lost or doubled


@pytest.mark.skipif(not timed_io.in_kernel(), reason="csrc/timed_io.c not built (no C compiler)")
def test_busy_threads_do_not_make_a_fast_counter_file_slow(tmp_path):
    """Threads busy in Python hold the GIL for its switch interval, which a look waited
    for after each system call: timed from Python, a look at a local file took 15 ms,
    the file was taken for slow and payloads were skipped as ``budget_busy`` while the
    budget had room (CI, 8 writer threads on 2 cores).  The file's own time is what
    counts: its reads and writes are timed in C without the GIL."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    budget.close()  # no lease: every reservation is a look at the file
    lease, stop, spins = budget._lease, threading.Event(), [0, 0, 0]

    def spin(k: int) -> None:
        while not stop.is_set():
            spins[k] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.02)  # each GIL wait after a system call: ~20 ms
    spinners = [threading.Thread(target=spin, args=(k,)) for k in range(3)]
    for t in spinners:
        t.start()
    looks, slow_after = [], []
    try:
        deadline = time.monotonic() + 10
        while not all(spins) and time.monotonic() < deadline:
            time.sleep(0.001)  # every spinner has had the GIL: they contend for it
        for _ in range(30):
            t0 = time.perf_counter()
            assert budget.reserve(1, 100) is None
            looks.append(time.perf_counter() - t0)
            slow_after.append(lease._slow_until > time.monotonic())
            if sum(w > store_mod._SLOW_LOOK_S for w in looks) >= 5:
                break
    finally:
        stop.set()
        for t in spinners:
            t.join()
        sys.setswitchinterval(old)
    print(f"\n{len(looks)} looks, the slowest {max(looks) * 1e3:.1f} ms of wall")
    if not any(w > store_mod._SLOW_LOOK_S for w in looks):
        pytest.skip("the spinning threads never held the GIL across a look")
    assert not any(slow_after), [round(w * 1e3, 1) for w in looks]
    assert _counter(tmp_path) == (len(looks), 100 * len(looks))


def test_a_write_that_hangs_then_fails_marks_the_counter_file_slow(tmp_path, monkeypatch):
    """A write that hangs 30 ms and then fails (EIO from a shared file system) returns no
    time: counted as nothing, the file was taken for fast and every call looked at it
    again, 30 ms each (found by review).  A failed look counts its wall time."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    lease = budget._lease

    def hang_then_fail(fd: int, count: int, total: int) -> float:
        time.sleep(0.03)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_mod, "_write_counter", hang_then_fail)
    with pytest.raises(OSError):
        budget.reserve(1, 100)
    assert lease._slow_until > time.monotonic()


def test_timed_io_reads_writes_and_unlocks_the_file(tmp_path):
    """The counter file's I/O (C, or its Python fallback): bytes as written, a short
    read as short, a bad descriptor an OSError naming it, and the lock let go."""
    path = tmp_path / "counter"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        took = timed_io.pwrite(fd, b"0123456789abcdef", 4)
        assert 0 <= took < 1
        assert path.read_bytes() == b"\0" * 4 + b"0123456789abcdef"
        assert timed_io.pread(fd, 8, 6)[0] == b"23456789"
        raw, took = timed_io.pread(fd, 64, 16)
        assert raw == b"cdef" and 0 <= took < 1
        fcntl.lockf(fd, fcntl.LOCK_EX)
        assert 0 <= timed_io.unlock(fd) < 1
        probe = subprocess.run(
            [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
             " fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(path)], timeout=60)
        assert probe.returncode == 0  # another process takes the lock at once
    finally:
        os.close(fd)
    with pytest.raises(OSError) as bad:
        timed_io.pread(fd, 8, 0)
    assert bad.value.errno == errno.EBADF


def _slow_reads(monkeypatch) -> Callable[[int], tuple[int, int, float]]:
    """The counter file's reads take 30 ms (a slow shared file system); returns the
    real reader."""
    read = store_mod._read_counter

    def slow_read(fd: int) -> tuple[int, int, float]:
        count, total, took = read(fd)
        time.sleep(0.03)
        return count, total, took + 0.03

    monkeypatch.setattr(store_mod, "_read_counter", slow_read)
    return read


def test_a_top_up_and_a_look_never_both_write_the_counter_file(tmp_path, monkeypatch):
    """fcntl's locks are the process's: a top-up's grant (off the lease's lock) and a
    writer's look in the same process both had the file, and the later write undid the
    other's (found by review: the file under-counted by a grant, so the limits could
    be passed).  The file counts what is held plus the lease, and after close what is
    kept."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    lease, held = budget._lease, 0
    for _ in range(200):
        assert budget.reserve(1, 100) is None
        held += 1
    read = _slow_reads(monkeypatch)
    while lease.calls:  # the lease spent, the call's own look finds the file slow
        assert budget.reserve(1, 100) is None
        held += 1
    assert budget.reserve(1, 100) is None
    held += 1
    while lease._topper is None:  # half of the new lease spent: a top-up starts
        held += budget.reserve(1, 100) is None
    time.sleep(0.005)  # the top-up is in the file now
    budget.release(150, 15_000)  # grown past two chunks: a writer's look
    held -= 150
    lease._topper.join()
    monkeypatch.setattr(store_mod, "_read_counter", read)
    assert _counter(tmp_path) == (held + lease.calls, 100 * held + lease.nbytes)
    budget.release(held - 40, 100 * (held - 40))
    budget.close()
    assert _counter(tmp_path) == (40, 4_000)


def test_a_credit_parked_on_a_slow_file_goes_back_at_close(tmp_path, monkeypatch):
    """A traced call's release that could not have the lease's lock (a look at a slow
    file held it: here ``usage``'s) parks its credit; closing with the lease empty gave
    it back only if something folded it first (found by review: it stayed counted)."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    assert budget.reserve(1, 100) is None and budget.reserve(1, 100) is None
    budget.close()  # nothing leased any more: the file counts the two
    read = _slow_reads(monkeypatch)
    assert budget.reserve(1, 100) is None  # its look finds the file slow
    budget.release(1, 100)  # a writer's: 1 call and 100 bytes in the lease again
    writer = threading.Thread(target=budget.usage)
    writer.start()  # a look at the slow file, under the lease's lock
    time.sleep(0.005)
    t0 = time.perf_counter()
    budget.release(1, 100, settle=False)  # a traced call: parked, not waited
    assert time.perf_counter() - t0 < 0.005 and budget._lease._credits
    writer.join()
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert _counter(tmp_path) == (1, 100)


def test_a_writers_trim_on_a_slow_file_does_not_hold_calls_up(tmp_path, monkeypatch):
    """A writer's release that grows the lease past two chunks (a large reservation
    written smaller, deduplicated) trims it.  On a slow file that look held the lease's
    lock for its 30 ms, and the calls meanwhile skipped their payloads as ``BUSY``;
    the lease's own thread trims it now, off the lock.  The file is exact after."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**8)
    lease, held = budget._lease, [0, 0]

    def reserve(calls: int, nbytes: int) -> str | None:
        got = budget.reserve(calls, nbytes)
        if got is None:
            held[0] += calls
            held[1] += nbytes
        return got

    assert reserve(1, 50_000_000) is None  # a fast file yet: the call's own look
    read = _slow_reads(monkeypatch)
    while lease.calls:
        assert reserve(1, 100) is None
    assert reserve(1, 100) is None  # the look that finds the file slow
    assert lease._slow_until > time.monotonic()
    writer = threading.Thread(target=budget.release, args=(1, 50_000_000))
    writer.start()  # 50 MB back in the lease: grown past two chunks (6.25 MB each)
    held[0] -= 1
    held[1] -= 50_000_000
    time.sleep(0.002)
    waits, results = [], []
    for _ in range(6):  # within the lease's 8 calls, during the trim's 30 ms
        t0 = time.perf_counter()
        results.append(reserve(1, 100))
        waits.append(time.perf_counter() - t0)
        time.sleep(0.002)
    writer.join()
    deadline = time.monotonic() + 10
    while lease._topping and time.monotonic() < deadline:
        time.sleep(0.005)
    assert results == [None] * 6, results
    assert max(waits) < 0.005, sorted(waits)[-3:]
    assert lease.nbytes <= 2 * lease._chunks(100_000, 10**8)[1]  # trimmed
    assert _counter(tmp_path) == (held[0] + lease.calls, held[1] + lease.nbytes)
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert _counter(tmp_path) == tuple(held)


def test_a_trim_asked_for_during_a_top_up_is_not_lost(tmp_path, monkeypatch):
    """A writer's release that lands while a top-up reads the slow file: the round set
    what the lease keeps from the lease as it then was, releases included, and the trim
    asked for meanwhile gave nothing back (the lease kept 56% of the budget; found by
    review).  What the grant settled on is kept: the lease is trimmed."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**8)
    lease, held = budget._lease, [0, 0]

    def reserve(calls: int, nbytes: int) -> None:
        assert budget.reserve(calls, nbytes) is None
        held[0] += calls
        held[1] += nbytes

    reserve(1, 50_000_000)  # a fast file yet: the call's own look
    read = _slow_reads(monkeypatch)
    while lease.calls:
        reserve(1, 100)
    reserve(1, 100)  # the look that finds the file slow
    while not lease._topping:  # half spent: a top-up round starts
        reserve(1, 100)
    time.sleep(0.005)  # the round is in its 30 ms read
    budget.release(1, 50_000_000)  # written as nothing (deduplicated)
    held[0] -= 1
    held[1] -= 50_000_000
    deadline = time.monotonic() + 10
    while lease._topping and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lease.nbytes <= 2 * lease._chunks(100_000, 10**8)[1], lease.nbytes
    assert _counter(tmp_path) == (held[0] + lease.calls, held[1] + lease.nbytes)
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert _counter(tmp_path) == tuple(held)


def test_giving_back_under_calls_on_a_slow_file_is_prompt_and_exact(tmp_path, monkeypatch):
    """``give_back`` joins the lease's top-up, which goes round again while calls ask:
    with a call every millisecond it waited its 2.5 s, then gave back beside a top-up
    still running, whose trim a process ending then left counted for good (found by
    review).  While a give-back runs no top-up starts or goes round again."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**10)
    lease = budget._lease
    assert budget.reserve(1, 100) is None
    read = _slow_reads(monkeypatch)
    while lease.calls:
        assert budget.reserve(1, 100) is None
    assert budget.reserve(1, 100) is None and lease._slow_until > time.monotonic()
    stop, served = threading.Event(), [0]

    def calls() -> None:
        while not stop.is_set():
            served[0] += budget.reserve(1, 100) is None
            time.sleep(0.001)

    caller = threading.Thread(target=calls)
    caller.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        budget.give_back()
        gave_back = time.monotonic() - t0
        t0 = time.monotonic()
        budget.close()
        closed = time.monotonic() - t0
        topping = lease._topping
    finally:
        stop.set()
        caller.join()
    assert gave_back < 1.0 and closed < 1.0, (gave_back, closed)
    assert not topping
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    first = 1 + 8  # the first look's call and the calls of its lease (8)
    assert _counter(tmp_path) == (first + 1 + served[0], 100 * (first + 1 + served[0]))


def test_an_interrupted_give_back_does_not_stop_top_ups_for_good(tmp_path):
    """A KeyboardInterrupt (Ctrl-C in a notebook that carries on) as ``give_back`` lets
    the lease's lock go left its count of give-backs raised: no top-up started again,
    and on a slow file every call's payload was skipped for good (found by review)."""
    lease = store_mod._Lease(str(tmp_path / "counter"))
    real = lease._lock

    class InterruptedOnRelease:  # the real lock; the interrupt comes as it is let go
        armed = True

        def acquire(self, *args: object, **kwargs: object) -> bool:
            return real.acquire(*args, **kwargs)

        def release(self) -> None:
            real.release()
            if InterruptedOnRelease.armed and lease._giving_back:
                InterruptedOnRelease.armed = False
                raise KeyboardInterrupt

        __enter__ = acquire

        def __exit__(self, *exc: object) -> None:
            self.release()

    lease._lock = InterruptedOnRelease()
    with pytest.raises(KeyboardInterrupt):
        lease.give_back()
    assert lease._giving_back == 0 and not real.locked()


def test_a_closed_lease_on_a_slow_file_never_makes_a_call_look(tmp_path, monkeypatch):
    """Crash-safe runs close the lease at start (they keep none), and a call then looked
    at the file itself: 30 ms a call on a slow file, for the whole run (found by
    review).  Closed, the top-up takes only what the call that found nothing needed,
    for the next one like it; the file is exact after the last close."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    budget.close()  # as BlobRecorder(crash_safe=True) does
    read = _slow_reads(monkeypatch)
    assert budget.reserve(1, 100) is None  # the look that finds it slow
    waits, served = [], 1
    for _ in range(40):
        t0 = time.perf_counter()
        served += budget.reserve(1, 100) is None
        waits.append(time.perf_counter() - t0)
        time.sleep(0.02)
    assert max(waits) < 0.005, sorted(waits)[-3:]
    assert served >= 10
    assert budget._lease.calls <= 1  # never a lease: at most the next call's need
    deadline = time.monotonic() + 10
    while budget._lease._topping and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert _counter(tmp_path) == (served, 100 * served)


def test_a_closed_lease_keeps_no_more_than_the_next_calls_need(tmp_path, monkeypatch):
    """Closed on a slow file, a top-up's grant is held for the next call; a writer's
    release then stayed in the lease too, and small calls ratcheted what it kept, all
    of it counted if the run then crashed (found by review).  A closed lease holds at
    most one call's reservation; the file is exact after the last close."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    budget.close()
    read = _slow_reads(monkeypatch)
    lease, served = budget._lease, 0
    for size in (1000, 1000, 1000, 1000, 100, 100, 1000, 1000):
        got = budget.reserve(1, size)
        if lease._topper is not None:
            lease._topper.join()  # the next call's grant is in
        if got is None:
            served += 1
            budget.release(0, size - 100)  # the writer: 100 bytes written
            deadline = time.monotonic() + 10
            while lease._topping and time.monotonic() < deadline:  # its trim, off the lock
                time.sleep(0.005)
        assert lease.calls <= 1 and lease.nbytes <= 1000, (lease.calls, lease.nbytes)
    assert served >= 3
    monkeypatch.setattr(store_mod, "_read_counter", read)
    budget.close()
    assert _counter(tmp_path) == (served, 100 * served)


def test_a_signal_handler_giving_back_does_not_wait_for_a_top_up_it_blocks(tmp_path,
                                                                          monkeypatch):
    """A SIGTERM handler interrupting a call that holds the lease's lock, with a top-up
    started that waits for that lock: giving back joined the top-up for 2.5 s first
    (found by review); it now returns once the lock is found held (1 s)."""
    budget = _budget(tmp_path, max_count=100_000, max_bytes=10**12)
    lease = budget._lease
    _slow_reads(monkeypatch)
    assert budget.reserve(1, 100) is None  # the file found slow
    with lease._lock:  # the interrupted call
        lease._top_up(100_000, 10**12, 1, 100)
        assert lease._topping
        t0 = time.perf_counter()
        budget.give_back()  # the handler, on the same thread
        waited = time.perf_counter() - t0
    assert waited < 1.5, waited
    lease._topper.join()


def test_a_top_up_near_the_edge_keeps_no_lease_a_look_would_not(tmp_path):
    """A top-up keeps a chunk only while twice the chunk is free counting what the
    lease already holds, as a look does: with 50 free and 10 held of a 32-call chunk, a
    look keeps none, and the top-up took the 22 missing anyway, which another process
    was then refused (found by review).  What a call needs is still granted."""
    counter = tmp_path / layout.USAGE_DIR / "counter"
    counter.parent.mkdir(parents=True)
    budget = _budget(tmp_path, max_count=1000, max_bytes=10**12)
    lease = budget._lease
    for used, want, need, got in ((950, 22, 0, 0), (950, 22, 1, 1), (900, 22, 0, 22)):
        counter.write_bytes(store_mod._COUNTER.pack(used, 0))
        assert lease._grant((want, 0), (need, 0), (10, 0), 1000, 10**12)[0] == got, used
        assert _counter(tmp_path)[0] == used + got
    assert store_mod._lease_size(32, 50 + 10) == 0  # what a look keeps there


def test_a_call_never_waits_on_a_counter_file_another_process_holds(tmp_path):
    """With no lease left, the call's look at the file gives up within a few ms: the
    call goes on, its payload skipped as ``budget_busy`` and counted.  (It waited for the
    other process's whole hold before: 1 s here.)"""
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    first = record(rec, add, 5, 1, torch.ones(4), 1.0)
    assert rec.flush(10) and first.skipped is None
    rec.store.budget.give_back()  # as an idle writer does: the next call must look
    cap, waited = _before_while_held(rec, tmp_path, 5, torch.ones(4))
    assert cap.skipped == "budget_busy" and rec.counters["skipped.budget_busy"] == 1
    assert waited < 0.3, waited
    again = record(rec, add, 5, 3, torch.full((4,), 2.0), 1.0)  # the file is free again
    assert rec.flush(10) and again.skipped is None


def test_a_writer_waiting_on_the_counter_file_does_not_hold_up_calls(tmp_path):
    """A writer's release that must look at the file while another process holds it
    waits with the budget's own lock let go: calls spending their lease go on."""
    budget = _budget(tmp_path, max_count=1000, max_bytes=10**9)
    assert budget.reserve(1, 100) is None and _lease(budget)[0] >= 4
    budget._lease._seen_at -= 1.0  # stale: the next release looks at the file
    holder = _hold_counter_lock(tmp_path, 1.0)
    try:
        writer = threading.Thread(target=budget.release, args=(0, 50))
        writer.start()
        time.sleep(0.05)  # the writer is waiting on the file now
        assert writer.is_alive()
        t0 = time.perf_counter()
        assert budget.reserve(1, 10) is None  # from the lease
        waited = time.perf_counter() - t0
    finally:
        holder.wait()
        writer.join(5)
    assert waited < 0.3, waited
    assert not writer.is_alive()
    budget.close()
    assert _counter(tmp_path) == (2, 60)


def _grow(x):
    return x.repeat(100)


class _Span:
    """What a Pending writes on: a span record's attributes."""

    def __init__(self) -> None:
        self.attributes: dict = {}


def test_outputs_left_out_are_said_on_the_span_and_counted(tmp_path):
    """Inputs (4 KB) fit the 100 KB budget, outputs (400 KB) do not: the manifest keeps
    the inputs, and the span and counters() say the outputs are missing (before: the
    span looked complete and nothing was counted)."""
    rec = BlobRecorder(settings(tmp_path, blob_max_gb=100e3 / 1024**3), install_handlers=False)
    cap = record(rec, _grow, 1, 1, torch.arange(1000, dtype=torch.float32))
    assert rec.flush(10) and cap.skipped is None
    m = manifest.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    assert m["skipped"] == "max_bytes" and m["result"] is None
    assert m["args"][0]["value"]["t"] == "tensor"  # the input is there
    span = _Span()
    cap.pending(span).apply(span)
    assert span.attributes == {"flashinfer.blob.manifest": cap.manifest_url,
                               "flashinfer.blob.skipped": "outputs:max_bytes"}
    assert rec.counters["outputs_skipped.max_bytes"] == 1
    rec.shutdown(5)


def _same(x):
    return x


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_inherit_the_parents_staged_bytes(tmp_path):
    """The parent's writer was still storing a call at the fork: in the child those
    8 KB stayed counted for good, and with a 10 KB pool every call of the child was
    skipped as staging_full.  (Small tensors: torch's OpenMP pool does not survive a
    fork, and copies this small do not use it.)"""
    rec = BlobRecorder(settings(tmp_path), staging_mb=10_000 / 2**20, install_handlers=False)
    gate = threading.Event()
    real = rec.store.put_content

    def slow(data, fmt):  # noqa: ANN001, ANN202 - the store is slow: the call waits
        gate.wait(10)
        return real(data, fmt)

    rec.store.put_content = slow
    x, y = torch.zeros(1000), torch.ones(1000)  # 4 KB in, 4 KB out each
    cap = rec.before("_same", "m", "_same", None, 1, 1, None, 1,
                     inspect.signature(_same).bind(x))
    cap.after(_same(x), None)
    assert rec.staging.used == 8000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            rec.store.put_content = real
            c = rec.before("_same", "m", "_same", None, 2, 2, None, 2,
                           inspect.signature(_same).bind(y))
            c.after(_same(y), None)
            ok = rec.flush(10)
            os.write(w, json.dumps([rec.staging.used, c.skipped, ok]).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    used, skipped, ok = json.loads(os.read(r, 200).decode())
    gate.set()
    assert rec.flush(10) and rec.staging.used == 0
    assert (used, skipped, ok) == (0, None, True)
    rec.shutdown(5)


def test_a_crash_safe_call_is_listed_once(tmp_path):
    """CRASH_SAFE notes a call before it runs and again with its outputs: the listing
    had two entries (ls counted the call twice, pull --process fetched it twice)."""
    from otel_flashinfer.blobs import index

    rec = BlobRecorder(settings(tmp_path, crash_safe=True), install_handlers=False)
    record(rec, add, 1, 1, torch.ones(5), torch.full((5,), 2.0))
    assert rec.flush(10)
    calls = index.list_calls(rec.store, rec.process)
    assert [(c["span_id"], c["bytes"]) for c in calls] == [(f"{1:016x}", 60)]
    names = list((tmp_path / layout.process_calls_prefix(rec.process)).iterdir())
    assert len(names) == 1  # the early entry is gone, not only hidden
    assert index.describe_store(rec.store)[0]["calls"] == 1
    rec.shutdown(5)


def test_a_call_noted_twice_by_a_process_that_died_between_is_listed_once(tmp_path):
    from otel_flashinfer.blobs import index

    store = BlobStore(str(tmp_path))
    process = layout.process_name(1, 7)
    writer = index.IndexWriter(store, process, 1, 7)
    meta = {"start_ns": 5, "span_id": "00000000000000aa", "trace_id": "0" * 31 + "1",
            "api": "add", "qualname": "add"}
    other = {**meta, "start_ns": 6, "span_id": "00000000000000bb"}
    writer.note(meta, 40)
    writer.note(other, 10)
    writer.note(meta, 60)  # no ``replaces``: the process died before removing the first
    assert [(c["span_id"][-2:], c["bytes"]) for c in index.list_calls(store, process)] == [
        ("aa", 60), ("bb", 10)]


class _PagedWrapper:
    """Stands in for BatchDecodeWithPagedKVCacheWrapper: its plan fills the index
    buffer its run gathers pages by."""

    def __init__(self) -> None:
        self._paged_kv_indices_buf = torch.zeros(64, dtype=torch.int32)

    def plan(self, indices):  # noqa: ANN001, ANN201
        self._paged_kv_indices_buf[: indices.numel()] = indices

    def run(self, q, paged_kv_cache):  # noqa: ANN001, ANN201
        return q


def _page_ids(tmp_path, cap) -> list[int]:  # noqa: ANN001
    m = manifest.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    return next(a for a in m["args"] if a["name"] == "paged_kv_cache")["value"]["page_ids"]


def _hooked(conf, rec):  # noqa: ANN001, ANN202
    """call(fn, name, span, *args): ``fn`` of one _PagedWrapper through level 10's span
    hooks, as the wrapper runs them; returns the hooks' state (a CallCapture)."""
    from otel_flashinfer.blobs.hooks import make_hooks
    from otel_flashinfer.pipeline import CallRecord
    from otel_flashinfer.spans import ArgPlan

    before, after = make_hooks(conf, rec)
    w = _PagedWrapper()

    def call(fn, name, span, *args):  # noqa: ANN001, ANN002, ANN202
        record = CallRecord.for_call(name, 1, span, None, {})
        record.instance = id(w)
        state = before(record, ArgPlan(fn, True), (w, *args), {})
        out = fn(w, *args)
        after(record, state, out, None)
        return state

    return call


def test_a_plan_whose_payload_is_skipped_still_sets_the_runs_page_count(tmp_path):
    """The second plan (4 pages) was skipped (queue full), and the run gathered by the
    first plan's count: pages 9 and 10, which it reads, were not in its manifest."""
    conf = settings(tmp_path)
    rec = BlobRecorder(conf, install_handlers=False)
    call = _hooked(conf, rec)
    cache = torch.randn(32, 2, 4, 8)
    call(_PagedWrapper.plan, "W.plan", 1, torch.tensor([3, 4], dtype=torch.int32))
    rec.queue_max, queue_max = 0, rec.queue_max
    assert call(_PagedWrapper.plan, "W.plan", 2, torch.tensor([3, 4, 9, 10], dtype=torch.int32)
                ).skipped == "queue_full"
    rec.queue_max = queue_max
    run = call(_PagedWrapper.run, "W.run", 3, torch.ones(2), cache)
    assert rec.flush(10)
    assert _page_ids(tmp_path, run) == [3, 4, 9, 10]
    rec.shutdown(5)


def test_a_filtered_out_plan_still_sets_the_runs_page_count(tmp_path):
    """BLOB_EXCLUDE="*.plan": the plans' payloads are left out, the runs' pages are not."""
    conf = settings(tmp_path, blob_exclude=("*.plan",))
    rec = BlobRecorder(conf, install_handlers=False)
    call = _hooked(conf, rec)
    cache = torch.randn(32, 2, 4, 8)
    assert call(_PagedWrapper.plan, "W.plan", 1, torch.tensor([3, 4], dtype=torch.int32)
                ).skipped == "filtered"
    first = call(_PagedWrapper.run, "W.run", 2, torch.ones(2), cache)
    call(_PagedWrapper.plan, "W.plan", 3, torch.tensor([3, 4, 9, 10], dtype=torch.int32))
    second = call(_PagedWrapper.run, "W.run", 4, torch.ones(2), cache)
    assert rec.flush(10)
    assert _page_ids(tmp_path, first) == [3, 4]
    assert _page_ids(tmp_path, second) == [3, 4, 9, 10]
    rec.shutdown(5)


def test_the_stores_memory_of_written_objects_is_bounded(tmp_path, monkeypatch):
    """Every object key was remembered for the life of the process; a store deleted
    under a long run is also written again once forgotten."""
    monkeypatch.setattr(store_mod, "_KNOWN_MAX", 8)
    store = BlobStore(str(tmp_path))
    keys = []
    for i in range(20):
        data = f"object {i}".encode()
        key = layout.object_key(hashlib.sha256(data).hexdigest(), "safetensors")
        assert store.put_object(key, data) == len(data)
        keys.append(key)
        assert len(store._known) <= 8
    (tmp_path / keys[0]).unlink()  # cleaned up under the running process
    assert store.put_object(keys[0], b"object 0") == 8
    assert (tmp_path / keys[0]).read_bytes() == b"object 0"


def test_a_payload_dropped_on_the_calls_thread_does_not_wait_on_the_counter_file(tmp_path):
    """A call whose copies do not fit the staging pool gives its reservation back on
    its own thread: that release looked at the file, and waited out another process's
    hold on it (1 s in review)."""
    rec = BlobRecorder(settings(tmp_path), staging_mb=10_000 / 2**20, install_handlers=False)
    assert record(rec, add, 6, 1, torch.ones(4), 1.0).skipped is None
    assert rec._idle.wait(10)  # written (flush would give the lease back)
    assert rec.store.budget._lease.calls > 0
    rec.store.budget._lease._seen_at -= 1.0  # stale: a settling release would look
    cap, waited = _before_while_held(rec, tmp_path, 6, torch.ones(100_000))
    assert cap.skipped == "staging_full"
    assert waited < 0.3, waited
    rec.shutdown(5)


def test_a_file_system_without_locks_is_an_error_not_contention(tmp_path, monkeypatch):
    """ENOLCK (NFS without lockd) was taken for another process's hold: every call was
    skipped as budget_busy, silently.  It is an internal error now, logged and counted."""
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    rec.store.budget.give_back()

    def no_locks(fd, how, *args):  # noqa: ANN001, ANN002, ANN202
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    cap = record(rec, add, 7, 1, torch.ones(4), 1.0)
    assert cap.skipped == "error" and rec.counters["internal_errors"] >= 1
    monkeypatch.undo()
    rec.shutdown(5)


def test_a_plan_inside_a_capture_still_sets_the_runs_page_count(tmp_path, monkeypatch):
    from otel_flashinfer.blobs import hooks as hooks_mod

    conf = settings(tmp_path)
    rec = BlobRecorder(conf, install_handlers=False)
    call = _hooked(conf, rec)
    cache = torch.randn(32, 2, 4, 8)
    call(_PagedWrapper.plan, "W.plan", 1, torch.tensor([3, 4], dtype=torch.int32))
    monkeypatch.setattr(hooks_mod, "_capturing_unseen", lambda: True)
    assert call(_PagedWrapper.plan, "W.plan", 2, torch.tensor([3, 4, 9, 10], dtype=torch.int32)
                ).skipped == "capturing"
    monkeypatch.undo()
    run = call(_PagedWrapper.run, "W.run", 3, torch.ones(2), cache)
    assert rec.flush(10)
    assert _page_ids(tmp_path, run) == [3, 4, 9, 10]
    rec.shutdown(5)


def test_a_memory_store_is_written_in_this_process():
    """memory:// lives in this process: its writes went to the upload helper's own
    memory, so flush said done and the span pointed at a manifest no one could read."""
    import fsspec

    rec = BlobRecorder(settings(f"memory://otelfi-{os.getpid()}-{time.time_ns()}"),
                       install_handlers=False)
    try:
        assert rec.store._uploader is None  # noqa: SLF001
        cap = record(rec, add, 1, 1, torch.ones(4), torch.ones(4))
        assert rec.flush(20)
        fs = fsspec.filesystem("memory")
        m = manifest.parse(fs.cat_file(cap.manifest_url), "m")
        assert m["api"] == "add" and fs.exists(cap.manifest_url)
    finally:
        rec.shutdown(5)


def test_an_argument_inside_itself_is_recorded_without_walking_it_forever():
    """A list holding itself twice: the depth bound alone cost 2^32 calls on the
    caller's thread (the call hung); so did a value that branches without a cycle."""
    loop = [1, 2]
    loop += [loop, loop]
    t0 = time.perf_counter()
    value = manifest.plain_value(loop, None)
    assert value["items"][:2] == [1, 2]
    assert value["items"][2] == {"t": "unrepresentable", "type": "a container inside itself"}
    shared: list = []
    for _ in range(40):
        shared = [shared, shared]
    branching = manifest.plain_value(shared, None)
    assert "more than 1024 containers of containers" in json.dumps(branching)
    # what does not branch is written whole: a long list of ints, or of pairs
    assert manifest.plain_value(list(range(5000)), None)["items"] == list(range(5000))
    pairs = manifest.plain_value([(i, i + 1) for i in range(1500)], None)["items"]
    assert pairs[-1] == {"t": "tuple", "items": [1499, 1500]} and len(pairs) == 1500
    assert time.perf_counter() - t0 < 1.0
    # a value shared without a cycle is written whole each time it appears
    pair = (1, 2)
    assert manifest.plain_value([pair, pair], None)["items"] == [
        {"t": "tuple", "items": [1, 2]}] * 2


def test_objects_a_store_lost_are_written_again(tmp_path, monkeypatch):
    """A store can lose objects (a retention rule; a bucket made again after an
    outage): an object seen stored is trusted for a while only, so a later manifest does
    not cite what the store no longer holds."""
    import shutil

    monkeypatch.setattr(store_mod, "KNOWN_FOR_S", 0.0)  # looked at again every time
    rec = BlobRecorder(settings(tmp_path), install_handlers=False)
    x = torch.arange(16.0)
    record(rec, add, 1, 1, x, x)
    assert rec.flush(10)
    shutil.rmtree(tmp_path / "objects")  # the retention rule
    cap = record(rec, add, 1, 2, x, x)
    assert rec.flush(10)
    m = manifest.parse((tmp_path / cap.manifest_key).read_bytes(), "m")
    for obj in manifest.manifest_objects(m):
        assert (tmp_path / obj["key"]).exists(), obj["key"]
    rec.shutdown(5)


def test_stored_pages_are_trusted_for_a_while_only(monkeypatch):
    """Pages of a paged KV cache are remembered by fingerprint: like whole objects, only
    for ``TRUST_S``, and not past a failed write (the store may have lost them)."""
    from otel_flashinfer.blobs import fingerprint

    memo = fingerprint.PageMemo()
    memo.put((1, 2, 0), "objects/aa")
    assert memo.lookup([(1, 2, 0)]) == ["objects/aa"]
    memo.clear()  # as after a failed write
    assert memo.lookup([(1, 2, 0)]) == [None]
    memo.put((1, 2, 0), "objects/aa")
    monkeypatch.setattr(store_mod, "KNOWN_FOR_S", 0.0)
    time.sleep(0.001)
    assert memo.lookup([(1, 2, 0)]) == [None]
