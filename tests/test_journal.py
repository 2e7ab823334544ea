"""The crash journal without crashes: record bytes, argument encoding, slot handling,
and recovery's rules (dead vs live vs reused pids, corrupt files, claims)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.trace import SpanContext

import otel_flashinfer
from otel_flashinfer import describe, health, runtime
from otel_flashinfer import journal as J
from otel_flashinfer import journal_format as fmt
from otel_flashinfer.pipeline import CallRecord
from otel_flashinfer.spans import ArgPlan

#: Every test here runs over the C hot path and the pure-Python wrapper.
pytestmark = pytest.mark.usefixtures("wrapper_path")

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_journal(directory: Path, *, pid: int, ticks: int, notes: list[dict],
                   last_write_ns: int, host: str = HOST, boot: str | None = None,
                   slots: int = 8, slot_size: int = fmt.DEFAULT_SLOT_SIZE) -> Path:
    """A journal as a dead process would have left it, built from the pure layout."""
    buf = bytearray(fmt.file_size(slots, slot_size))
    fmt.pack_header(buf, slot_count=slots, slot_size=slot_size, pid=pid,
                    start_ticks=ticks, created_ns=1, boot_id=J.boot_id() if boot is None
                    else boot, hostname=host)
    fmt.LAST_WRITE.pack_into(buf, fmt.LAST_WRITE_OFFSET, last_write_ns)
    for i, note in enumerate(notes):
        fmt.pack_slot(buf, fmt.HEADER_SIZE + i * slot_size, **dict(note, slot_size=slot_size))
    path = directory / J.journal_name(host, pid, ticks)
    path.write_bytes(bytes(buf))
    return path


NOTE = dict(trace_id=0xABCDEF0123456789ABCDEF0123456789, span_id=0x1122334455667788,
            parent_span_id=0x99, start_ns=1_000, name=b"BatchDecodeWithPagedKVCacheWrapper.run",
            args=b'{"q.shape":[8,32,128],"q.dtype":"float16","sm_scale":0.125}')


def _wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _record(parent: int | None = 7, start: int = 123) -> CallRecord:
    ctx = SpanContext(5, parent, False) if parent else None
    return CallRecord("f", (1 << 127) | 3, 42, ctx, start, 0, {})


# ---- layout ------------------------------------------------------------------------------

def test_header_round_trip_and_checks() -> None:
    buf = bytearray(fmt.file_size(4, 512))
    fmt.pack_header(buf, slot_count=4, slot_size=512, pid=1234, start_ticks=99,
                    created_ns=5, boot_id="b-o-o-t", hostname="gpu-node-7")
    header = fmt.parse_header(bytes(buf))
    assert (header.slot_count, header.slot_size, header.pid, header.start_ticks) == (4, 512,
                                                                                      1234, 99)
    assert (header.boot_id, header.hostname, header.last_write_ns) == ("b-o-o-t",
                                                                        "gpu-node-7", 5)
    with pytest.raises(fmt.JournalCorrupt, match="truncated"):
        fmt.parse_header(bytes(buf[:-1]))
    with pytest.raises(fmt.JournalCorrupt, match="truncated"):
        fmt.parse_header(bytes(buf[:100]))
    flipped = bytearray(buf)
    flipped[40] ^= 1  # pid / ticks area: covered by the checksum
    with pytest.raises(fmt.JournalCorrupt, match="checksum"):
        fmt.parse_header(bytes(flipped))
    with pytest.raises(fmt.JournalCorrupt, match="magic"):
        fmt.parse_header(b"x" * len(buf))
    # The heartbeat field is outside the checksum.
    fmt.LAST_WRITE.pack_into(buf, fmt.LAST_WRITE_OFFSET, 77)
    assert fmt.parse_header(bytes(buf)).last_write_ns == 77


def test_slot_round_trip_and_free_slots_are_skipped() -> None:
    buf = bytearray(fmt.file_size(4, fmt.DEFAULT_SLOT_SIZE))
    fmt.pack_header(buf, slot_count=4, slot_size=fmt.DEFAULT_SLOT_SIZE, pid=1, start_ticks=1,
                    created_ns=1, boot_id="", hostname="h")
    fmt.pack_slot(buf, fmt.HEADER_SIZE + 2 * fmt.DEFAULT_SLOT_SIZE, **NOTE)
    root = dict(NOTE, parent_span_id=None, name=b"x" * 100)
    fmt.pack_slot(buf, fmt.HEADER_SIZE, **root)
    header = fmt.parse_header(bytes(buf))
    notes = list(fmt.iter_live(bytes(buf), header))
    assert [n.index for n in notes] == [0, 2]
    assert notes[0].parent_span_id is None and notes[0].name == "x" * fmt.NAME_MAX
    note = notes[1]
    assert (note.trace_id, note.span_id, note.parent_span_id, note.start_ns) == (
        NOTE["trace_id"], NOTE["span_id"], 0x99, 1_000)
    assert note.name == "BatchDecodeWithPagedKVCacheWrapper.run"
    assert note.args == NOTE["args"]
    buf[fmt.HEADER_SIZE + fmt.DEFAULT_SLOT_SIZE + fmt.STATE_OFFSET] = 7
    with pytest.raises(fmt.JournalCorrupt, match="slot 1: unknown state"):
        list(fmt.iter_live(bytes(buf), header))


# ---- arguments ---------------------------------------------------------------------------

def _plan() -> ArgPlan:
    def run(q, k_cache, *rest, sm_scale=None):  # noqa: ANN001, ANN202
        return q

    return ArgPlan(run, False)


def test_arguments_are_named_by_the_plan_and_decode_to_span_attributes() -> None:
    q = torch.zeros(8, 32, 128, dtype=torch.float16)
    snaps = [describe.snapshot(v) for v in (q, [q, 3], 1, True, "NHD", None)]
    kw = {"sm_scale": describe.snapshot(0.125), "window": describe.snapshot(-1)}
    data = fmt.ArgEncoder(900).encode(snaps, kw, _plan())
    attrs = fmt.decode_args(data)
    assert attrs == {
        "flashinfer.arg.q.shape": [8, 32, 128],
        "flashinfer.arg.q.dtype": "float16",
        "flashinfer.arg.k_cache.len": 2,
        "flashinfer.arg.k_cache.0.shape": [8, 32, 128],
        "flashinfer.arg.k_cache.0.dtype": "float16",
        "flashinfer.arg.k_cache.1": 3,
        "flashinfer.arg.rest.0": 1,
        "flashinfer.arg.rest.1": True,
        "flashinfer.arg.rest.2": "NHD",
        "flashinfer.arg.rest.3": "None",
        "flashinfer.arg.sm_scale": 0.125,
        "flashinfer.arg.window": -1,
    }
    # 1 and True stay distinct (a cache keyed on values would merge them).
    assert type(attrs["flashinfer.arg.rest.0"]) is int
    # Without a plan, arguments are named by position.
    assert "flashinfer.arg.0.shape" in fmt.decode_args(fmt.ArgEncoder(900).encode(snaps))


def test_the_call_cache_keeps_equal_but_different_scalars_apart() -> None:
    encoder = fmt.ArgEncoder(900)
    q = describe.snapshot(torch.zeros(2, 3))
    outputs = [fmt.decode_args(encoder.encode([q, value])) for value in (1, True, 1.0, 1)]
    assert [o["flashinfer.arg.1"] for o in outputs] == [1, True, 1.0, 1]
    assert [type(o["flashinfer.arg.1"]) for o in outputs] == [int, bool, float, int]
    # A repeat with the same types is a hit: the cached bytes object itself.
    assert encoder.encode([q, 1.0]) is encoder.encode([q, 1.0])
    tensors_only = [q, q]
    assert encoder.encode(tensors_only) is encoder.encode(list(tensors_only))
    # Containers skip the call cache: [1] and [True] would compare equal.
    for value in ([1], [True]):
        attrs = fmt.decode_args(encoder.encode([describe.snapshot(value)]))
        assert attrs["flashinfer.arg.0.0"] is value[0]
    assert len(encoder._calls) == 2  # (q, number) and (q, q); no container entries


def test_awkward_scalars_stay_valid_json() -> None:
    snaps = [describe.snapshot(v) for v in
             (float("nan"), 2**70, 'quote"back\\slash\n', "x" * 1000, describe.Opaque("Obj"))]
    attrs = fmt.decode_args(fmt.ArgEncoder(2000).encode(snaps))
    assert attrs["flashinfer.arg.0"] == "nan"
    assert attrs["flashinfer.arg.1"] == str(2**70)
    assert attrs["flashinfer.arg.2"] == 'quote"back\\slash\n'
    assert len(attrs["flashinfer.arg.3"]) == describe.MAX_STR
    assert attrs["flashinfer.arg.4.type"] == "Obj"


def test_arguments_that_do_not_fit_are_cut_whole_and_marked() -> None:
    snaps = [describe.snapshot(torch.zeros(2, i + 1)) for i in range(40)]
    data = fmt.ArgEncoder(300).encode(snaps)
    assert len(data) <= 300
    attrs = fmt.decode_args(data)
    assert attrs["flashinfer.crash.args_truncated"] is True
    assert attrs["flashinfer.arg.0.shape"] == [2, 1]
    kept = [k for k in attrs if k.endswith(".shape")]
    assert 3 <= len(kept) < 40
    assert all(k.replace("shape", "dtype") in attrs for k in kept)  # no half arguments


# ---- the writer --------------------------------------------------------------------------

def test_begin_notes_the_call_and_end_clears_it(tmp_path: Path) -> None:
    journal = J.Journal(str(tmp_path), slot_count=4)
    try:
        path = Path(journal.path)
        assert path.name == J.journal_name(HOST, os.getpid(), J.process_start_ticks())
        outer = journal.begin(_record(parent=7, start=10), None, b"outer")
        inner_record = _record(parent=42, start=11)
        snaps = [describe.snapshot(torch.ones(3, 5))]
        inner = journal.begin(inner_record, snaps, b"inner", _plan(), None)
        data = path.read_bytes()
        notes = list(fmt.iter_live(data, fmt.parse_header(data)))
        assert [(n.name, n.parent_span_id, n.start_ns) for n in notes] == [
            ("outer", 7, 10), ("inner", 42, 11)]
        assert notes[0].trace_id == (1 << 127) | 3 and notes[0].span_id == 42
        assert fmt.decode_args(notes[1].args)["flashinfer.arg.q.shape"] == [3, 5]
        assert notes[0].args == b""
        journal.end(inner)
        journal.end(inner)  # twice: harmless
        data = path.read_bytes()
        assert [n.name for n in fmt.iter_live(data, fmt.parse_header(data))] == ["outer"]
        journal.end(outer)
        assert journal.live_count() == 0
    finally:
        journal.close()
    assert not path.exists()


def test_a_full_ring_skips_and_counts(tmp_path: Path) -> None:
    health.reset()
    journal = J.Journal(str(tmp_path), slot_count=2)
    try:
        tokens = [journal.begin(_record(), None, b"f") for _ in range(3)]
        assert tokens[2] is None and None not in tokens[:2]
        assert health.counters()["journal_full"] == 1
        journal.end(tokens[0])
        again = journal.begin(_record(), None, b"g")
        assert again is not None and journal.live_count() == 2
    finally:
        journal.close()


def test_heartbeat_moves_last_write(tmp_path: Path) -> None:
    journal = J.Journal(str(tmp_path))
    try:
        first = fmt.parse_header(Path(journal.path).read_bytes()).last_write_ns
        time.sleep(3 * J.HEARTBEAT_S)
        later = fmt.parse_header(Path(journal.path).read_bytes()).last_write_ns
        assert later > first
    finally:
        journal.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_journal(tmp_path: Path) -> None:
    journal = J.Journal(str(tmp_path))
    J._registry[str(tmp_path)] = journal
    try:
        token = journal.begin(_record(), None, b"parent-call")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: its notes go to a new file, the parent's stay
            try:
                journal.end(token)  # the parent's call: not the child's to clear
                child_token = journal.begin(_record(), None, b"child-call")
                os.write(write, f"{journal.path}|{child_token is not None}".encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child_path, ok = os.read(read, 4096).decode().split("|")
        os.close(read)
        assert ok == "True" and child_path != journal.path
        data = Path(journal.path).read_bytes()
        assert [n.name for n in fmt.iter_live(data, fmt.parse_header(data))] == ["parent-call"]
        data = Path(child_path).read_bytes()
        assert [n.name for n in fmt.iter_live(data, fmt.parse_header(data))] == ["child-call"]
        journal.end(token)
    finally:
        J._registry.pop(str(tmp_path), None)
        journal.close()


# ---- recovery ----------------------------------------------------------------------------

def test_dead_process_notes_become_error_records(tmp_path: Path) -> None:
    pid = _dead_pid()
    path = _write_journal(tmp_path, pid=pid, ticks=5, notes=[NOTE], last_write_ns=5_000)
    submitted: list[CallRecord] = []
    records = J.recover(str(tmp_path), submitted.append)
    assert records == submitted and len(records) == 1
    record = records[0]
    assert (record.trace_id, record.span_id, record.parent_span_id) == (
        NOTE["trace_id"], NOTE["span_id"], 0x99)
    assert record.parent.trace_flags.sampled
    assert (record.start_ns, record.end_ns) == (1_000, 5_000)
    assert record.name == "BatchDecodeWithPagedKVCacheWrapper.run"
    assert record.attributes == {
        "flashinfer.api": "BatchDecodeWithPagedKVCacheWrapper.run",
        "flashinfer.crash": True,
        "flashinfer.crash.pid": pid,
        "flashinfer.arg.q.shape": [8, 32, 128],
        "flashinfer.arg.q.dtype": "float16",
        "flashinfer.arg.sm_scale": 0.125,
    }
    assert record.error == ("ProcessCrash", f"process {pid} ended during this call", "")
    assert not path.exists() and os.listdir(tmp_path) == []


def test_end_time_is_never_before_the_start(tmp_path: Path) -> None:
    _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=10)
    (record,) = J.recover(str(tmp_path), lambda r: None)
    assert record.end_ns == record.start_ns == 1_000


def _without_heartbeat(data: bytes) -> bytes:
    return data[: fmt.LAST_WRITE_OFFSET] + data[fmt.LAST_WRITE_OFFSET + 8:]


def test_live_and_foreign_journals_are_left_alone(tmp_path: Path) -> None:
    mine = J.Journal(str(tmp_path))
    try:
        mine.begin(_record(), None, b"in-flight")
        mine_bytes = _without_heartbeat(Path(mine.path).read_bytes())
        other_host = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE],
                                    last_write_ns=5, host="another-node")
        code = ("import sys; from otel_flashinfer.journal import recover; "
                f"print(len(recover({str(tmp_path)!r}, lambda r: None)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert out.stdout.strip() == "0", out.stderr
        assert _without_heartbeat(Path(mine.path).read_bytes()) == mine_bytes
        assert other_host.exists()
        assert len(J.recover(str(tmp_path), lambda r: None, all_hosts=True)) == 1
        assert not other_host.exists() and Path(mine.path).exists()
    finally:
        mine.close()


def test_a_reused_pid_does_not_keep_a_journal_alive(tmp_path: Path) -> None:
    # Our own pid, but another start time: the process that wrote it is gone.
    ticks = J.process_start_ticks() - 1
    path = _write_journal(tmp_path, pid=os.getpid(), ticks=ticks, notes=[NOTE],
                          last_write_ns=5)
    assert J.process_alive(os.getpid(), J.process_start_ticks())
    assert not J.process_alive(os.getpid(), ticks)
    assert len(J.recover(str(tmp_path), lambda r: None, exclude_pid=os.getpid())) == 1
    assert not path.exists()


def test_after_a_reboot_the_same_pid_is_another_process(tmp_path: Path) -> None:
    path = _write_journal(tmp_path, pid=os.getpid(), ticks=J.process_start_ticks(),
                          notes=[NOTE], last_write_ns=5, boot="an-earlier-boot")
    assert len(J.recover(str(tmp_path), lambda r: None)) == 1
    assert not path.exists()


# ---- liveness by lock: PID namespaces, forks -----------------------------------------------

WRITER = """
import sys, time
from otel_flashinfer import journal as J
from otel_flashinfer.pipeline import CallRecord
journal = J.Journal(sys.argv[1])
journal.begin(CallRecord("f", 77, 88, None, 123, 0, {}), None, b"running-elsewhere")
print(journal.path, flush=True)
time.sleep(120)
"""


def _start_writer(tmp_path: Path, *prefix: str) -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([*prefix, sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.skip(f"the writer did not start: {proc.stderr.read()[-300:]}")
    return proc, Path(line)


def _pid_namespaces_available() -> bool:
    try:
        out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                              "true"],
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def test_a_live_writer_in_another_pid_namespace_keeps_its_journal(tmp_path: Path) -> None:
    """A container sharing the folder and the host name: its pid means nothing here,
    so the pid check called it dead and recovered a running process's calls."""
    if not _pid_namespaces_available():
        pytest.skip("unshare --pid is not permitted on this machine")
    proc, path = _start_writer(tmp_path, "unshare", "--pid", "--fork", "--mount-proc",
                               "--kill-child")
    try:
        header = fmt.parse_header(path.read_bytes())
        assert header.flags & fmt.HEADER_LOCKED
        # Its pid in its own namespace is tiny; here that pid is someone else's.
        assert not J.process_alive(header.pid, header.start_ticks)
        assert J.recover(str(tmp_path), lambda r: None) == []
        assert path.exists()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10  # unshare's child, the writer, goes with it
    records = J.recover(str(tmp_path), lambda r: None)
    while not records and time.monotonic() < deadline:
        time.sleep(0.05)
        records = J.recover(str(tmp_path), lambda r: None)
    assert [r.name for r in records] == ["running-elsewhere"]
    assert not path.exists()


def test_a_locked_journal_is_alive_whatever_its_pid_says(tmp_path: Path) -> None:
    """The same rule without needing a namespace: a process holds the lock on a journal
    whose header names a dead pid."""
    path = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'rb'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert J.recover(str(tmp_path), lambda r: None) == []
        assert path.exists()
    finally:
        holder.kill()
        holder.wait()
    assert len(J.recover(str(tmp_path), lambda r: None)) == 1


def test_a_free_lock_means_dead_even_where_the_pid_runs(tmp_path: Path) -> None:
    """A locking writer's file whose lock is free: its writer is gone, even when the pid
    and start time it names are those of a process here (another namespace's numbers)."""
    buf = bytearray(fmt.file_size(8, fmt.DEFAULT_SLOT_SIZE))
    fmt.pack_header(buf, slot_count=8, slot_size=fmt.DEFAULT_SLOT_SIZE, pid=1,
                    start_ticks=J.process_start_ticks(1) or 0, created_ns=1,
                    boot_id=J.boot_id(), hostname=HOST, flags=fmt.HEADER_LOCKED)
    fmt.pack_slot(buf, fmt.HEADER_SIZE, **NOTE)
    path = tmp_path / J.journal_name(HOST, 1, 5)
    path.write_bytes(bytes(buf))
    assert J.process_alive(1, J.process_start_ticks(1) or 0)
    assert len(J.recover(str(tmp_path), lambda r: None)) == 1
    assert not path.exists()


def test_a_forked_child_does_not_keep_its_dead_parents_journal_alive(tmp_path: Path) -> None:
    """The lock belongs to the open file, which a fork shares: the child must drop its
    copy, or a parent killed while the child runs would look alive."""
    code = f"""
import os, signal, sys, time
from otel_flashinfer import journal as J
from otel_flashinfer.pipeline import CallRecord
journal = J.Journal({str(tmp_path)!r})
J._registry[{str(tmp_path)!r}] = journal
journal.begin(CallRecord("f", 77, 88, None, 123, 0, {{}}), None, b"parent-call")
if os.fork() == 0:
    print(journal.path, flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        child_path = Path(proc.stdout.readline().strip())
        assert proc.wait(timeout=30) == -9
        records = J.recover(str(tmp_path), lambda r: None)
        assert [r.name for r in records] == ["parent-call"]
        assert child_path.exists()  # the child runs: its own journal stays
    finally:
        os.killpg(proc.pid, 9)


def test_a_name_taken_by_a_new_file_after_the_lock_is_given_back(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A process that exec'd keeps its pid and start time, so its new journal takes the
    old one's name.  A recoverer that locked the old file renamed whatever the name
    held by then, read the old file's notes, and deleted the new, live journal."""
    old = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)
    buf = bytearray(old.read_bytes())
    fmt.pack_slot(buf, fmt.HEADER_SIZE, **dict(NOTE, span_id=0x5151, name=b"after-exec"))
    new_bytes = bytes(buf)
    real_lock = J._try_lock  # noqa: SLF001

    def exec_meanwhile(fd: int, shared: bool = False) -> bool | None:
        tmp = tmp_path / ".tmp-new"
        tmp.write_bytes(new_bytes)
        os.rename(tmp, old)  # the exec'd image's journal, under the same name
        return real_lock(fd, shared)

    monkeypatch.setattr(J, "_try_lock", exec_meanwhile)
    assert J.recover(str(tmp_path), lambda r: None) == []
    assert old.read_bytes() == new_bytes  # the new file kept its name and its notes


def test_a_claim_put_back_never_replaces_a_journal_that_took_its_name(
        tmp_path: Path) -> None:
    """Recovery that could not export puts the journal back: a rename replaced the live
    journal a process that exec'd had published under the same name meanwhile, and that
    process's clean stop then deleted the crashed calls' notes."""
    old = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)
    J._write_sidecar(f"{old}{J.BLOBS}", "s3://crash-safe/store")  # noqa: SLF001
    (claim,) = J.claim_journals(str(tmp_path))
    live = old.with_name(old.name)  # the name is free now: a new journal takes it
    live.write_bytes(b"live journal")
    J.finish_claims([claim], exported=False)
    assert live.read_bytes() == b"live journal"
    (back,) = [n for n in os.listdir(tmp_path)
               if n.endswith(J.SUFFIX) and n != old.name]
    assert J.parse_journal_name(back) == J.parse_journal_name(old.name)
    # Its crash-safe sidecar went with it (the old name's is the new journal's now).
    assert J._read_sidecar(str(tmp_path / back) + J.BLOBS) == "s3://crash-safe/store"  # noqa: SLF001
    live.unlink()
    assert [r.name for r in J.recover(str(tmp_path), lambda r: None)] == [NOTE["name"].decode()]


def test_a_fork_while_claims_are_settled_leaves_the_child_no_lock(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """``settle`` took the claims off its list before finishing them: a child forked
    in between kept copies of their locks, and the journals put back looked held while
    it ran."""
    for ticks in (5, 6):
        _write_journal(tmp_path, pid=_dead_pid(), ticks=ticks, notes=[NOTE],
                       last_write_ns=5)
    (tmp_path / "own").mkdir()
    journal = J.Journal(str(tmp_path / "own"))
    J._registry["probe"] = journal  # noqa: SLF001 - where the fork hook finds it
    journal.recovered = J.Recovered(J.claim_journals(str(tmp_path)), health.dropped())
    second_fd = journal.recovered.claims[1].fd
    finish = J.Claim.finish
    read, write = os.pipe()

    def fork_in_the_middle(claim: J.Claim, exported: bool = True) -> None:
        if claim.fd != second_fd:  # the first: fork before the second is finished
            pid = os.fork()
            if pid == 0:
                try:
                    os.fstat(second_fd)
                    os.write(write, b"open")
                except OSError:
                    os.write(write, b"closed")
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        finish(claim, exported)

    monkeypatch.setattr(J.Claim, "finish", fork_in_the_middle)
    try:
        journal.recovered.settle(False)
        assert os.read(read, 16) == b"closed"
    finally:
        os.close(read)
        os.close(write)
        J._registry.pop("probe", None)  # noqa: SLF001
        journal.close()


def test_names_parse_with_dots_and_dashes_in_the_host(tmp_path: Path) -> None:
    assert J.parse_journal_name("node.journal.lan-12-34.journal") == ("node.journal.lan", 12,
                                                                      34)
    assert J.parse_journal_name("a-b-12-34.n0f3a.journal") == ("a-b", 12, 34)
    assert J.parse_journal_name("x-1-2.journal.recovering.5-6") is None


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_journal_never_replaces_another_of_the_same_name(tmp_path: Path, monkeypatch,
                                                           hard_links: bool) -> None:
    """Two containers sharing the folder and the host name, both pid 1, started in the
    same clock tick: the second journal's rename replaced the first's live file.  Also
    on a file system without hard links (vfat, some FUSE), where a rename is the way."""
    if not hard_links:
        def no_links(src: str, dst: str) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(J.os, "link", no_links)
    ticks = J.process_start_ticks() or 0
    theirs = _write_journal(tmp_path, pid=os.getpid(), ticks=ticks, notes=[NOTE],
                            last_write_ns=5)
    before = theirs.read_bytes()
    journal = J.Journal(str(tmp_path))
    try:
        assert journal.path != str(theirs)
        assert theirs.read_bytes() == before
        assert J.parse_journal_name(os.path.basename(journal.path)) == (HOST, os.getpid(),
                                                                        ticks)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    finally:
        journal.close()
    assert theirs.exists()  # our clean exit deletes our file, never theirs


def test_corrupt_and_truncated_journals_are_reported_and_moved_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    health.reset()
    good = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)
    truncated = _write_journal(tmp_path, pid=_dead_pid(), ticks=6, notes=[NOTE],
                               last_write_ns=5)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    garbage = tmp_path / J.journal_name(HOST, _dead_pid(), 7)
    garbage.write_bytes(os.urandom(5000))
    bad_slot = _write_journal(tmp_path, pid=_dead_pid(), ticks=8, notes=[NOTE],
                              last_write_ns=5)
    data = bytearray(bad_slot.read_bytes())
    data[fmt.HEADER_SIZE + fmt.STATE_OFFSET] = 0xEE
    bad_slot.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="otel_flashinfer"):
        records = J.recover(str(tmp_path), lambda r: None)
    # the good journal's note, and the one still whole in the truncated file
    assert len(records) == 2 and not good.exists()
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(p.name.replace(".journal", ".journal.corrupt")
                           for p in (truncated, garbage, bad_slot))
    assert health.counters()["journal_corrupt"] == 3
    for path in (truncated, garbage, bad_slot):
        assert any(str(path) in r.getMessage() for r in caplog.records)
    # Moved-aside files are not looked at again.
    assert J.recover(str(tmp_path), lambda r: None) == []


def _notes(n: int, **change: int) -> list[dict]:
    return [dict(NOTE, span_id=0x100 + i, start_ns=1_000 + i, **change) for i in range(n)]


@pytest.mark.parametrize("damage", ["torn_state", "bad_start", "zero_trace", "truncated"])
def test_one_damaged_slot_costs_only_itself(tmp_path: Path, damage: str) -> None:
    """Whole slots around a torn one (or the slots a truncated file still holds) are
    recovered; the file is kept aside and the damage counted."""
    health.reset()
    notes = _notes(4)
    if damage == "bad_start":
        notes[3]["start_ns"] = -5
    if damage == "zero_trace":
        notes[3]["trace_id"] = 0
    path = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=notes, last_write_ns=5)
    data = bytearray(path.read_bytes())
    if damage == "torn_state":
        data[fmt.HEADER_SIZE + 3 * fmt.DEFAULT_SLOT_SIZE + fmt.STATE_OFFSET] = 0x7F
    if damage == "truncated":
        data = data[:fmt.HEADER_SIZE + 3 * fmt.DEFAULT_SLOT_SIZE + 100]
    path.write_bytes(bytes(data))
    records = J.recover(str(tmp_path), lambda r: None)
    assert sorted(r.span_id for r in records) == [0x100, 0x101, 0x102]
    assert all(r.end_ns >= r.start_ns > 0 for r in records)
    assert os.listdir(tmp_path) == [path.name + ".corrupt"]
    assert health.counters()["journal_bad_slots"] == 1
    assert J.recover(str(tmp_path), lambda r: None) == []  # not read again


def test_a_bad_last_write_time_does_not_make_a_bad_span(tmp_path: Path) -> None:
    path = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=_notes(1),
                          last_write_ns=-7)
    (record,) = J.recover(str(tmp_path), lambda r: None)
    assert record.end_ns == record.start_ns == 1_000 and not path.exists()


def test_half_made_journals_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f".tmp-{_dead_pid()}-1"
    live = tmp_path / f".tmp-{os.getpid()}-2"
    for path in (dead, live):
        path.write_bytes(b"\x00" * 10)
        os.utime(path, (time.time() - 120, time.time() - 120))
    assert J.recover(str(tmp_path), lambda r: None) == []
    assert not dead.exists() and live.exists()


def test_a_corrupt_looking_journal_of_a_live_process_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / J.journal_name(HOST, os.getpid(), J.process_start_ticks())
    path.write_bytes(b"\x00" * 100)
    assert J.recover(str(tmp_path), lambda r: None) == []
    assert path.read_bytes() == b"\x00" * 100


def test_a_claim_left_by_a_dead_recoverer_is_taken_over(tmp_path: Path) -> None:
    path = _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)
    stale = Path(f"{path}{J.CLAIM}{_dead_pid()}-1")
    path.rename(stale)
    live_claim = _write_journal(tmp_path, pid=_dead_pid(), ticks=6, notes=[NOTE],
                                last_write_ns=5)
    held = Path(f"{live_claim}{J.CLAIM}{os.getpid()}-{J.process_start_ticks()}")
    live_claim.rename(held)
    records = J.recover(str(tmp_path), lambda r: None)
    assert len(records) == 1 and not stale.exists()
    assert held.exists()  # its recoverer (us, here) is alive


def test_racing_recoverers_claim_each_journal_once(tmp_path: Path) -> None:
    for ticks in range(20):
        _write_journal(tmp_path, pid=_dead_pid(), ticks=ticks + 1,
                       notes=[dict(NOTE, span_id=ticks + 1)], last_write_ns=5)
    code = ("import json, sys; from otel_flashinfer.journal import recover; "
            f"print(json.dumps([r.span_id for r in recover({str(tmp_path)!r}, "
            "lambda r: None)]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env,
                              text=True) for _ in range(3)]
    found = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sorted(i for ids in found for i in ids) == list(range(1, 21))
    assert os.listdir(tmp_path) == []


def test_open_journal_recovers_once_and_is_shared(tmp_path: Path) -> None:
    _write_journal(tmp_path, pid=_dead_pid(), ticks=5, notes=[NOTE], last_write_ns=5)

    class Runtime:
        class pipeline:  # noqa: N801 - stands in for the runtime's pipeline
            submitted: list[CallRecord] = []
            submit = submitted.append
            flushed = threading.Event()

            @classmethod
            def flush(cls, timeout_s: float) -> bool:
                cls.flushed.set()
                return True

    settings = type("S", (), {"journal_dir": str(tmp_path)})()
    first = J.open_journal(settings, Runtime)
    second = J.open_journal(settings, Runtime)
    try:
        assert first is second
        assert len(Runtime.pipeline.submitted) == 1
        assert Runtime.pipeline.flushed.wait(10)
        _wait_for(lambda: len(os.listdir(tmp_path)) == 1)  # the recovered one deleted
        first.close()
        assert Path(second.path).exists()  # still used by the second runtime
    finally:
        second.close()
    assert os.listdir(tmp_path) == []


def test_heartbeat_stops_quietly_on_a_closed_mapping(tmp_path) -> None:
    """close() (or a fork's reset) can unmap the ring between two heartbeats: the
    heartbeat thread must end, not die with a TypeError from the closed mmap."""
    import mmap
    import threading

    journal = J.Journal(str(tmp_path))
    try:
        mm = mmap.mmap(-1, 4096)
        mm.close()
        stop = threading.Event()
        journal._heartbeat(mm, stop)  # returns instead of raising
        assert not stop.is_set()
    finally:
        journal.close()


def test_a_traced_call_is_noted_while_it_runs_with_its_own_argument_types(
        tmp_path: Path) -> None:
    """Through the wrapper (C hot path and Python): the live note of each call holds its
    ids, name and arguments, and calls whose arguments are equal but of other types
    (1, True, 1.0) or other shapes never reuse another call's bytes."""
    from opentelemetry import trace

    otel_flashinfer.instrument(level=3, journal_dir=str(tmp_path))
    seen: list[tuple[Any, ...]] = []

    def scale(x: torch.Tensor, factor: Any = 2) -> torch.Tensor:
        journal = runtime.current().journal
        data = Path(journal.path).read_bytes()
        notes = list(fmt.iter_live(data, fmt.parse_header(data)))
        span = trace.get_current_span().get_span_context()
        seen.append((notes, span))
        return x

    traced = otel_flashinfer.traced(scale, name="scale")
    try:
        tracer = trace.get_tracer("engine")
        with tracer.start_as_current_span("step") as step:
            for x, factor in ((torch.ones(2, 3), 1), (torch.ones(2, 3), True),
                              (torch.ones(2, 3), 1.0), (torch.ones(4, 3), 1.0),
                              (torch.ones(4, 3), 1.0)):
                traced(x, factor)
        for (notes, span), (shape, factor) in zip(seen, (
                ([2, 3], 1), ([2, 3], True), ([2, 3], 1.0), ([4, 3], 1.0), ([4, 3], 1.0)),
                strict=True):
            assert len(notes) == 1
            note = notes[0]
            assert note.name == "scale"
            assert (note.trace_id, note.span_id) == (span.trace_id, span.span_id)
            assert note.parent_span_id == step.get_span_context().span_id
            args = fmt.decode_args(note.args)
            assert args["flashinfer.arg.x.shape"] == shape
            assert args["flashinfer.arg.factor"] == factor
            assert type(args["flashinfer.arg.factor"]) is type(factor)
        assert runtime.current().journal.live_count() == 0
    finally:
        otel_flashinfer.uninstrument()


# ---- untrusted files in the folder (a review of 2026-12-07) ------------------------------

def test_a_slot_nested_past_the_parser_does_not_stop_the_files_other_spans(
        tmp_path: Path) -> None:
    """Deeply nested arguments in one slot raised RecursionError after the claim: the
    file's other spans were never sent and its claim was retried, failing, forever."""
    pid = _dead_pid()
    bad = dict(NOTE, span_id=0x22, name=b"bad_call", args=b"[" * 3000)
    _write_journal(tmp_path, pid=pid, ticks=1, notes=[NOTE, bad], last_write_ns=5_000,
                   slot_size=4096)
    got: list[CallRecord] = []
    records = J.recover(str(tmp_path), got.append)
    assert sorted(r.span_id for r in got) == [0x22, NOTE["span_id"]] and len(records) == 2
    (unreadable,) = [r for r in got if r.span_id == 0x22]
    assert unreadable.attributes["flashinfer.crash.args_unreadable"] is True
    assert os.listdir(tmp_path) == []


def test_another_hosts_unreadable_journal_is_left_where_it_is(tmp_path: Path) -> None:
    """A file of another machine that this version cannot read (a newer format, say):
    not ours to move aside without ``all_hosts``."""
    path = _write_journal(tmp_path, pid=1234, ticks=99, notes=[NOTE], last_write_ns=5,
                          host="gpu-node-8", boot="other-boot")
    data = bytearray(path.read_bytes())
    data[:4] = b"XXXX"  # its header unreadable here
    path.write_bytes(bytes(data))
    assert J.recover(str(tmp_path), lambda r: None) == []
    assert os.listdir(tmp_path) == [path.name]


def test_a_fifo_named_as_a_journal_is_skipped_not_opened(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: recovery (at every
    instrumented process's start) hung on one."""
    fifo = tmp_path / J.journal_name(HOST, _dead_pid(), 1)
    os.mkfifo(fifo)
    (tmp_path / "elsewhere").mkdir()
    os.mkfifo(tmp_path / "elsewhere" / "f")
    os.symlink(tmp_path / "elsewhere" / "f", tmp_path / J.journal_name(HOST, _dead_pid(), 2))
    before = health.counters().get("journal_not_a_file", 0)
    assert J.recover(str(tmp_path), lambda r: None) == []  # returned: not blocked
    assert health.counters().get("journal_not_a_file", 0) - before == 2


def test_the_crash_safe_note_is_written_through_a_fresh_temp_file(tmp_path: Path) -> None:
    """Its temp name was predictable (``.tmp-<pid>``) and opened following links: a link
    planted there made us overwrite a file outside the folder."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    note = journal_dir / ("x.journal" + J.BLOBS)
    os.symlink(victim, str(note) + f".tmp-{os.getpid()}")
    J._write_sidecar(str(note), "s3://bucket/x")  # noqa: SLF001
    assert victim.read_text() == "keep"
    assert json.loads(note.read_text()) == {"blob_url": "s3://bucket/x"}


def test_a_fork_that_cannot_make_its_journal_leaves_the_parents_alone(
        tmp_path: Path, monkeypatch) -> None:
    """The child's journal path named the parent's file until its own was made, so a
    child that could not make one (out of file descriptors) unlinked the parent's live
    journal at its exit."""
    journal = J.Journal(str(tmp_path), slot_count=4)
    parents = journal.path
    try:
        def no_fds(*args: Any, **kwargs: Any) -> int:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(J.os, "open", no_fds)
        journal._after_fork_in_child()  # noqa: SLF001 - as the fork hook runs it
        monkeypatch.undo()
        assert journal.path == ""
        journal._release(delete=True)  # noqa: SLF001 - as the child's exit does
        assert os.path.exists(parents)
    finally:
        os.unlink(parents)


def test_the_python_wrapper_ends_its_note_when_an_after_hook_fails(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A failing after-hook (statistics, blobs) skipped ``journal.end``: finished calls
    stayed live in the journal (a later crash would recover them all as crashed)."""
    from otel_flashinfer import native

    monkeypatch.setattr(native, "enabled", False)
    otel_flashinfer.instrument(level=1, journal_dir=str(tmp_path))
    try:
        rt = runtime.current()
        hooks = type(rt).call_hooks

        def failing(record: Any, state: Any, result: Any, exc: Any) -> None:
            raise RuntimeError("an after-hook's bug")

        monkeypatch.setattr(type(rt), "call_hooks", lambda self, level: [
            *hooks(self, level), (lambda record, plan, args, kwargs: None, failing)])
        k = otel_flashinfer.traced(lambda: 1, name="k")
        assert [k() for _ in range(20)] == [1] * 20
        (path,) = [tmp_path / n for n in os.listdir(tmp_path) if n.endswith(".journal")]
        data = path.read_bytes()
        assert list(fmt.iter_live(data, fmt.parse_header(data))) == []
    finally:
        otel_flashinfer.uninstrument()
