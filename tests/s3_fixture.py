"""A real S3 API (moto_server) on 127.0.0.1 for tests; import explicitly.

Started on a free port with dummy credentials, stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3() -> Iterator[dict]:
    """Yields {"endpoint", "bucket", "storage_options", "env", "pid"}; a fresh bucket
    (``pid``: the server's, for tests that take the store down)."""
    port = _free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "AWS_ENDPOINT_URL_S3": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        import s3fs

        # s3fs caches a filesystem per set of arguments: one made with none (the
        # endpoint from the environment) by an earlier test would still point at that
        # test's server, gone now.
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"fi-{uuid.uuid4().hex[:12]}"
        opts = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        s3fs.S3FileSystem(**opts, skip_instance_cache=True).mkdir(bucket)
        yield {"endpoint": endpoint, "bucket": bucket, "storage_options": opts, "env": env,
               "pid": proc.pid}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "s3fs" in sys.modules:  # no later test gets a filesystem bound to this server
            sys.modules["s3fs"].S3FileSystem.clear_instance_cache()
        if proc.poll() is None:  # a test may have killed it already
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
