"""A content-addressed store over fsspec, with budgets shared across processes.

Objects are written only if absent and atomically (local: an unnamed file, linked in
whole, where the filesystem has ``O_TMPFILE``, else a temp name, renamed; object stores:
one PUT, which is atomic); manifests the same way (one that replaces another: a temp
name, renamed).  A file put in place so is whole or absent for every reader and across a
crash of the process (the page cache keeps it), which is what a flight recorder for CUDA
errors and killed engines needs; ``durable`` (``CRASH_SAFE``) also fsyncs each file
before it gets its name, for crashes that take the machine.  By default nothing is
fsynced: on the device an fsync per new object and per manifest held the writers back
to fewer calls a second than a decode loop makes, and the calls past the staging budget
were skipped.  Callers write a manifest only after every object it names is in place,
so a manifest never points at a missing or truncated object.  Several writer threads
may store the same object at once: a link fails on an existing name (a rename is
checked under a lock), so one copy lands, the others are discarded and only the first
counts as newly written.

``put_content`` names an object by its sha256, hashed before writing so that a
duplicate costs no write (hashing while writing, in chunks, measured no faster
here: sha256 runs at ~1.4 GB/s).

Budgets (``OTEL_FLASHINFER_BLOB_MAX_GB`` / ``_MAX_COUNT``): a call reserves one
count and an upper bound of its bytes before anything is copied; once written,
what dedup saved is given back.  The reservation is exact across threads (a
lock) and, for a local store, across every process writing to it (a counter
file ``.usage/counter`` under an fcntl record lock; delete it to reset the
budget).  The file is not touched per call: each process takes a small lease
from it (``_Lease``) and serves reservations from that in memory; leases count
in the file, so the limits still hold across processes, and none is kept near
the edge of the budget.  For remote stores (s3://, gs://, ...) the budget is per
process: object stores have no cheap atomic counter.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import multiprocessing.util
import os
import stat
import struct
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import fsspec

from .. import forking, threads
from . import layout, timed_io
from .buffers import nbytes as _nbytes
from .buffers import parts_of, write_all

log = logging.getLogger(__name__)

_COUNTER = struct.Struct("<qq")  # calls, bytes
#: Folders a store remembers having made (objects/ab/, one per trace, ...).
_MAX_DIRS = 4096


#: How long what the counter file said is trusted: meanwhile a lease is spent, and a
#: refusal repeated, without looking again.  Bounds how late a process notices that the
#: budget nears its edge or that another process gave some back (~10 looks a second).
_FRESH_S = 0.1
#: A lease holds at most this many calls ...
_LEASE_CALLS = 8
#: ... and at most 1/_LEASE_SHARE of either limit (large requests: up to 1/32 of bytes),
#: so that what idle processes hold stays a small part of the budget.
_LEASE_SHARE = 64
#: The longest a traced call waits for the counter file's lock (another process holding
#: it) before its payload is skipped as ``budget_busy``.
_CALLER_WAIT_S = 0.002
BUSY = "budget_busy"
#: How long an object seen stored is trusted without looking again (``_knows``); a
#: stored KV-cache page too (``fingerprint.PageMemo``).
KNOWN_FOR_S = 60.0
#: Object keys a store remembers as written before it forgets them all (``_remember``).
_KNOWN_MAX = 1 << 16
#: After a call found the file held, the calls in the next this many seconds skip as
#: ``BUSY`` without trying (they would each wait ``_CALLER_WAIT_S`` behind ``_lock``).
_BUSY_S = 0.01
#: How long a writer's release keeps trying a file locked by another process.
_WRITER_WAIT_S = 1.0
#: A look at the counter file that took longer than this (its reads and writes, on a
#: slow shared file system: 30 ms each in a test; or the GIL, which each system call
#: gives up, held by another thread for its switch interval: a caller would have waited
#: that long as well) marks the file slow for
#: ``_SLOW_FOR_S`` (a faster look clears it): meanwhile no traced call looks at it, a
#: thread of the lease's own tops the lease up once half of it is spent, and a call
#: that finds it spent skips its payload as ``BUSY`` rather than wait.
_SLOW_LOOK_S = 0.005  # what a call may wait on our background work at most
_SLOW_FOR_S = 10.0
#: On a slow file a lease is this many chunks: it must last while the top-up reads and
#: writes the file (30 ms a look in the test, against a call every 2 ms).
_SLOW_CHUNKS = 4


class StoreError(RuntimeError):
    """The store cannot be used (names the URL)."""


def _protocol(fs: Any) -> str:
    """A filesystem's protocol (the first of its names)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _in_process(fs: Any) -> bool:
    """A filesystem whose files live in this process's memory (``memory://``)."""
    return _protocol(fs) == "memory"


def _is_local(fs: Any) -> bool:
    return _protocol(fs) in ("file", "local")


def _over(count: int, nbytes: int, d_count: int, d_bytes: int, max_count: int,
          max_bytes: int) -> str | None:
    """Which limit taking ``d_count``/``d_bytes`` on top of ``count``/``nbytes`` breaks."""
    if d_count > 0 and count + d_count > max_count:
        return "max_count"
    if d_bytes > 0 and nbytes + d_bytes > max_bytes:
        return "max_bytes"
    return None


def _lease_size(chunk: int, free: int) -> int:
    """A chunk while twice that is free, else nothing: near the edge of the budget no
    process keeps a lease, so what is left goes to whichever asks first, as without."""
    return chunk if free >= 2 * chunk else 0


def _read_counter(fd: int) -> tuple[int, int, float]:
    """The file's counts, and the seconds the read took (``timed_io``)."""
    raw, took = timed_io.pread(fd, _COUNTER.size, 0)
    return (*_COUNTER.unpack(raw), took) if len(raw) == _COUNTER.size else (0, 0, took)


def _write_counter(fd: int, count: int, total: int) -> float:
    """Set the file's counts; the seconds the write took."""
    return timed_io.pwrite(fd, _COUNTER.pack(count, total), 0)


def _try_lock(fd: int, deadline: float) -> bool:
    """The file's exclusive lock without blocking, tried until ``deadline`` (at least
    once); False while another process holds it.  Other errors (a file system without
    locks: ENOLCK, ENOSYS) are raised, not taken for contention."""
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                return False
        time.sleep(0.0002)


class _Lease:
    """This process's share of a budget kept in a counter file, spent in memory.

    The file counts every process's reservations, leases included, so the limits hold
    across processes; a lease only moves a part of it into memory, where a reservation
    or release that fits costs no syscall (the calling thread neither waits on the file
    lock nor hands the GIL to a writer thread).  One locked look at the file tops the
    lease up to a chunk when a reservation does not fit, trims it when releases grow it
    past two chunks, and gives it all back on ``close``, at exit and when the budget is
    collected.  A process killed outright keeps its lease counted, as it kept its
    in-flight reservations before (delete the file to reset).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._closed = False
        self._largest = 0  # largest reservation seen: its size is worth a lease too
        self._fork_hook = False  # registered on first use: stores only read need none
        self._lock = threading.Lock()  # not an RLock: a signal handler must not re-enter
        #: Held from taking the file's lock to letting it go: fcntl's locks are the
        #: process's, so a top-up's grant (without ``_lock``) and a look would both have
        #: it, and the later write would undo the other's.
        self._file_lock = threading.Lock()
        self._new_process()

    def _init_process_state(self) -> None:
        """In a forked child: new locks (the parent's may be held) and an empty lease."""
        self._lock = threading.Lock()
        self._file_lock = threading.Lock()
        self._new_process()

    def _new_process(self) -> None:
        """Forget the lease: what a parent leased is the parent's to spend and give back."""
        if self._fd is not None:
            _close_quietly(self._fd)  # inherited; the child holds none of the file's locks
        self._fd = None
        self._pid = os.getpid()
        self.calls = 0  # reserved in the file, not handed out yet
        self.nbytes = 0
        self._keep = (0, 0)  # the lease the last look settled on
        self._seen = (0, 0)  # the file's counts after the last look
        self._seen_at = -math.inf
        self._busy_at = -math.inf  # when a call last found the file held
        self._slow_until = -math.inf  # a look took over _SLOW_LOOK_S: none on calls
        self._topping = False  # a thread of the lease's own is topping it up
        #: Asked again meanwhile (and the largest reservation that found the lease
        #: short then): it goes round once more.
        self._again: tuple[int, int] | None = None
        #: ``give_back``s running: meanwhile no top-up starts or goes round again (the
        #: lease goes back whole; a round still writing when the process ends would
        #: leave its give counted for good).
        self._giving_back = 0
        self._topper: threading.Thread | None = None
        #: Credits a call could not add under ``_lock`` on a slow file (appended without
        #: it, folded in by the next holder): (calls, bytes).
        self._credits: deque[tuple[int, int]] = deque()

    def _fold(self) -> None:
        """Add the credits left without ``_lock`` (under it)."""
        credits = self._credits
        while credits:
            calls, nbytes = credits.popleft()
            self.calls += calls
            self.nbytes += nbytes

    def _chunks(self, max_count: int, max_bytes: int) -> tuple[int, int]:
        """The lease a look keeps, in calls and bytes, before the edge of the budget is
        taken into account (``_lease_size``): larger on a slow file."""
        scale = _SLOW_CHUNKS if time.monotonic() < self._slow_until else 1
        calls = min(scale * _LEASE_CALLS, max_count // (_LEASE_SHARE // scale))
        nbytes = max(max_bytes // (_LEASE_SHARE // scale), min(self._largest, max_bytes // 32))
        return calls, nbytes

    def _open(self) -> int:
        if self._pid != os.getpid():
            self._new_process()  # forked without our hook having run
        if self._fd is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._fork_hook:
                self._fork_hook = True
                forking.redo_in_child(self, "_init_process_state")
            # multiprocessing's fork and forkserver children end in os._exit: no atexit,
            # no weakref finalizer, but its own exit finalizers still run.
            multiprocessing.util.Finalize(None, self.give_back, exitpriority=10)
        return self._fd

    def reserve(self, calls: int, nbytes: int, max_count: int, max_bytes: int) -> str | None:
        """On the traced call's thread: spend the lease; past it, one look at the file
        that waits ``_CALLER_WAIT_S`` at most for the file's lock (``BUSY`` past that,
        and for ``_BUSY_S`` after, without trying).  Other threads hold ``_lock`` for
        memory work and single non-blocking tries at the file, never while they wait.
        On a slow file (``_SLOW_LOOK_S``) a call never looks itself: the lease is topped
        up ahead, on a thread of its own, and a call waits ``_CALLER_WAIT_S`` at most for
        ``_lock`` (``BUSY`` past that), which a writer's or the top-up's look holds for
        as long as the file takes.  Elsewhere it waits for ``_lock``, as those who hold
        it do memory work or a quick look; the look that finds the file slow holds
        the calls behind it that once."""
        if time.monotonic() < self._slow_until:
            if not self._lock.acquire(timeout=_CALLER_WAIT_S):
                return BUSY  # the payload, not the call, waits on the file
        else:
            self._lock.acquire()
        try:
            return self._reserve(calls, nbytes, max_count, max_bytes)
        finally:
            self._lock.release()

    def _reserve(self, calls: int, nbytes: int, max_count: int, max_bytes: int
                 ) -> str | None:
        """``reserve`` under ``_lock``."""
        self._fold()
        slow = time.monotonic() < self._slow_until
        if calls <= self.calls and nbytes <= self.nbytes:
            # What is leased is counted in the file already: spending it can never
            # pass a limit, however long ago the lease was taken.
            self.calls -= calls
            self.nbytes -= nbytes
            keep_calls, keep_bytes = self._keep
            if slow and (2 * self.calls <= keep_calls or 2 * self.nbytes <= keep_bytes):
                # ahead of need: half is spent (and at least one more like this one)
                self._top_up(max_count, max_bytes, calls, nbytes)
            return None
        if time.monotonic() - self._seen_at < _FRESH_S:  # a refusal stands a while
            reason = _over(*self._seen, calls - self.calls, nbytes - self.nbytes,
                           max_count, max_bytes)
            if reason is not None and not (self.calls or self.nbytes):
                return reason  # (holding a lease, the look below gives it back)
        self._largest = max(self._largest, nbytes)
        if slow:  # the top-up's look: a refusal it saw, else busy
            self._top_up(max_count, max_bytes, calls, nbytes)
            return _over(*self._seen, calls - self.calls, nbytes - self.nbytes, max_count,
                         max_bytes) or BUSY
        now = time.monotonic()
        if now - self._busy_at < _BUSY_S:
            return BUSY  # found held just now: the calls behind do not queue up
        reason = self._look(calls, nbytes, max_count, max_bytes, now + _CALLER_WAIT_S)
        if reason == BUSY:
            self._busy_at = time.monotonic()
        return reason

    def _top_up(self, max_count: int, max_bytes: int, calls: int = 0, nbytes: int = 0) -> None:
        """On a slow file (under ``_lock``): a thread of the lease's own adds to the lease
        what it lacks of its chunks, or of a reservation of ``calls`` and ``nbytes`` that
        found it short, reading and writing the file without ``_lock`` (calls spend the
        lease meanwhile); at most one at a time.  Closed (``close``: crash-safe runs
        keep no lease), only what that reservation needs, for the next call like it:
        a call on a slow file never looks itself, closed or not.  A lease that writers'
        releases grew past two chunks (past what it keeps, closed) is trimmed back to
        what it keeps the same way: taken out of the lease at once, and out of the file
        off ``_lock`` (put back in the lease if the file cannot be had).  A writer's
        look did that under ``_lock``, and every call meanwhile (30 ms and more on a
        slow file) skipped its payload as ``BUSY``."""
        if self._giving_back:
            return  # the whole lease goes back now
        if self._topping:  # (a trim, or a lease spent again, while it ran)
            again = self._again or (0, 0)
            self._again = (max(again[0], calls), max(again[1], nbytes))
            return
        self._topping = True
        self._again = None
        pid = os.getpid()

        def run() -> None:
            need = (calls, nbytes)
            try:
                while True:
                    self._top_up_once(max_count, max_bytes, need, pid)
                    with self._lock:  # asked meanwhile (under it): once more
                        if self._again is None or self._pid != pid or self._giving_back:
                            self._again = None
                            self._topping = False
                            return
                        need, self._again = self._again, None
            except BaseException:
                # (not ``finally``: after the clear above a new top-up may have started,
                # whose flag this must not clear)
                self._topping = False
                raise

        topper = threading.Thread(target=run, daemon=True, name="otel_flashinfer-blob-budget")
        try:
            threads.start(topper)
            self._topper = topper
        except RuntimeError:  # no new threads (the interpreter is exiting)
            self._topping = False

    def _top_up_once(self, max_count: int, max_bytes: int, need_of: tuple[int, int],
                     pid: int) -> None:
        """One round of ``_top_up``'s thread (``need_of``: the reservation that found the
        lease short, calls and bytes)."""
        with self._lock:
            if self._pid != pid:
                return
            closed = self._closed
            self._fold()
            give = self._trimmed(closed)
            chunk = (0, 0) if closed else self._chunks(max_count, max_bytes)
            lease = (self.calls, self.nbytes)
            want = (max(0, chunk[0] - lease[0]), max(0, chunk[1] - lease[1]))
            need = (max(0, need_of[0] - lease[0]), max(0, need_of[1] - lease[1]))
        if want == need == give == (0, 0):
            return
        try:
            got = self._grant(want, need, lease, max_count, max_bytes, give)
        except OSError:
            log.debug("blob budget: %s not topped up", self.path, exc_info=True)
            got = None
        if got is None:
            if give != (0, 0):  # still counted in the file: the lease's again
                self._credits.append(give)
            return
        with self._lock:
            if self._pid != pid:
                return  # forked meanwhile: the grant is the parent's, kept counted
            self.calls += got[0]
            self.nbytes += got[1]
            if got[0] or got[1]:  # (a trim alone keeps what the lease kept)
                # What the grant settled on (closed: this grant at most; ``release``
                # settles more), not the lease now: writers' releases during the grant
                # are in it, and kept as the norm they would never be trimmed.
                self._keep = got[:2] if closed else (lease[0] + got[0], lease[1] + got[1])
            self._seen, self._seen_at = got[2], time.monotonic()
            if self._closed and not closed:  # closed meanwhile: it goes back
                self._look_quietly(0, 0)

    def _trimmed(self, closed: bool) -> tuple[int, int]:
        """Under ``_lock``: what the lease holds past what it keeps, where releases grew
        it past two chunks (past what it keeps, closed), taken out of it (the top-up
        gives it back to the file)."""
        keep_calls, keep_bytes = self._keep
        most = 1 if closed else 2
        give = (self.calls - keep_calls if self.calls > most * keep_calls else 0,
                self.nbytes - keep_bytes if self.nbytes > most * keep_bytes else 0)
        self.calls -= give[0]
        self.nbytes -= give[1]
        return give

    def _grant(self, want: tuple[int, int], need: tuple[int, int], lease: tuple[int, int],
               max_count: int, max_bytes: int, give: tuple[int, int] = (0, 0),
               ) -> tuple[int, int, tuple[int, int]] | None:
        """More counted in the file for the lease (the top-up; without ``_lock``): per
        limit, what the lease (``lease``) lacks of its chunk (``want``) while twice the
        chunk is free counting the lease, as a look keeps one, else just what a
        reservation that found it short (``need``) takes, if free; less what a trim
        took out of the lease (``give``).  (calls, bytes, the file's counts after), or
        None while another thread or process holds the file."""
        fd = self._open()
        if not self._file_lock.acquire(timeout=_WRITER_WAIT_S):
            return None
        try:
            if not _try_lock(fd, time.monotonic() + _WRITER_WAIT_S):
                return None
            took, locked, failed = 0.0, time.monotonic(), True  # ``_note_speed``
            try:
                count, total, took = _read_counter(fd)
                count, total = max(0, count - give[0]), max(0, total - give[1])
                got = []
                for (w, n, held, free) in ((want[0], need[0], lease[0], max_count - count),
                                           (want[1], need[1], lease[1], max_bytes - total)):
                    keep = w if w and free + held >= 2 * (w + held) else 0
                    got.append(max(keep, n if 0 < n <= free else 0))
                calls, nbytes = got
                if calls or nbytes or give != (0, 0):
                    took += _write_counter(fd, count + calls, total + nbytes)
                failed = False
                return calls, nbytes, (count + calls, total + nbytes)
            finally:
                try:
                    took += timed_io.unlock(fd)
                except OSError:  # written (or not) as returned or raised: that stands
                    log.debug("blob budget: %s not unlocked", self.path, exc_info=True)
                self._note_speed(took, locked if failed else None)
        finally:
            self._file_lock.release()

    def _note_speed(self, took: float, failed_from: float | None = None) -> None:
        """After a look whose reads, writes and unlock took ``took`` seconds: slow for
        ``_SLOW_FOR_S`` if over ``_SLOW_LOOK_S``, else not (waiting for another
        process's hold is not slowness, nor, with the C extension, the GIL's waits).
        A look whose read or write failed (``failed_from``: when it had the file's
        lock) counts its wall time since: a read that hangs 30 ms and then fails (EIO
        on a shared file system) took that long, though it returned no time."""
        if failed_from is not None:
            took = max(took, time.monotonic() - failed_from)
        slow = took > _SLOW_LOOK_S
        self._slow_until = time.monotonic() + _SLOW_FOR_S if slow else -math.inf

    def count_spent(self, max_count: int) -> bool:
        """Whether a call would surely be refused by the count now: no lease left and the
        file's count at the limit at a look within ``_FRESH_S`` (read without the lock:
        a call that races a change is one payload either way)."""
        return (self.calls == 0 and self._seen[0] >= max_count
                and time.monotonic() - self._seen_at < _FRESH_S)

    def release(self, calls: int, nbytes: int, max_count: int, max_bytes: int,
                settle: bool = True) -> None:
        """Credit the lease.  With ``settle`` (a writer thread), also look at the file when
        the lease has grown past two chunks, run out (a top-up here spares the next call
        its own look), or gone stale; another process holding the file's lock is waited
        for with ``_lock`` let go between single tries.  A traced call's thread (a
        payload dropped) passes ``settle=False``: crediting is always safe, and the next
        writer's release settles the file."""
        slow = time.monotonic() < self._slow_until
        if not settle and slow and not self._lock.acquire(timeout=_CALLER_WAIT_S):
            self._credits.append((calls, nbytes))  # a look at a slow file holds it
            return
        if settle or not slow:
            self._lock.acquire()
        try:
            self._fold()
            self.calls += calls
            self.nbytes += nbytes
            keep_calls, keep_bytes = self._keep
            most = 1 if self._closed else 2  # closed: only a top-up's grant is kept
            grown = self.calls > most * keep_calls or self.nbytes > most * keep_bytes
            out = self.calls == 0 < keep_calls or self.nbytes < min(self._largest, keep_bytes)
            if not settle or not (grown or out or time.monotonic() - self._seen_at >= _FRESH_S):
                return
            if slow:  # topped up and trimmed off ``_lock``, by the lease's own thread
                if grown or out:
                    self._top_up(max_count, max_bytes)
                return
            if self._look_quietly(max_count, max_bytes):
                return
        finally:
            self._lock.release()
        self._retry(lambda: self._look_quietly(max_count, max_bytes))

    def _retry(self, attempt: Callable[[], bool]) -> None:
        """Another process holds the file's lock: ``attempt`` again (under ``_lock``)
        until it says done or ``_WRITER_WAIT_S`` has passed, sleeping between tries
        without holding ``_lock``, so that no traced call waits behind it."""
        deadline = time.monotonic() + _WRITER_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.001)
            if not self._lock.acquire(timeout=1.0):
                return  # held by the thread a signal interrupted: keep it rather than hang
            try:
                if attempt():
                    return
            finally:
                self._lock.release()
        log.debug("blob budget: %s stayed locked; the next look settles it", self.path)

    def _look_quietly(self, max_count: int, max_bytes: int) -> bool:
        """A writer's single try at the file (under ``_lock``): False only while another
        process holds the file's lock.  A failed write is left to the next look (the
        lease is credited already)."""
        try:
            return self._look(0, 0, max_count, max_bytes, deadline=0.0) != BUSY
        except OSError:
            log.debug("blob budget: %s not updated", self.path, exc_info=True)
            return True

    def usage(self) -> tuple[int, int]:
        """What the file counts less this process's unused lease."""
        with self._lock:
            self._fold()
            count, nbytes, _ = _read_counter(self._open())
            return max(0, count - self.calls), max(0, nbytes - self.nbytes)

    def give_back(self, *, stop: bool = False) -> None:
        """Return the lease to the file; with ``stop``, take none from now on (every
        reservation goes to the file, exactly, as late writer releases still may)."""
        def attempt() -> bool:
            self._fold()
            return not (self.calls or self.nbytes) or self._look_quietly(0, 0)

        if not self._lock.acquire(timeout=1.0):
            return  # held by the thread a signal interrupted: keep it rather than hang
        held = True  # (the count is raised inside the ``try``: an exception as the lock
        try:         # goes, a signal handler's, still lowers it)
            self._giving_back += 1  # no top-up starts or goes round again meanwhile
            topper = self._topper
            self._lock.release()
            held = False
            if topper is not None and topper is not threading.current_thread():
                # A top-up in flight lands in the lease after the lease went back, which
                # then stays counted (at exit, for good): its grant goes back too, and a
                # trim's give is in the file.  It ends after its round: the file's lock
                # in this process, then in another, then its I/O.
                topper.join(2 * _WRITER_WAIT_S + 0.5)
            if not self._lock.acquire(timeout=1.0):
                return  # held by the thread a signal interrupted: keep it, not hang
            try:
                self._closed = self._closed or stop
                self._keep = (0, 0)  # a later release looks again rather than lease
                if attempt():
                    return
            finally:
                self._lock.release()
            self._retry(attempt)  # an idle writer gives its lease back while calls come
        finally:
            # (at 0 at least: an interrupt may have come before the count was raised)
            if held:  # (or let go just before the exception: then this release fails)
                self._giving_back = max(0, self._giving_back - 1)
                try:
                    self._lock.release()
                except RuntimeError:
                    pass
            elif self._lock.acquire(timeout=1.0):
                self._giving_back = max(0, self._giving_back - 1)
                self._lock.release()
            else:  # (the signal-interrupted holder: the count is ours alone to lower)
                self._giving_back = max(0, self._giving_back - 1)

    def close(self) -> None:
        self.give_back(stop=True)

    def _look(self, calls: int, nbytes: int, max_count: int, max_bytes: int,
              deadline: float) -> str | None:
        """One locked read-modify-write of the file: take what the reservation needs
        beyond the lease, then set the lease to its new size (under ``self._lock``).
        ``BUSY``, nothing changed, if the file's lock is not had by ``deadline`` (a
        monotonic time; one try when it has passed)."""
        fd = self._open()
        left = deadline - time.monotonic()
        if not (self._file_lock.acquire(timeout=left) if left > 0
                else self._file_lock.acquire(False)):
            return BUSY  # a top-up's grant has the file (this process's fcntl lock)
        try:
            return self._look_locked(fd, calls, nbytes, max_count, max_bytes, deadline)
        finally:
            self._file_lock.release()

    def _look_locked(self, fd: int, calls: int, nbytes: int, max_count: int, max_bytes: int,
                     deadline: float) -> str | None:
        """``_look`` with ``_file_lock`` held."""
        if not _try_lock(fd, deadline):
            return BUSY
        took, locked, failed = 0.0, time.monotonic(), True  # ``_note_speed``
        self._fold()
        try:
            count, total, took = _read_counter(fd)
            need_calls = max(0, calls - self.calls)
            need_bytes = max(0, nbytes - self.nbytes)
            reason = _over(count, total, need_calls, need_bytes, max_count, max_bytes)
            if reason is None:
                left_calls = self.calls + need_calls - calls  # lease after this reservation
                left_bytes = self.nbytes + need_bytes - nbytes
                keep_calls = keep_bytes = 0
                if not self._closed:
                    chunk_calls, chunk_bytes = self._chunks(max_count, max_bytes)
                    keep_calls = _lease_size(chunk_calls,
                                             max_count - count - need_calls + left_calls)
                    keep_bytes = _lease_size(chunk_bytes,
                                             max_bytes - total - need_bytes + left_bytes)
                new = (max(0, count + need_calls + keep_calls - left_calls),
                       max(0, total + need_bytes + keep_bytes - left_bytes))
                if new != (count, total):
                    took += _write_counter(fd, *new)
                count, total = new
                self.calls, self.nbytes = keep_calls, keep_bytes
                self._keep = (keep_calls, keep_bytes)
            elif self.calls or self.nbytes:  # refused: at the edge, no process keeps one
                count, total = max(0, count - self.calls), max(0, total - self.nbytes)
                took += _write_counter(fd, count, total)
                self.calls = self.nbytes = 0
                self._keep = (0, 0)
            self._seen = (count, total)
            self._seen_at = time.monotonic()
            failed = False
            return reason
        finally:
            try:
                took += timed_io.unlock(fd)
            finally:
                self._note_speed(took, locked if failed else None)


class _Budget:
    """Calls and bytes reserved so far: in memory, or (local stores) in a counter file
    shared by every process writing to the store, of which each keeps a lease."""

    def __init__(self, max_count: int, max_bytes: int, counter_path: str | None) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._count = 0
        self._bytes = 0
        self._lease = None if counter_path is None else _Lease(counter_path)
        if self._lease is not None:
            weakref.finalize(self, self._lease.close)  # at exit too

    def _update(self, d_count: int, d_bytes: int, check: bool) -> str | None:
        with self._lock:
            count, nbytes = self._count, self._bytes
            reason = (_over(count, nbytes, d_count, d_bytes, self.max_count, self.max_bytes)
                      if check else None)
            if reason is None:
                self._count, self._bytes = count + d_count, max(0, nbytes + d_bytes)
            return reason

    def after_fork(self) -> None:
        """A new lock in a forked child (the lease has a fork hook of its own)."""
        self._lock = threading.RLock()

    def reserve(self, calls: int, nbytes: int) -> str | None:
        """Take ``calls`` and ``nbytes`` from the budget; the reason string if over."""
        if self._lease is None:
            return self._update(calls, nbytes, check=True)
        return self._lease.reserve(calls, nbytes, self.max_count, self.max_bytes)

    def count_spent(self) -> bool:
        """Whether the next call would surely be refused by ``max_count`` (cheap, no lock,
        no file: a traced call asks it before it describes its arguments; once the
        budget is spent the file is looked at again every ``_FRESH_S``)."""
        if self._lease is None:
            return self._count >= self.max_count
        return self._lease.count_spent(self.max_count)

    def release(self, calls: int, nbytes: int, settle: bool = True) -> None:
        """Give back what a reservation did not use; ``settle=False`` on a traced call's
        thread (see ``_Lease.release``)."""
        if self._lease is None:
            self._update(-calls, -nbytes, check=False)
        else:
            self._lease.release(calls, nbytes, self.max_count, self.max_bytes, settle)

    def usage(self) -> tuple[int, int]:
        """(calls, bytes) currently counted: reserved or written, not merely leased."""
        if self._lease is None:
            with self._lock:
                return self._count, self._bytes
        return self._lease.usage()

    def give_back(self) -> None:
        """Return this process's lease to the counter file (all is written, say)."""
        if self._lease is not None:
            self._lease.give_back()

    def close(self) -> None:
        """Return the lease and keep none: later calls still work, each on the file."""
        if self._lease is not None:
            self._lease.close()


class BlobStore:
    """Objects and manifests under one fsspec URL."""

    def __init__(
        self,
        url: str = "./flashinfer_blobs",
        *,
        max_count: int = 1000,
        max_bytes: int = 20 * 1024**3,
        storage_options: dict | None = None,
        check_writable: bool = True,
        durable: bool = False,
        offload: bool = False,
    ) -> None:
        self.url = url
        #: fsync objects and manifests before they get their names (CRASH_SAFE).
        self.durable = durable
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except Exception as exc:
            raise StoreError(f"blob store {url!r} cannot be opened: {exc}") from exc
        self.local = _is_local(self.fs)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        #: Object key -> when it was last seen stored (``_remember``).
        self._known: dict[str, float] = {}
        #: Folders made (or found) already: a new page costs no makedirs (a stat and a
        #: mkdir each, twice per object).  Bounded; a folder deleted under us is made
        #: again on the first write that misses it.
        self._dirs: set[str] = set()
        self._land_lock = threading.Lock()  # exists-check + rename of one object
        #: Local objects are written unnamed (``O_TMPFILE``) and linked into place where
        #: the filesystem can (``_link_unnamed``); cleared at the first sign it cannot.
        self._unnamed = bool(_O_TMPFILE) and self.local
        counter = os.path.join(self.root, layout.USAGE_DIR, "counter") if self.local else None
        self.budget = _Budget(max_count, max_bytes, counter)
        if check_writable:
            self._check_writable()
        #: ``offload``: a remote store's writes go through a helper process
        #: (``uploader``: its client's Python would hold the traced process' GIL).
        self._uploader = None
        # Not a store that lives in this process (memory://): a helper's would be its own.
        if offload and not self.local and not _in_process(self.fs):
            from .uploader import Uploader

            try:
                self._uploader = Uploader(url, storage_options)
            except TypeError as exc:  # storage options that cannot be sent there
                log.warning("otel_flashinfer: remote blob writes stay in this process: %s",
                            exc)

    def close(self) -> None:
        """Give this process's budget lease back to the shared counter and let the upload
        helper finish (the store stays usable; later reservations go to the counter file
        one by one, a later write starts another helper)."""
        self.budget.close()
        if self._uploader is not None:
            self._uploader.close()

    def after_fork(self) -> None:
        """In a forked child: new locks (a parent's thread may have held one at the
        fork); the lease and the upload helper reset themselves on their own fork hooks."""
        self._land_lock = threading.Lock()
        self.budget.after_fork()

    # -- URLs and paths ---------------------------------------------------------
    def path(self, key: str) -> str:
        """Filesystem path (for ``self.fs``) of a relative key."""
        return layout.join(self.root, key)

    def url_of(self, key: str) -> str:
        """Full URL of a key, as put into span attributes."""
        if self.local:
            return "file://" + self.path(key)
        return self.fs.unstrip_protocol(self.path(key))

    def _check_writable(self) -> None:
        probe = f"{layout.USAGE_DIR}/probe-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            if self.local:
                os.makedirs(os.path.join(self.root, layout.USAGE_DIR), exist_ok=True)
                self.budget.usage()
            self.fs.pipe_file(self.path(probe), b"ok")
            self.fs.rm_file(self.path(probe))
        except Exception as exc:
            raise StoreError(f"blob store {self.url!r} is not writable: {exc}") from exc

    # -- writing ------------------------------------------------------------------
    def _tmp_path(self, path: str) -> str:
        return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"

    def _make_dir(self, folder: str, again: bool = False) -> None:
        if again:
            self._dirs.discard(folder)
        elif folder in self._dirs:
            return
        try:  # one syscall for the usual case (a new trace's folder under a known parent)
            os.mkdir(folder)
        except OSError:  # a parent missing, the folder there already (some filesystems
            os.makedirs(folder, exist_ok=True)  # say so otherwise than EEXIST), ...
        if len(self._dirs) >= _MAX_DIRS:
            self._dirs.clear()
        self._dirs.add(folder)

    def _in_folder(self, path: str, create: Any) -> Any:
        """``create()`` a file at ``path``, its folder made when not known to be there,
        and made again if it went away since (``create`` raised FileNotFoundError)."""
        folder = os.path.dirname(path)
        self._make_dir(folder)
        try:
            return create()
        except FileNotFoundError:
            self._make_dir(folder, again=True)
            return create()

    def _write_temp(self, path: str, parts: list) -> str:
        """A temp file beside ``path``, fsynced when the store is ``durable``."""
        tmp = self._tmp_path(path)
        try:
            self._in_folder(path, lambda: _write_file(tmp, parts, self.durable))
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def _write_atomic(self, key: str, data: bytes | list) -> None:
        path = self.path(key)
        parts = parts_of(data)
        if not self.local:
            self._put_remote(path, parts)
            return
        tmp = self._write_temp(path, parts)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def put_marker(self, key: str) -> None:
        """An empty object whose name is the record (index entries): created in place,
        with no temp file, rename or fsync, since an empty file cannot be torn."""
        path = self.path(key)
        if not self.local:
            self._put_remote(path, [b""])
            return
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        os.close(self._in_folder(path, lambda: os.open(path, flags, 0o644)))

    def remove(self, key: str) -> None:
        """Delete an object of ours (an index entry replaced); gone already is fine."""
        try:
            if self._uploader is None or not self._uploader.remove(self.path(key)):
                self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def _put_remote(self, path: str, parts: list) -> None:
        """One PUT (all or nothing), by the upload helper where there is one."""
        if self._uploader is None or not self._uploader.put(path, parts):
            self.fs.pipe_file(path, b"".join(parts))

    def _land(self, tmp: str, key: str) -> bool:
        """Rename a synced temp file to ``key`` unless the object is there already
        (then the temp is deleted); whether this call put it there."""
        path = self.path(key)
        with self._land_lock:
            if self._knows(key) or os.path.exists(path):
                self._remember(key)
                _unlink_quietly(tmp)
                return False
            os.replace(tmp, path)  # the temp file sits in the same folder
            self._remember(key)
            return True

    def _remember(self, key: str) -> None:
        """Objects known stored, so that a dedup costs no stat; bounded (a long run
        stores millions), and forgetting costs one stat per object later."""
        known = self._known
        if len(known) >= _KNOWN_MAX:
            known.clear()
        known[key] = time.monotonic()

    def _knows(self, key: str) -> bool:
        """Whether ``key`` was seen stored within ``KNOWN_FOR_S``: a store can lose
        objects (a retention rule, a bucket made again after an outage), and a manifest
        citing one it no longer holds could not be replayed."""
        seen = self._known.get(key)
        if seen is None:
            return False
        if time.monotonic() - seen > KNOWN_FOR_S:
            self._known.pop(key, None)
            return False
        return True

    def forget_objects(self) -> None:
        """After a failed write: what the store held may be gone (it came back empty)."""
        self._known.clear()

    def has_object(self, key: str) -> bool:
        """Whether an object is already stored (remembered once seen)."""
        if self._knows(key):
            return True
        path = self.path(key)
        if self.local:
            exists = os.path.exists(path)
        else:
            exists = self._uploader.exists(path) if self._uploader is not None else None
            if exists is None:
                exists = self.fs.exists(path)
        if exists:
            self._remember(key)
        return exists

    def put_object(self, key: str, data: bytes | list) -> int:
        """Store an object (bytes or buffers in order) unless present; returns the
        bytes newly written (0 if deduped, also when another thread landed it first)."""
        if self.has_object(key):
            return 0
        if not self.local:
            self._write_atomic(key, data)
            self._remember(key)
            return _nbytes(parts_of(data))
        parts = parts_of(data)
        landed = self._link_unnamed(self.path(key), parts) if self._unnamed else None
        if landed is not None:
            self._remember(key)
        else:
            tmp = self._write_temp(self.path(key), parts)
            try:
                landed = self._land(tmp, key)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        return _nbytes(parts) if landed else 0

    def _link_unnamed(self, path: str, parts: list) -> bool | None:
        """Write a file as an unnamed one in its folder (``O_TMPFILE``) and link it in
        at ``path``: whether this call put it there (False: a file has that name already,
        another writer's), or None when the caller is to write a temp file and rename
        it instead: where the filesystem or the kernel refuses (then ``_unnamed`` is off
        for good), and for a name taken by something other than a file.  Against a temp
        file this saves the rename, the temp name's entry and an object's exists-check
        under the lock (10-20 us of CPU a file, ext4 and tmpfs), and a crash mid-write
        leaves no file behind."""
        folder = os.path.dirname(path)
        try:
            fd = self._in_folder(path, lambda: os.open(folder, _UNNAMED_FLAGS, 0o666))
        except OSError as exc:
            if exc.errno in _STORE_ERRNOS:
                raise
            self._unnamed = False  # no O_TMPFILE here (or a sandbox that refuses it)
            return None
        try:
            write_all(fd, parts)
            if self.durable:
                os.fsync(fd)
            try:
                # Any dir fd makes CPython call linkat() with AT_SYMLINK_FOLLOW, which the
                # /proc link needs (plain link() would link the symlink itself); it is
                # ignored for an absolute source path.
                os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
            except FileExistsError:
                if not _is_file(path):
                    return None  # a dangling link, say: the rename replaces it
                landed = False
            except OSError as exc:
                if exc.errno in _STORE_ERRNOS:
                    raise
                if exc.errno == errno.ENOENT and not os.path.isdir(folder):
                    self._dirs.discard(folder)  # deleted under us: the temp file's
                    return None                 # write makes it again
                self._unnamed = False  # no /proc to link through, or links refused
                return None
            else:
                landed = True
        finally:
            _close_quietly(fd)
        return landed

    def put_content(self, data: bytes | list, fmt: str) -> tuple[str, str, int]:
        """Store an object under its content address: (sha256 hex, key, bytes newly
        written).  Hashed first, so a duplicate costs no write."""
        parts = parts_of(data)
        h = hashlib.sha256()
        for part in parts:
            h.update(part)  # releases the GIL on large buffers: other writers go on
        digest = h.hexdigest()
        key = layout.object_key(digest, fmt)
        return digest, key, self.put_object(key, parts)

    def put_manifest(self, key: str, data: bytes, new: bool = False) -> None:
        """Write (or replace) a manifest; call only after its objects are stored.
        ``new``: the caller wrote none under this key before, so it is linked in without
        a rename where it can be (one that is there after all is replaced)."""
        if new and self._unnamed and self._link_unnamed(self.path(key), [data]) is True:
            return
        self._write_atomic(key, data)

    # -- reading --------------------------------------------------------------------
    def list_manifests(self, trace_id: int | str) -> list[str]:
        """Keys of a trace's manifests, in start-time order (one prefix listing)."""
        prefix = layout.trace_prefix(trace_id)
        self.fs.invalidate_cache(self.path(prefix))  # other writers may have added some
        try:
            names = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        keys = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            try:
                layout.parse_manifest_name(base)
            except ValueError:
                continue  # temp files, foreign files
            keys.append(f"{prefix}/{base}")
        return sorted(keys)

    def get(self, key: str, limit: int | None = None) -> bytes:
        """Bytes of an object or manifest; with ``limit``, ``StoreError`` past that many
        (read back untrusted: a local "object" that is a link to /dev/zero must not fill
        memory, nor a FIFO hang the reader).  A local key must name a regular file."""
        path = self.path(key)
        if self.local:
            mode = os.stat(path).st_mode  # FileNotFoundError as from cat_file
            if not stat.S_ISREG(mode):
                raise StoreError(f"{self.url_of(key)}: not a regular file")
        if limit is None:
            return self.fs.cat_file(path)
        data = self.fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:
            raise StoreError(f"{self.url_of(key)}: larger than the {limit} bytes expected")
        return data


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)  # Linux only
_UNNAMED_FLAGS = _O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
#: Errors of the store itself, which a temp file would meet too: raised.  Any other error
#: of the unnamed file or its link (no O_TMPFILE: EOPNOTSUPP, EISDIR; no /proc: ENOENT;
#: a sandboxed kernel's EINVAL, EPERM...) turns unnamed files off.
_STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_file(path: str, parts: list, sync: bool) -> None:
    """``parts`` into a new file at ``path`` with one ``writev`` (a buffered file object
    and a write per part cost a writer tens of us an object), fsynced when ``sync``."""
    fd = os.open(path, _WRITE_FLAGS, 0o666)
    try:
        write_all(fd, parts)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
