"""The upload helper: a remote store's writes made by another process, against a real
S3 API (``moto_server``), read back with s3fs; its death, its absence, a fork, and a
traced process that exits with writes still in the helper's hands."""

from __future__ import annotations

import hashlib
import inspect
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import s3fs
import torch
from s3_fixture import moto_s3

from otel_flashinfer.blobs import uploader
from otel_flashinfer.blobs.capture import BlobRecorder
from otel_flashinfer.blobs.store import BlobStore
from otel_flashinfer.config import Settings

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


def _client(s3: dict) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**s3["storage_options"], skip_instance_cache=True)


def _store(s3: dict, **kw) -> BlobStore:
    return BlobStore(f"s3://{s3['bucket']}/{uuid.uuid4().hex[:8]}", offload=True, **kw)


def _helper_pid(store: BlobStore) -> int:
    helper = store._uploader._helper
    assert helper is not None and helper.alive
    return helper.proc.pid


def test_writes_go_through_the_helper_and_land_whole(s3):
    store = _store(s3)
    try:
        parts = [os.urandom(300_000), b"", os.urandom(17)]
        digest, key, new = store.put_content(parts, "safetensors")
        assert digest == hashlib.sha256(b"".join(parts)).hexdigest()
        assert new == 300_017
        pid = _helper_pid(store)
        assert pid != os.getpid()
        # Another process wrote it (the bytes read back with a fresh client are the
        # payload's), in a session of its own and with no stderr of ours: a Ctrl-C to
        # the engine's group is not its, and a reader of our stderr does not wait on it
        # while it finishes its writes after we exit.
        assert _client(s3).cat_file(store.path(key)) == b"".join(parts)
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null"
        # Dedup asks the helper (HEAD) once the process has forgotten what it wrote.
        store._known.clear()
        assert store.put_content(parts, "safetensors")[2] == 0
        store.put_marker("index/a")
        assert _client(s3).cat_file(store.path("index/a")) == b""
        store.remove("index/a")
        store.remove("index/a")  # gone already is fine, as in process
        assert not _client(s3).exists(store.path("index/a"))
        store.put_manifest("traces/m", b'{"k": 1}')
        assert store.get("traces/m") == b'{"k": 1}'
        assert _helper_pid(store) == pid  # one helper for all of it
    finally:
        store.close()


def test_a_killed_helper_fails_its_writes_and_the_next_one_starts_again(s3, monkeypatch):
    store = _store(s3)
    try:
        store.put_content(b"first", "torch")
        pid = _helper_pid(store)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while store._uploader._helper.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        # The dead helper's writes fail (the recorder counts a failed write) ...
        monkeypatch.setattr(uploader, "_RESTART_S", 3600.0)
        with pytest.raises(uploader.HelperError, match="gone"):
            store.put_content(b"second", "torch")
        # ... and once the restart pause is over, a new helper takes the writes.
        monkeypatch.setattr(uploader, "_RESTART_S", 0.0)
        key = store.put_content(b"second", "torch")[1]
        assert _helper_pid(store) != pid
        assert _client(s3).cat_file(store.path(key)) == b"second"
    finally:
        store.close()


def test_a_helper_that_cannot_start_leaves_the_writes_in_process(s3, monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    store = _store(s3)
    try:
        key = store.put_content(b"in process", "torch")[1]
        assert "cannot run" in caplog.text and store._uploader.unavailable
        assert _client(s3).cat_file(store.path(key)) == b"in process"
    finally:
        store.close()


def test_storage_options_the_helper_cannot_take_stay_in_process(s3):
    opts = {**s3["storage_options"], "config_kwargs": {"retries": object()}}
    store = BlobStore(f"s3://{s3['bucket']}/x", storage_options=opts, offload=True,
                      check_writable=False)
    assert store._uploader is None


def test_a_store_opened_in_the_helper_can_fail(s3):
    # The helper opens the store from the URL alone: a protocol it cannot load is an
    # error that names it, and the writes stay in process.
    up = uploader.Uploader("nosuchprotocol://bucket/x")
    assert up.exists("bucket/x") is None
    assert "nosuchprotocol" in up.unavailable


def test_a_forked_child_writes_through_a_helper_of_its_own(s3):
    store = _store(s3)
    try:
        store.put_content(b"parent", "torch")
        parent_helper = _helper_pid(store)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own helper, the parent's pipes untouched
            code = 1
            try:
                key = store.put_content(b"child", "torch")[1]
                child_helper = _helper_pid(store)
                os.write(write, f"{key} {child_helper}".encode())
                store.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        answer = os.read(read, 4096).decode().split()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0
        key, child_helper = answer[0], int(answer[1])
        assert child_helper not in (parent_helper, os.getpid())
        assert _client(s3).cat_file(store.path(key)) == b"child"
        # The parent's helper still serves the parent.
        assert _client(s3).cat_file(store.path(store.put_content(b"after", "torch")[1])
                                    ) == b"after"
        assert _helper_pid(store) == parent_helper
    finally:
        store.close()


def test_writes_handed_over_land_after_the_traced_process_is_gone(s3, tmp_path):
    # The helper reads a request and only then sees end of input (its parent killed
    # right after handing over): it finishes the write before it exits.
    env = {**os.environ, "OTEL_FLASHINFER_LEVEL": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "otel_flashinfer.blobs.uploader"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    config = (b'{"url": "s3://%s", "storage_options": {}}' % s3["bucket"].encode())
    path = f"{s3['bucket']}/orphan/{uuid.uuid4().hex}"
    payload = os.urandom(1 << 20)
    proc.stdin.write(uploader._REQUEST.pack(1, uploader.HELLO, 0, len(config)) + config)
    raw = path.encode()
    proc.stdin.write(uploader._REQUEST.pack(2, uploader.PUT, len(raw), len(payload)) + raw
                     + payload)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    answers = proc.stdout.read()
    assert uploader._ANSWER.unpack_from(answers, 0) == (1, uploader.OK, 0)
    assert uploader._ANSWER.unpack_from(answers, uploader._ANSWER.size) == (2, uploader.OK, 0)
    assert _client(s3).cat_file(path) == payload


def test_a_recorder_on_s3_writes_by_the_helper(s3, tmp_path):
    url = f"s3://{s3['bucket']}/rec-{uuid.uuid4().hex[:8]}"
    rec = BlobRecorder(Settings(blob_url=url), install_handlers=False)
    try:
        def scale(x, factor=2.0):
            return x * factor

        x = torch.arange(1000, dtype=torch.float32)
        cap = rec.before("scale", __name__, "scale", None, 7, 8, None, 1,
                         inspect.signature(scale).bind(x))
        cap.after(scale(x), None)
        assert rec.flush(60)
        assert rec.counters["manifests"] == 1 and not rec.counters["write_failures"]
        assert rec.store._uploader is not None and _helper_pid(rec.store) != os.getpid()
        manifest_key = cap.manifest_key
        assert _client(s3).exists(rec.store.path(manifest_key))
    finally:
        rec.shutdown(10)


def test_a_helper_that_stops_reading_fails_the_write_in_bounded_time(s3, monkeypatch):
    """A helper that stopped (SIGSTOP here; a hung client) fills the pipe: the write
    used to block in writev with the send lock held, with no deadline, and every other
    writer behind it; now it fails after ANSWER_TIMEOUT_S and the helper is killed."""
    store = _store(s3)
    try:
        store.put_content(b"warm", "torch")
        pid = _helper_pid(store)
        monkeypatch.setattr(uploader, "ANSWER_TIMEOUT_S", 1.0)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(uploader.HelperError, match="could not be sent"):
            # far more than a pipe holds: the frame itself cannot go out
            store._uploader.put(store.path("big"), [os.urandom(4 << 20)])
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        store.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not).  A process that is reaped between the
    open and the read makes the read fail with ESRCH (seen in CI): gone as well."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_after_close_the_helper_exits_and_later_writes_stay_in_process(s3):
    store = _store(s3)
    store.put_content(b"before", "torch")
    helper = store._uploader._helper
    store.close()
    assert helper.proc.wait(timeout=30) == 0  # end of input: it finished and exited
    # A writer that outlived a flush's timeout still stores its call, in process, and
    # starts no helper that nothing would close.
    key = store.put_content(b"after close", "torch")[1]
    assert store._uploader._helper is None
    assert _client(s3).cat_file(store.path(key)) == b"after close"
