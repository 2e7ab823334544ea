"""A remote store's writes, made by a helper process so they do not hold our GIL.

Writing to an object store goes through fsspec's Python client (s3fs: aiobotocore and
aiohttp): request signing, retries with backoff, response parsing, all Python and all
under the GIL.  On the writer threads of the traced process that was the GIL the
engine's thread needs: on a 2-core box, with ``moto_server`` as the store, 80-100 of
~500 level-10 calls waited more than 5 ms on it while the store worked, and the CI
run of ``test_store_outage`` saw 34 of 578 while the client retried a dead store.

So the traced process keeps what releases the GIL (hashing, encoding into buffers)
and hands each write of a remote store to ``python -m otel_flashinfer.blobs.uploader``
over a pipe: ``os.writev`` and ``read`` release the GIL, and the client runs on the
helper's own.  A local store stays in process: its writes are syscalls that release
the GIL already.

The helper answers framed requests, several at once (a thread pool), in any order.
It inherits the environment (credentials, endpoints) with tracing off and ignores
SIGINT, so a Ctrl-C of the engine does not cut its writes short; on end of input (the
traced process exited or was killed) it finishes what it was handed and exits, so a
payload handed over before a crash still lands.  What it cannot store comes back as an
error: the recorder counts it as a failed write, as it would an in-process one.  A
helper that dies fails its pending writes and is started again on the next write;
one that cannot start (no ``sys.executable``, an import failing there) leaves the
writes in process, as before, logged once.  At most one request per writer thread is
in flight, so nothing here queues without bound.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from .. import forking, threads
from .buffers import nbytes, parts_of, write_all

log = logging.getLogger(__name__)

#: Request: id, op, path bytes, data bytes; then the path and the data.
_REQUEST = struct.Struct("<IBIQ")
#: Answer: id, status, message bytes; then the message.
_ANSWER = struct.Struct("<IBI")

HELLO, EXISTS, PUT, REMOVE = 0, 1, 2, 3
OK, NO, MISSING, FAILED = 0, 1, 2, 3

#: How long a write waits for the helper's answer before the helper is taken for hung,
#: killed and the write failed (the client's own timeouts and retries come well within).
ANSWER_TIMEOUT_S = 120.0
#: How long the helper may take to start and open the store.
START_TIMEOUT_S = 60.0
#: Writes the helper makes at once (each writer thread has at most one in flight).
_HELPER_THREADS = 8
#: After end of input, how long the helper keeps finishing writes before it exits.
_DRAIN_S = 60.0
#: A helper that died is started again at most this often; meanwhile writes fail fast.
_RESTART_S = 1.0


class HelperError(OSError):
    """The helper failed a request or went away (names which and why)."""


class _Answer:
    __slots__ = ("event", "message", "status")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.status = FAILED
        self.message = "no answer"


class _Helper:
    """One running helper process: its pipes, its pending answers, its reader thread."""

    def __init__(self, config: bytes) -> None:
        env = dict(os.environ)
        env["OTEL_FLASHINFER_LEVEL"] = "0"  # no tracing of the helper itself
        env["OTEL_FLASHINFER_AUTOSTART"] = "0"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        # Its own session: a Ctrl-C or a signal to the engine's process group is not
        # its; it exits on end of input.  No stderr of ours: it may outlive us by up to
        # _DRAIN_S, and a reader of our stderr (a pipe, a CI log) would wait for it.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, close_fds=True, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to = self.proc.stdin.fileno()
        #: Writes to the pipe never block past a deadline (a helper that stopped reading).
        os.set_blocking(self._to, False)
        self._from: BinaryIO = self.proc.stdout
        #: Held for a request's frame, and by ``stop`` to close the pipe: a frame is
        #: never cut by the close, nor written to a descriptor number reused since.
        self._send_lock = threading.Lock()
        self._closed = False
        self._lock = threading.Lock()
        self._pending: dict[int, _Answer] = {}
        self._ids = itertools.count(1)
        self.alive = True
        self.why_gone = ""
        threads.start(threading.Thread(target=self._read_answers, daemon=True,
                                       name="otel-flashinfer-uploader-answers"))
        status, message = self.ask(HELLO, "", [config], START_TIMEOUT_S)
        if status != OK:
            self.stop()
            raise HelperError(f"the upload helper could not open the store: {message}")

    def ask(self, op: int, path: str, parts: list, timeout_s: float) -> tuple[int, str]:
        """Send one request and wait for its answer: (status, message).  A helper gone
        before it answered, or silent for ``timeout_s`` (then killed: its state is
        unknown), answers ``FAILED`` saying so; ``HelperError`` if gone already."""
        answer = _Answer()
        with self._lock:
            if not self.alive:
                raise HelperError(f"the upload helper is gone: {self.why_gone}")
            rid = next(self._ids) & 0xFFFFFFFF
            self._pending[rid] = answer
        raw_path = path.encode()
        size = nbytes(parts)
        deadline = time.monotonic() + timeout_s
        frame = [_REQUEST.pack(rid, op, len(raw_path), size), raw_path, *parts]
        if not self._send_lock.acquire(timeout=timeout_s):
            self._kill(f"another request's frame held the pipe for {timeout_s:g} s")
        else:
            try:
                if self._closed:  # this request only: those sent before still land
                    with self._lock:
                        self._pending.pop(rid, None)
                    answer.message = "the upload helper was closed"
                    answer.event.set()
                else:
                    write_all(self._to, frame, deadline)
            except OSError as exc:  # a torn frame: the helper cannot read on
                self._kill(f"a request could not be sent ({exc})")
            finally:
                self._send_lock.release()
        if not answer.event.wait(max(0.0, deadline - time.monotonic())):
            self._kill(f"no answer in {timeout_s:g} s")
        return answer.status, answer.message

    def _kill(self, why: str) -> None:
        """Its state is unknown: fail what it holds and kill it (the reader reaps it)."""
        self._gone(why)
        try:
            self.proc.kill()
        except OSError:
            pass

    def _read_answers(self) -> None:
        why = "it exited"
        try:
            while True:
                head = self._from.read(_ANSWER.size)
                if len(head) < _ANSWER.size:
                    break
                rid, status, size = _ANSWER.unpack(head)
                message = self._from.read(size).decode(errors="replace") if size else ""
                with self._lock:
                    answer = self._pending.pop(rid, None)
                if answer is not None:
                    answer.status, answer.message = status, message
                    answer.event.set()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the helper is done
            why = f"its answers broke off ({exc})"
        code = None
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._gone(why if code is None else f"{why} with status {code}")

    def _gone(self, why: str) -> None:
        """Fail every pending request; later ones fail at once."""
        with self._lock:
            if self.alive:
                self.alive, self.why_gone = False, why
            pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.status, answer.message = FAILED, f"the upload helper is gone: {why}"
            answer.event.set()

    def stop(self, timeout_s: float = 1.0) -> None:
        """End of input: the helper finishes what it holds and exits by itself.  A
        frame being sent is let finish; one stuck past ``timeout_s`` kills it."""
        if not self._send_lock.acquire(timeout=timeout_s):
            self._kill("a request's frame was stuck when it was closed")
            return
        try:
            self._closed = True
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        finally:
            self._send_lock.release()

    def forget(self) -> None:
        """In a forked child: close the parent's pipes without a word to its helper."""
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                os.close(f.fileno())  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass


class Uploader:
    """A remote store's ``exists``/``pipe_file``/``rm_file``, made by the helper."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self._config = json.dumps({"url": url, "storage_options": storage_options or {}},
                                  default=_unencodable).encode()
        self._init_process_state()
        forking.redo_in_child(self, "after_fork")

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._started_at = -_RESTART_S
        #: Set once the helper cannot be used here: the writes stay in process.
        self.unavailable = ""

    def after_fork(self) -> None:
        """In a forked child: the parent's helper is the parent's; ours starts lazily."""
        helper = self._helper
        if helper is not None:
            helper.forget()
        self._init_process_state()

    def _running(self) -> _Helper | None:
        helper = self._helper
        if helper is not None and helper.alive:
            return helper
        with self._lock:
            helper = self._helper
            if helper is not None and helper.alive:
                return helper
            if self.unavailable:
                return None
            started = self._helper is not None
            if started and time.monotonic() - self._started_at < _RESTART_S:
                raise HelperError(f"the upload helper is gone: {self._helper.why_gone}")
            self._started_at = time.monotonic()
            try:
                if not sys.executable:
                    raise HelperError("no Python executable to start it with")
                self._helper = _Helper(self._config)
            except (OSError, subprocess.SubprocessError, HelperError) as exc:
                if started:  # it ran before: the store, not the helper, is at fault
                    raise HelperError(f"the upload helper could not start again: {exc}"
                                      ) from exc
                self.unavailable = str(exc)
                log.warning("otel_flashinfer: remote blob writes stay in this process (the "
                            "upload helper cannot run: %s)", exc)
                return None
            return self._helper

    def _ask(self, op: int, path: str, parts: list | None = None) -> tuple[int, str] | None:
        helper = self._running()
        if helper is None:
            return None
        return helper.ask(op, path, parts or [], ANSWER_TIMEOUT_S)

    def exists(self, path: str) -> bool | None:
        """Whether ``path`` exists; None when the helper cannot run (ask in process)."""
        answer = self._ask(EXISTS, path)
        return None if answer is None else _result(answer, path) == OK

    def put(self, path: str, data: bytes | list) -> bool:
        """Write one object in a single PUT; False when the helper cannot run."""
        answer = self._ask(PUT, path, parts_of(data))
        return answer is not None and _result(answer, path) == OK

    def remove(self, path: str) -> bool:
        """Delete ``path`` (``FileNotFoundError`` if absent); False when it cannot run."""
        answer = self._ask(REMOVE, path)
        return answer is not None and _result(answer, path) == OK

    def close(self) -> None:
        """Let the helper finish and exit.  Final: a write after it (a writer that
        outlived a flush's timeout) is made in process, not by a helper left running."""
        with self._lock:
            helper, self._helper = self._helper, None
            self.unavailable = self.unavailable or "closed"
        if helper is not None:
            helper.stop()


def _result(answer: tuple[int, str], path: str) -> int:
    status, message = answer
    if status == MISSING:
        raise FileNotFoundError(message or path)
    if status == FAILED:
        raise HelperError(f"{path}: {message}")
    return status


def _unencodable(value: Any) -> Any:
    raise TypeError(f"storage option {value!r} cannot go to the upload helper")


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- the helper process -----------------------------------------------------------------

def _serve(inp: BinaryIO, out_fd: int) -> None:
    import fsspec

    answer_lock = threading.Lock()

    def answer(rid: int, status: int, message: str = "") -> None:
        raw = message.encode()[:8192]
        with answer_lock:
            write_all(out_fd, [_ANSWER.pack(rid, status, len(raw)), raw])

    def serve(fs: Any, rid: int, op: int, path: str, data: bytes) -> None:
        try:
            if op == EXISTS:
                answer(rid, OK if fs.exists(path) else NO)
                return
            if op == PUT:
                fs.pipe_file(path, data)
            elif op == REMOVE:
                fs.rm_file(path)
            else:
                raise ValueError(f"unknown request {op}")
            answer(rid, OK)
        except FileNotFoundError as exc:
            answer(rid, MISSING, str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the writer
            answer(rid, FAILED, f"{type(exc).__name__}: {exc}")

    fs = None
    pool = ThreadPoolExecutor(_HELPER_THREADS, thread_name_prefix="upload")
    while True:
        head = inp.read(_REQUEST.size)
        if len(head) < _REQUEST.size:
            break
        rid, op, path_size, data_size = _REQUEST.unpack(head)
        raw_path = inp.read(path_size)
        data = inp.read(data_size) if data_size else b""
        if len(raw_path) < path_size or len(data) < data_size:
            break  # a torn frame (our parent died mid-write): nothing of it is written
        path = raw_path.decode(errors="replace")
        if op == HELLO:
            try:
                config = json.loads(data)
                fs = fsspec.core.url_to_fs(config["url"], **config["storage_options"])[0]
                answer(rid, OK)
            except Exception as exc:  # noqa: BLE001
                answer(rid, FAILED, f"{type(exc).__name__}: {exc}")
            continue
        if fs is None:
            answer(rid, FAILED, "no store opened")
            continue
        pool.submit(serve, fs, rid, op, path, data)
    # End of input: finish what was handed over, within a bound, then go.
    done = threading.Event()
    threading.Thread(target=lambda: (pool.shutdown(wait=True), done.set()),
                     daemon=True).start()
    done.wait(_DRAIN_S)


def main() -> None:
    """The helper: requests on stdin, answers on a copy of stdout (fd 1 itself goes to
    stderr, so that a stray print cannot corrupt the answers)."""
    # Not SIGINT (set first: one pending from the thread that started us would fire
    # as soon as it is unblocked): a Ctrl-C meant for the engine must not cut its
    # writes short.  Started from one of our threads, it inherited their blocked
    # signals: a SIGTERM must stop it as it would any process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
    code = 0
    try:
        out_fd = os.dup(1)
        os.dup2(2, 1)
        _serve(sys.stdin.buffer, out_fd)
    except BaseException:  # noqa: BLE001 - the parent learns of it from end of answers
        code = 1
    os._exit(code)  # the pool's threads may still be stuck in a dead store's client


if __name__ == "__main__":
    main()
