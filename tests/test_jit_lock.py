"""A builder killed mid-build must not make later builds wait forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from otel_flashinfer import health
from otel_flashinfer.jit_lock import FLOCK_NAME, TORCH_BATON, build_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

_BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from otel_flashinfer.jit_lock import build_lock
    folder = Path(sys.argv[1])
    with build_lock(folder):
        (folder / "lock").write_text("")  # what torch's FileBaton leaves mid-build
        print("building", flush=True)
        time.sleep(600)
""")


def _start_builder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    return proc


def test_a_killed_builders_baton_is_removed_by_the_next_builder(tmp_path: Path) -> None:
    health.reset()
    builder = _start_builder(tmp_path)
    try:
        # While it lives, nobody else gets in, and its baton stays.
        with pytest.raises(TimeoutError, match=str(tmp_path)), build_lock(tmp_path, timeout_s=0.3):
            pass
        assert (tmp_path / TORCH_BATON).exists()
    finally:
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait()
    assert (tmp_path / TORCH_BATON).exists()  # what used to hang every later load
    start = time.monotonic()
    with build_lock(tmp_path, timeout_s=5):
        assert not (tmp_path / TORCH_BATON).exists()
    assert time.monotonic() - start < 2
    assert health.counters()["jit_stale_lock_removed"] == 1


def test_an_uncontended_build_changes_nothing(tmp_path: Path) -> None:
    health.reset()
    folder = tmp_path / "new" / "ext"
    with build_lock(folder):
        assert (folder / FLOCK_NAME).exists()
    with build_lock(folder):  # released on exit: a second builder gets straight in
        pass
    assert "jit_stale_lock_removed" not in health.counters()
