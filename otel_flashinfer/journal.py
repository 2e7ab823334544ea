"""The crash journal: every traced call is noted in a memory-mapped ring before it
runs, so a call that kills the process still becomes a span.

Spans are built in the background, so a SIGKILL or a segfault inside a kernel would
lose exactly the call people need to see.  A note in a ``MAP_SHARED`` mapping lives
in the page cache, which outlives the process; the next instrumented process on the
machine (or ``otel-flashinfer recover``) turns the notes of dead processes into spans
with the same ids, status ERROR and ``flashinfer.crash = true``.

Hot path (``begin``/``end``): a pop from the free-slot stack, one ``struct.pack_into``
on the mapping, one byte store to clear it, no syscall.  Thread safety: ``list.pop``
and ``list.append`` are atomic under the GIL, so concurrent callers (and nested
calls) each get their own slot; ``end`` takes a token (the slot and the mapping's
epoch) and ignores one that no longer owns its slot (a call begun before a fork).  When every
slot is live the call is not noted (counted as ``journal_full``).  A heartbeat thread
stamps the header's last-write time a few
times a second, which bounds a crashed call's end time from below.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import itertools
import json
import logging
import mmap
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanContext, TraceFlags

from . import health, threads
from . import journal_format as fmt
from .pipeline import CallRecord

logger = logging.getLogger("otel_flashinfer")

SUFFIX = ".journal"
BLOBS = ".blobs"  # sidecar of a CRASH_SAFE level-10 process: {"blob_url": ...}
CLAIM = ".recovering."
CORRUPT = ".corrupt"
HEARTBEAT_S = 0.2
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_M64 = (1 << 64) - 1


# ---- process identity -------------------------------------------------------------------

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _try_lock(fd: int, shared: bool = False) -> bool | None:
    """``flock`` without waiting: True if we now hold it, False if another open file
    holds it (its process runs), None where the file system has no such locks."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, EINVAL: a file system without flock
        return None
    return True


def process_start_ticks(pid: int | str = "self") -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot): with the
    pid it names one process even after the pid is reused.  None if there is no such
    process; 0 where /proc does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None if os.path.isdir("/proc/self") else 0
    except OSError:
        return 0
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    return int(rest[19])


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_alive(pid: int, start_ticks: int) -> bool:
    """Whether the process that wrote a journal still runs (same pid, same start)."""
    if pid <= 0:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None:
        return False
    if ticks and start_ticks and ticks != start_ticks:
        return False  # the pid now belongs to another process
    if ticks == 0:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def journal_name(hostname: str, pid: int, start_ticks: int) -> str:
    return f"{hostname}-{pid}-{start_ticks}{SUFFIX}"


def parse_journal_name(name: str) -> tuple[str, int, int] | None:
    """(hostname, pid, start ticks) from a journal's file name, or None."""
    stem = name.removesuffix(SUFFIX)
    parts = stem.rsplit("-", 2)
    if len(parts) != 3:
        return None
    ticks = parts[2].split(".", 1)[0]  # a name made unique (``_publish``): ``.n<hex>``
    if not parts[1].isdigit() or not ticks.isdigit():
        return None
    return parts[0], int(parts[1]), int(ticks)


def _publish(tmp: str, path: str) -> str:
    """Give the finished file ``tmp`` its name without replacing another's: two
    containers sharing the folder and the host name may both be pid 1, started in the
    same clock tick.  Returns the name it got (``path``, or one made unique)."""
    for attempt in range(8):
        target = path if attempt == 0 else \
            f"{path[:-len(SUFFIX)]}.n{os.urandom(4).hex()}{SUFFIX}"
        try:
            os.link(tmp, target)
        except FileExistsError:
            continue
        except OSError:  # no hard links here (some network and FUSE file systems)
            if os.path.lexists(target):  # a rename would replace it (racy, but rare)
                continue
            os.rename(tmp, target)
            return target
        os.unlink(tmp)
        return target
    raise FileExistsError(f"no free crash journal name next to {path}")


# ---- the writer -------------------------------------------------------------------------

class Journal:
    """One process's ring of call notes in ``<dir>/<host>-<pid>-<start>.journal``."""

    def __init__(self, directory: str, slot_count: int = fmt.DEFAULT_SLOTS,
                 slot_size: int = fmt.DEFAULT_SLOT_SIZE) -> None:
        if slot_count & (slot_count - 1) or slot_count < 1:
            raise ValueError(f"slot_count must be a power of two, not {slot_count}")
        if slot_size < fmt.ARGS_OFFSET + 16:
            raise ValueError(f"slot_size must be at least {fmt.ARGS_OFFSET + 16}")
        self.directory = directory
        self.slot_count = slot_count
        self.slot_size = slot_size
        self._mask = slot_count - 1
        self._shift = slot_count.bit_length()
        self._offsets = [fmt.HEADER_SIZE + i * slot_size for i in range(slot_count)]
        self._encoder = fmt.ArgEncoder(slot_size - fmt.ARGS_OFFSET)
        self._users = 1
        self._stop = threading.Event()
        self._mm: mmap.mmap | None = None
        self._buf: Any = bytearray(fmt.file_size(slot_count, slot_size))
        self._epoch = 0
        self._reset_slots()
        self.path = ""
        self.blob_url = ""
        self._lock_fd = -1
        #: Journals of crashed processes this one recovered, until their spans are out.
        self.recovered: Recovered | None = None
        self._open_file()

    def _open_file(self) -> None:
        """Create the file under a temporary name with its header, then rename it, so
        a recoverer never sees a half-made journal; map it; start the heartbeat."""
        # Until this journal is made, the path names no file of ours: a forked child
        # that cannot make its own must not unlink its parent's at exit (``_at_exit``).
        self.path = ""
        pid = os.getpid()
        start_ticks = process_start_ticks() or 0
        host = socket.gethostname()
        path = os.path.join(self.directory, journal_name(host, pid, start_ticks))
        tmp = os.path.join(self.directory, f".tmp-{pid}-{time.time_ns()}-{os.urandom(4).hex()}")
        size = fmt.file_size(self.slot_count, self.slot_size)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o600)
        locked = False
        try:
            os.ftruncate(fd, size)
            # The disk blocks now: a full disk is an error here, not a SIGBUS at the first
            # note written into a sparse mapping.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:  # a file system without it keeps the sparse file
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # Held until the process ends (the kernel drops it even on SIGKILL), and
            # taken before the file has its name: "locked" means "its writer runs".
            locked = _try_lock(fd) is True
            fmt.pack_header(mm, slot_count=self.slot_count, slot_size=self.slot_size,
                            pid=pid, start_ticks=start_ticks,
                            created_ns=time.time_ns(), boot_id=boot_id(), hostname=host,
                            flags=fmt.HEADER_LOCKED if locked else 0)
            path = _publish(tmp, path)
        except BaseException:
            os.unlink(tmp)
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            fd = -1
        self._lock_fd = fd
        self.pid, self.start_ticks = pid, start_ticks
        self._reset_slots()
        # Tokens carry the mapping's epoch, so a call begun before a fork cannot end a
        # slot of the child's new journal.
        self._epoch = next(_epochs) << self._shift
        self._mm, self._buf, self.path = mm, mm, path
        self._publish()
        self._stop = threading.Event()
        thread = threading.Thread(target=self._heartbeat, args=(mm, self._stop),
                                  name="otel_flashinfer-journal", daemon=True)
        threads.start(thread)
        if self.blob_url:
            self.set_blob_url(self.blob_url)

    def set_blob_url(self, url: str) -> None:
        """CRASH_SAFE at level 10: name the blob store whose ``pending`` manifests
        recovery must complete as ``crashed`` (a small file next to the journal,
        written once, never on the hot path)."""
        self.blob_url = url
        _write_sidecar(self.path + BLOBS, url)

    def _reset_slots(self) -> None:
        """Every slot free; the lowest first, so a program that is one call deep keeps
        writing the same cache lines."""
        self._owners = [0] * self.slot_count
        self._free = list(range(self.slot_count - 1, -1, -1))
        #: The argument bytes object last copied into each slot: a call whose encoding
        #: is that same (cached) object finds its bytes already there.
        self._written: list[bytes | None] = [None] * self.slot_count
        self._publish()

    def _publish(self) -> None:
        """The hot-path state in one tuple, read with one lookup by the C hot path
        (``csrc/hotpath.c``); rebuilt whenever any of it is replaced."""
        self._hot = (self._free, self._owners, self._offsets, self._buf, self._epoch,
                     self._written, self.slot_size, self._mask)

    def _heartbeat(self, mm: mmap.mmap, stop: threading.Event) -> None:
        pack, offset = fmt.LAST_WRITE.pack_into, fmt.LAST_WRITE_OFFSET
        try:
            while True:
                pack(mm, offset, time.time_ns())
                if stop.wait(HEARTBEAT_S):
                    return
        except (ValueError, OSError, TypeError):  # unmapped by close() (or a fork's reset):
            return  # a closed mmap raises TypeError from pack_into, ValueError elsewhere

    # ---- hot path ---------------------------------------------------------------------

    def begin(self, record: CallRecord, arg_snaps: Any, name_bytes: bytes,
              plan: Any = None, kw_snaps: Any = None) -> int | None:
        """Note a call that is about to run; returns the token ``end`` takes, or None
        when every slot is live.  ``arg_snaps``/``kw_snaps`` (level 3+) are describe
        snapshots, named by ``plan`` (the wrapper's ArgPlan) when given.  Everything
        that can fail runs before a slot is taken, so a failure never leaks one."""
        trace_id = record.trace_id
        hi, lo = trace_id >> 64, trace_id & _M64
        parent = record.parent
        parent_span = parent.span_id if parent is not None else 0
        args = (self._encoder.encode(arg_snaps, kw_snaps, plan)
                if arg_snaps is not None or kw_snaps else None)
        try:
            index = self._free.pop()
        except IndexError:
            health.count("journal_full")
            return None
        token = self._epoch | index
        self._owners[index] = token
        offset = self._offsets[index]
        buf = self._buf
        try:
            args_len = 0
            if args:
                args_len = len(args)
                if self._written[index] is not args:
                    start = offset + fmt.ARGS_OFFSET
                    self._written[index] = None
                    buf[start:start + args_len] = args
                    self._written[index] = args
            _pack_body(buf, offset, 0 if parent is None else 1, hi, lo, record.span_id,
                       parent_span, record.start_ns, len(name_bytes), args_len, name_bytes, 1)
        except BaseException:
            self.end(token)
            raise
        return token

    def end(self, token: int) -> None:
        """The call of ``token`` finished (normally or by raising): clear its note."""
        index = token & self._mask
        owners = self._owners
        if owners[index] == token:
            owners[index] = 0
            self._buf[self._offsets[index] + _STATE] = 0
            self._free.append(index)

    # ---- lifetime ---------------------------------------------------------------------

    def live_count(self) -> int:
        return sum(1 for owner in self._owners if owner)

    def close(self) -> None:
        """Drop one user; the last one unmaps the ring and deletes the file (a clean
        stop leaves nothing to recover)."""
        with _registry_lock:
            self._users -= 1
            if self._users > 0:
                return
            if _registry.get(self.directory) is self:
                del _registry[self.directory]
        self._release(delete=True)

    def _release(self, delete: bool) -> None:
        self._stop.set()
        mm, self._mm = self._mm, None
        # A new _hot tuple must be published (_reset_slots) before the mapping is
        # closed, and no _buf is ever resized: the C hot path caches the buffer pointer
        # of each published tuple.
        self._buf = bytearray(fmt.file_size(self.slot_count, self.slot_size))
        self._reset_slots()
        if delete and self.path:
            for path in (self.path, self.path + BLOBS):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        # After the unlink: a recoverer that finds the lock free finds no file either.
        self._close_lock()
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass

    def _close_lock(self) -> None:
        """Close the file's lock descriptor; the lock goes with the last descriptor
        of its open file, so a forked child closing its copy leaves the parent's."""
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _after_fork_in_child(self) -> None:
        """The parent's mapping is shared with us: stop writing to it and start a
        journal of our own (the parent still owns its file and its live calls)."""
        inherited, self._mm = self._mm, None  # the parent's: never written here
        # Never flock(LOCK_UN) here: that would unlock the parent's file too.
        self._close_lock()
        try:
            self._open_file()
        except Exception as exc:  # noqa: BLE001
            self._buf = bytearray(fmt.file_size(self.slot_count, self.slot_size))
            self._reset_slots()
            health.report("journal_errors", "could not open a crash journal after fork", exc)
        # Our copy of the mapping (and the descriptor mmap keeps with it) also holds the
        # parent's open file, hence its lock: a parent killed now must look dead.
        # Closed only after a new buffer is published (the C hot path caches it).
        if inherited is not None:
            try:
                inherited.close()
            except (BufferError, ValueError, OSError):
                pass


_pack_body = fmt.BODY.pack_into
_STATE = fmt.STATE_OFFSET
_registry_lock = threading.Lock()
_registry: dict[str, Journal] = {}
_epochs = itertools.count(1)


def _after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for journal in list(_registry.values()):
        if journal.recovered is not None:
            # The parent's to settle: our copies of their locks go (a killed parent's
            # claims must not look held while we run), and our exit must not decide.
            journal.recovered.forget_in_child()
            journal.recovered = None
        journal._after_fork_in_child()


def _at_exit() -> None:
    with _registry_lock:
        journals = list(_registry.values())
        _registry.clear()
    for journal in journals:
        if journal.pid == os.getpid():
            journal._release(delete=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
atexit.register(_at_exit)


def open_journal(settings: Any, runtime: Any) -> Journal:
    """The process's journal in ``settings.journal_dir`` (shared by successive
    ``instrument()`` calls); the first open also recovers the journals of processes
    that died there, through ``runtime.pipeline.submit``."""
    directory = os.path.abspath(settings.journal_dir)
    with _registry_lock:
        journal = _registry.get(directory)
        if journal is not None and journal.pid == os.getpid():
            journal._users += 1
            return journal
        os.makedirs(directory, exist_ok=True)
        journal = _registry[directory] = Journal(directory)
    if getattr(settings, "level", 0) >= 10 and getattr(settings, "crash_safe", False):
        try:
            journal.set_blob_url(absolute_url(settings.blob_url))
        except Exception as exc:  # noqa: BLE001
            health.report("journal_errors", "could not note the crash-safe blob store", exc)
    pipeline = runtime.pipeline if runtime is not None else None
    if pipeline is not None:
        claims = claim_journals(directory, exclude_pid=os.getpid())
        if claims:
            dropped = health.dropped()
            spans = 0
            for claim in claims:
                for record in claim.records:
                    pipeline.submit(record)
                spans += len(claim.records)
            logger.warning("otel_flashinfer: recovered %d in-flight call(s) of %d crashed "
                           "process(es) from %s", spans, len(claims), directory)
            # Deleted once they are out; with the receiver down, kept for the next start.
            journal.recovered = Recovered(claims, dropped)
            threads.start(threading.Thread(
                target=journal.recovered.when_flushed, args=(pipeline,),
                name="otel_flashinfer-recovered", daemon=True))
    return journal


#: How long a process waits for its recovered spans to go out before it keeps their
#: journals for the next recovery.
RECOVERED_FLUSH_S = 60.0


class Recovered:
    """The journals a process recovered at start-up, held (claimed and locked) until
    their spans are out: deleted once the pipeline flushed with nothing dropped since
    they were handed on, else put back for the next recovery.  A drop of any span in
    that time keeps them: the next recovery may then send some spans again, with the
    same ids, rather than lose them.  Decided once: by a background flush that went
    through (``when_flushed``), else when tracing stops or the process exits
    (``settle``); a process killed first leaves them claimed, which the next recoverer
    takes over."""

    def __init__(self, claims: list[Claim], dropped: int) -> None:
        self.claims, self.dropped = claims, dropped
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._finishing: list[Claim] = []

    def forget_in_child(self) -> None:
        """In a forked child: close its copies of the claims' descriptors (the parent's
        locks stay with the parent's) and settle nothing."""
        for claim in [*self.claims, *self._finishing]:
            if claim.fd >= 0:
                try:
                    os.close(claim.fd)
                except OSError:
                    pass
                claim.fd = -1
        self.claims, self._finishing = [], []
        self._lock = threading.Lock()

    def when_flushed(self, pipeline: Any) -> None:
        """In the background after recovery: settle on a flush that went through; one
        that did not (the receiver down, tracing stopped meanwhile) leaves the decision
        to the stop or the exit, whose own flush says."""
        try:
            flushed = bool(pipeline.flush(RECOVERED_FLUSH_S))
        except Exception as exc:  # noqa: BLE001
            health.report("journal_errors", "could not wait for recovered spans", exc)
            return
        if flushed:
            self.settle(True)

    def settle(self, flushed: bool) -> None:
        """``flushed``: whether every span handed on since was exported."""
        if os.getpid() != self._pid:
            return  # a forked child's view: the parent settles its own
        with self._lock:
            claims, self.claims = self.claims, []
            self._finishing = claims  # a fork meanwhile closes its copies of these too
        if not claims:
            return
        exported = flushed and health.dropped() == self.dropped
        finish_claims(claims, exported)
        self._finishing = []
        if not exported:
            logger.warning("otel_flashinfer: the recovered spans of %d crash journal(s) "
                           "were not all exported; the journals are kept for the next "
                           "recovery", len(claims))


# ---- recovery ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Me:
    pid: int
    ticks: int
    host: str
    boot: str


def _claim_owner_alive(name: str) -> bool:
    """A ``.recovering.<pid>-<ticks>`` file: whether its recoverer still runs."""
    tail = name.rsplit(CLAIM, 1)[1]
    pid_text, _, ticks_text = tail.partition("-")
    if not pid_text.isdigit():
        return False
    return process_alive(int(pid_text), int(ticks_text) if ticks_text.isdigit() else 0)


def _move_corrupt(path: str, base: str, reason: str) -> None:
    target = base + CORRUPT
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return  # another recoverer moved it
    health.report("journal_corrupt", f"crash journal {path} is corrupt ({reason}); moved "
                  f"aside to {target}")
    logger.error("otel_flashinfer: crash journal %s is corrupt (%s); moved to %s",
                 path, reason, target)


def notes_to_records(notes: list[fmt.SlotNote], header: fmt.Header) -> list[CallRecord]:
    """Live notes of a dead process -> finished, failed span records."""
    records = []
    for note in notes:
        parent = None
        if note.parent_span_id:
            parent = SpanContext(note.trace_id, note.parent_span_id, is_remote=False,
                                 trace_flags=_SAMPLED)
        attrs: dict[str, Any] = {
            "flashinfer.api": note.name,
            "flashinfer.crash": True,
            "flashinfer.crash.pid": header.pid,
        }
        try:
            attrs.update(fmt.decode_args(note.args))
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser
            health.count("journal_args_unreadable")
            attrs["flashinfer.crash.args_unreadable"] = True
        last = header.last_write_ns
        end_ns = max(last, note.start_ns) if 0 < last < fmt.MAX_TIME_NS else note.start_ns
        record = CallRecord(note.name, note.trace_id, note.span_id, parent, note.start_ns,
                            end_ns, attrs)
        record.error = ("ProcessCrash", f"process {header.pid} ended during this call", "")
        records.append(record)
    records.sort(key=lambda r: r.start_ns)
    return records


class Claim:
    """A journal this recoverer has taken: renamed to ``.recovering.<pid>-<ticks>`` and
    locked, its calls read as ``records``.  ``finish`` deletes it once its spans are
    out, or gives it back for a later recovery when they could not be sent."""

    def __init__(self, fd: int, path: str, base: str, records: list[CallRecord],
                 bad: list[str], blob_url: str = "") -> None:
        self.fd, self.path, self.base, self.records, self.bad = fd, path, base, records, bad
        #: The crash-safe sidecar's store (``BLOBS``), carried to a new name if the
        #: journal is put back under one.
        self.blob_url = blob_url

    def finish(self, exported: bool = True) -> None:
        if not self.path:
            return
        try:
            if not exported:
                # Back for the next recoverer, never over a name taken meanwhile (a
                # process that exec'd keeps its journal's name): then under a new one,
                # with its sidecar (the one under the old name is the new journal's).
                target = _publish(self.path, self.base)
                if target != self.base and self.blob_url:
                    _write_sidecar(target + BLOBS, self.blob_url)
            elif self.bad:
                # The readable slots went out; the file is kept aside for a look at the rest.
                health.count("journal_bad_slots", len(self.bad))
                _move_corrupt(self.path, self.base,
                              f"{len(self.bad)} unreadable part(s), first: {self.bad[0]}; "
                              f"{len(self.records)} span(s) recovered from the rest")
            else:
                os.unlink(self.path)
            if exported:
                try:
                    os.unlink(self.base + BLOBS)
                except FileNotFoundError:
                    pass
        finally:
            if self.fd >= 0:
                os.close(self.fd)  # releases the lock: after the file is gone or back
                self.fd = -1


def _writer_alive(header: fmt.Header, lock: bool | None, me: _Me) -> bool:
    """Whether the process that wrote a journal of this host still runs.  A writer that
    locks its file (``HEADER_LOCKED``) is judged by the lock alone on this kernel (the
    lock was free, or we would not be here): its pid may be another PID namespace's."""
    if header.flags & fmt.HEADER_LOCKED and lock is True and header.boot_id == me.boot:
        return False
    return header.boot_id == me.boot and process_alive(header.pid, header.start_ticks)


def _claim_one(path: str, name: str, me: _Me, exclude_pid: int | None,
               all_hosts: bool) -> Claim | None:
    """Take one journal file; None when it is not ours to take (live, foreign,
    claimed by a recoverer that runs)."""
    try:
        fd, head, size = _open_regular(path)
    except FileNotFoundError:
        return None
    except (OSError, fmt.JournalCorrupt):  # a FIFO, a symlink: never ours to read
        health.count("journal_not_a_file")
        return None
    # Held by its writer or by another recoverer, in any PID namespace of this kernel.
    lock = _try_lock(fd)
    if lock is False:
        os.close(fd)
        return None
    try:
        claim = _claim_locked(fd, path, head, size, name, me, exclude_pid, all_hosts, lock)
    except BaseException:
        os.close(fd)
        raise
    if claim is None or claim.fd < 0:
        os.close(fd)
    return claim


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open (and locked) as ``fd``."""
    try:
        named, held = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _moved(base: str) -> Claim:
    """A journal moved aside as corrupt: taken, with nothing to send or finish."""
    return Claim(-1, "", base, [], [])


def _claim_locked(fd: int, path: str, head: bytes, size: int, name: str, me: _Me,
                  exclude_pid: int | None, all_hosts: bool,
                  lock: bool | None) -> Claim | None:
    """``_claim_one`` for a file whose lock we now hold (``lock`` True) or whose file
    system has none (None)."""
    stale_claim = CLAIM in name
    base = os.path.join(os.path.dirname(path), name.split(CLAIM, 1)[0])
    from_name = parse_journal_name(os.path.basename(base))
    if stale_claim:
        # Free lock: its recoverer is gone, unless it is an older one that did not lock.
        if _claim_owner_alive(name):
            return None
    else:
        try:
            header = fmt.parse_header(head, size, allow_short=True)
        except fmt.JournalCorrupt as exc:
            if not _same_file(fd, path):
                return None  # renamed over since we read it: the next look sees the new one
            if from_name is None:
                _move_corrupt(path, base, str(exc))
                return _moved(base)
            host, pid, ticks = from_name
            if host != me.host and not all_hosts:
                # Another machine's (or another version's) file: not ours to judge.
                health.count("journal_foreign_host")
                return None
            if host == me.host and process_alive(pid, ticks):
                return None  # a live process's file, whatever it looks like
            _move_corrupt(path, base, str(exc))
            return _moved(base)
        pid, ticks = header.pid, header.start_ticks
        if pid == exclude_pid and (pid != me.pid or ticks == me.ticks):
            return None
        if header.hostname != me.host and not all_hosts:
            health.count("journal_foreign_host")
            return None
        if header.hostname == me.host and _writer_alive(header, lock, me):
            return None
    claimed = f"{base}{CLAIM}{me.pid}-{me.ticks}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None  # another recoverer won
    if not _same_file(fd, claimed):
        # The name went to a new file after we locked the old one (a process that
        # exec'd keeps its pid and start time, so its journal's name): give it back.
        try:
            _publish(claimed, path)
        except OSError:
            pass
        return None
    bad: list[str] = []
    try:
        data = _read_fd(fd)
        header = fmt.parse_header(data, allow_short=True)
        notes = list(fmt.iter_live(data, header, bad))
    except fmt.JournalCorrupt as exc:
        _move_corrupt(claimed, base, str(exc))
        return _moved(base)
    records = notes_to_records(notes, header)
    blob_url = _read_sidecar(base + BLOBS)
    if blob_url and records:
        try:
            complete_blob_manifests(records, blob_url, header.pid)
        except Exception as exc:  # noqa: BLE001 - the spans still go out
            health.report("journal_errors", f"could not complete the crash-safe manifests "
                          f"in {blob_url}", exc)
    return Claim(fd, claimed, base, records, bad, blob_url)


# ---- CRASH_SAFE level 10: completing the manifests of crashed calls ----------------------

def absolute_url(url: str) -> str:
    """A blob store URL that means the same store from any working directory."""
    return url if "://" in url else os.path.abspath(url)


def _write_sidecar(path: str, url: str) -> None:
    # A fresh, unpredictable temp name (O_EXCL): a link planted at a guessable one
    # cannot make us write elsewhere.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"blob_url": url}, handle)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_sidecar(path: str) -> str:
    """The blob store URL a crashed CRASH_SAFE process noted, or ''."""
    try:
        with open(path, encoding="utf-8") as handle:
            url = json.load(handle).get("blob_url", "")
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, AttributeError) as exc:
        health.report("journal_errors", f"unreadable crash-safe note {path}", exc)
        return ""
    return url if isinstance(url, str) else ""


def complete_blob_manifests(records: list[CallRecord], blob_url: str, pid: int) -> int:
    """Crashed calls whose CRASH_SAFE manifest was written before they ran: rewrite a
    ``pending`` manifest as ``crashed`` (its inputs are already stored) and point the
    recovered span at it (``flashinfer.blob.manifest``).  Manifests are found by one
    prefix listing per trace (matched on the span id).  Returns how many were found."""
    from .blobs import layout, manifest
    from .blobs.store import BlobStore

    store = BlobStore(blob_url, check_writable=False)
    by_trace: dict[int, list[CallRecord]] = {}
    for record in records:
        by_trace.setdefault(record.trace_id, []).append(record)
    found = 0
    for trace_id, group in by_trace.items():
        keys = {}
        for key in store.list_manifests(trace_id):
            keys[layout.parse_manifest_name(key.rsplit("/", 1)[1])[1]] = key
        for record in group:
            key = keys.get(layout.span_hex(record.span_id))
            if key is None:
                continue
            try:
                data = manifest.parse(store.get(key), key)
            except (OSError, manifest.ManifestError) as exc:
                health.report("journal_errors", f"unreadable crash-safe manifest {key}", exc)
                continue
            if data["status"] == "pending":
                data["status"] = "crashed"
                data["error"] = {"type": "ProcessCrash",
                                 "message": f"process {pid} ended during this call "
                                            "(completed from the crash journal)"}
                store.put_manifest(key, manifest.dumps(data))
            record.attributes["flashinfer.blob.manifest"] = store.url_of(key)
            found += 1
    return found


def _open_regular(path: str) -> tuple[int, bytes, int]:
    """An open descriptor, the header bytes and the file's size (enough to check for
    truncation); a name that is not a regular file (a FIFO, a device, a symlink) is
    refused without reading it, which would block on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise fmt.JournalCorrupt("not a regular file")
        return fd, os.pread(fd, fmt.HEADER_SIZE, 0), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_fd(fd: int) -> bytes:
    """The whole file behind ``fd`` (the one we locked, whatever its name is now)."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _remove_stale_tmp(path: str) -> None:
    """A journal its process never finished making (``.tmp-<pid>-<ns>``, died before
    the rename): nothing was noted in it yet."""
    pid_text = os.path.basename(path)[5:].split("-", 1)[0]
    try:
        old = time.time() - os.stat(path).st_mtime > 60
        if pid_text.isdigit() and old and process_start_ticks(int(pid_text)) is None:
            os.unlink(path)
    except OSError:
        pass


def finish_claims(claims: list[Claim], exported: bool) -> None:
    """``Claim.finish`` each; one that fails is reported, the others go on."""
    for claim in claims:
        try:
            claim.finish(exported)
        except OSError as exc:
            health.report("journal_errors", f"could not finish crash journal {claim.path}",
                          exc)


def claim_journals(journal_dir: str, *, exclude_pid: int | None = None,
                   all_hosts: bool = False) -> list[Claim]:
    """Take the journals of dead processes in ``journal_dir``; each ``Claim`` holds its
    calls as finished ERROR records (``flashinfer.crash = true``) until ``finish``.

    A journal is taken by locking and renaming it, so two recoverers emit each span
    once; the journal of a live process is never touched: its writer holds a lock on
    it (older files: same pid and start time, same boot).  A corrupt one is reported
    and moved aside as ``.corrupt``.  Journals written on another host are left alone
    unless ``all_hosts``.
    """
    try:
        names = sorted(os.listdir(journal_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    me = _Me(os.getpid(), process_start_ticks() or 0, socket.gethostname(), boot_id())
    claims: list[Claim] = []
    for name in names:
        if name.startswith(".tmp-"):
            _remove_stale_tmp(os.path.join(journal_dir, name))
            continue
        if not (name.endswith(SUFFIX) or (CLAIM in name and SUFFIX + CLAIM in name)):
            continue
        path = os.path.join(journal_dir, name)
        try:
            claim = _claim_one(path, name, me, exclude_pid, all_hosts)
        except Exception as exc:  # noqa: BLE001 - recovery must not stop the recoverer
            health.report("journal_errors", f"could not recover crash journal {path}", exc)
            continue
        if claim is not None:
            claims.append(claim)
    return claims


def recover_report(journal_dir: str, submit: Callable[[CallRecord], None], *,
                   exclude_pid: int | None = None,
                   all_hosts: bool = False) -> tuple[list[CallRecord], int]:
    """``recover``, also returning how many journals were recovered."""
    records: list[CallRecord] = []
    claims = claim_journals(journal_dir, exclude_pid=exclude_pid, all_hosts=all_hosts)
    for claim in claims:
        handed = False
        try:
            for record in claim.records:
                submit(record)
            records.extend(claim.records)
            handed = True
        finally:
            finish_claims([claim], handed)
    return records, len(claims)


def recover(journal_dir: str, submit: Callable[[CallRecord], None], *,
            exclude_pid: int | None = None, all_hosts: bool = False) -> list[CallRecord]:
    """Turn the live notes of dead processes' journals in ``journal_dir`` into ERROR
    spans handed to ``submit``, then delete the journals (``claim_journals``)."""
    return recover_report(journal_dir, submit, exclude_pid=exclude_pid,
                          all_hosts=all_hosts)[0]


__all__ = [
    "Claim",
    "Journal",
    "claim_journals",
    "finish_claims",
    "open_journal",
    "process_alive",
    "process_start_ticks",
    "recover",
    "recover_report",
]
