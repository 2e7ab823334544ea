"""One builder at a time per extension build folder, surviving a killed builder.

``torch.utils.cpp_extension.load`` guards a build with a plain ``lock`` file that it
deletes when done.  A process killed mid-build (a timeout, an OOM kill, Ctrl-C in
a launcher) leaves that file behind, and every later process then waits for it
forever: our extensions build on a background thread, so the engine silently stays
on the slow torch-op fallback, and ``wait_ready`` callers hang.  An ``flock`` is
released by the kernel when its holder dies, so we take one around the build:
whoever holds it knows that a ``lock`` file left in the folder belongs to nobody.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import health

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: torch's own baton only
    fcntl = None  # type: ignore[assignment]

#: Our lock's file name; torch's baton is ``lock`` in the same folder.
FLOCK_NAME = ".otel_fi_build.flock"
TORCH_BATON = "lock"


@contextmanager
def build_lock(build_dir: Path, timeout_s: float = 900.0, poll_s: float = 0.1) -> Iterator[None]:
    """Hold the folder's build lock; clear a stale torch baton once we have it.

    Raises ``TimeoutError`` naming the folder when another live process builds for
    longer than ``timeout_s``."""
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(build_dir / FLOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another process has been building in {build_dir} for more "
                        f"than {timeout_s:.0f} s") from None
                time.sleep(poll_s)
        baton = build_dir / TORCH_BATON
        if baton.exists():
            # Every builder takes our lock first, so the baton's owner is gone.
            baton.unlink(missing_ok=True)
            health.report("jit_stale_lock_removed",
                          f"removed a build lock left by a killed process in {build_dir}")
        yield
    finally:
        os.close(fd)  # closing releases the flock
