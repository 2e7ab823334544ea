"""Record (BlobRecorder driven directly) -> pull -> replay, local store and moto S3."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from otel_flashinfer.blobs.capture import BlobRecorder
from otel_flashinfer.config import Settings
from otel_flashinfer.replay.bundle import PagedKV, load_bundle
from otel_flashinfer.replay.pull import BundleError, pull
from otel_flashinfer.replay.runner import replay

sys.path.insert(0, os.path.dirname(__file__))
from s3_fixture import moto_s3

TARGET = '''
import torch

def scale_add(x, y, *, alpha=1.0):
    return x * alpha + y

def pair(x):
    return x.sum(0), x.argmax(0)

class PagedDecode:
    """A CPU stand-in for a FlashInfer paged decode wrapper (same plan/run shape)."""
    def __init__(self, head_dim):
        self.head_dim = head_dim
    def plan(self, indptr, indices, last_page_len, num_heads):
        self._paged_kv_indptr_buf = indptr.clone()
        self._paged_kv_indices_buf = indices.clone()
        self._paged_kv_last_page_len_buf = last_page_len.clone()
    def run(self, q, paged_kv_cache):
        k, v = paged_kv_cache.unbind(1)
        outs = []
        ip = self._paged_kv_indptr_buf
        for b in range(ip.numel() - 1):
            ids = self._paged_kv_indices_buf[int(ip[b]):int(ip[b + 1])].long()
            last = int(self._paged_kv_last_page_len_buf[b])
            kb = k[ids].reshape(-1, k.shape[-1])[: (len(ids) - 1) * k.shape[1] + last]
            vb = v[ids].reshape(-1, v.shape[-1])[: (len(ids) - 1) * v.shape[1] + last]
            w = torch.softmax(kb @ q[b], 0)
            outs.append(w @ vb)
        return torch.stack(outs)
'''
CHANGED = TARGET.replace("return x * alpha + y", "return x * alpha + y + 1e-3")


def write_target(tmp_path, body=TARGET) -> str:
    name = f"fi_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    sys.path.insert(0, str(tmp_path))
    return name


def call(rec, fn, api, module, qualname, trace, span, *args, instance_id=None, **kwargs):
    """What the span wrapper does at level 10, without the span."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    cap = rec.before(api, module, qualname, instance_id, trace, span, None,
                     1_000_000 + span, bound)
    try:
        out = fn(*args, **kwargs)
    except BaseException as exc:
        cap.after(None, exc)
        raise
    cap.after(out, None)
    return out, cap


def record_session(rec, mod, trace: int) -> list:
    torch.manual_seed(0)
    caps = []
    x = torch.randn(8, 6)
    y = torch.randn(6, 8).t()  # non-contiguous input
    caps.append(call(rec, mod.scale_add, "scale_add", mod.__name__, "scale_add", trace, 1,
                     x, y, alpha=0.5)[1])
    caps.append(call(rec, mod.pair, "pair", mod.__name__, "pair", trace, 2, x[:, 1:4])[1])
    # a paged decode object: __init__, plan, several runs over one changing cache
    cache = torch.randn(64, 2, 4, 16)  # [pages, k/v, page_size, head_dim]
    obj = mod.PagedDecode.__new__(mod.PagedDecode)
    inst = f"{os.getpid()}:{id(obj)}"
    span = 10
    caps.append(call(rec, mod.PagedDecode.__init__, "PagedDecode.__init__", mod.__name__,
                     "PagedDecode.__init__", trace, span, obj, 16, instance_id=inst)[1])
    indptr = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    indices = torch.tensor([40, 7, 12, 3, 60, 21, 22, 23], dtype=torch.int32)
    last = torch.tensor([2, 4, 1], dtype=torch.int32)
    span += 1
    caps.append(call(rec, mod.PagedDecode.plan, "PagedDecode.plan", mod.__name__,
                     "PagedDecode.plan", trace, span, obj, indptr, indices, last, 1,
                     instance_id=inst)[1])
    for step in range(3):
        cache[12, :, 1 + step] = step  # one page changes per step
        span += 1
        q = torch.randn(3, 16)
        caps.append(call(rec, mod.PagedDecode.run, "PagedDecode.run", mod.__name__,
                         "PagedDecode.run", trace, span, obj, q, cache, instance_id=inst)[1])
    assert rec.flush(30)
    assert all(c.skipped is None for c in caps), [c.skipped for c in caps]
    return caps


@pytest.fixture
def target(tmp_path):
    name = write_target(tmp_path)
    mod = __import__(name)
    yield mod, tmp_path
    sys.path.remove(str(tmp_path))


def test_local_record_pull_replay_passes(target, tmp_path, capsys):
    mod, _ = target
    store = tmp_path / "store"
    rec = BlobRecorder(Settings(blob_url=str(store)), install_handlers=False)
    trace = 0x0123456789ABCDEF0123456789ABCDEF
    caps = record_session(rec, mod, trace)
    bundle = pull(f"{trace:032x}", str(store), str(tmp_path / "bundle"))
    assert len(bundle.calls) == len(caps) == 7
    calls = load_bundle(str(tmp_path / "bundle"))
    # exact layout back: y was a transposed view
    y = calls[0].args[1].value
    assert y.stride() == (1, 8) and y.shape == (8, 6)
    runs = [c for c in calls if c.api == "PagedDecode.run"]
    paged = runs[0].args[1].value
    assert isinstance(paged, PagedKV)
    assert paged.page_ids == [3, 7, 12, 21, 22, 23, 40, 60]
    assert paged.shape == [64, 2, 4, 16] and paged.cache.shape == (8, 2, 4, 16)
    # each step changed only page 12: 8 pages + 1 + 1 distinct page objects
    page_keys = {p["key"] for c in runs for p in c.manifest["args"][1]["value"]["pages"]}
    assert len(page_keys) == 10
    report = replay(str(tmp_path / "bundle"), allow_modules=[mod.__name__])
    out = capsys.readouterr().out
    assert report.ok and report.passed == 7, out
    assert out.strip().endswith("7 passed, 0 failed")


def test_changed_function_fails_with_exit_code_1(target, tmp_path):
    mod, mod_dir = target
    store = tmp_path / "store"
    rec = BlobRecorder(Settings(blob_url=str(store)), install_handlers=False)
    trace = 0xABC
    record_session(rec, mod, trace)
    env = {**os.environ, "PYTHONPATH": f"{mod_dir}{os.pathsep}{os.getcwd()}"}
    cli = [sys.executable, "-m", "otel_flashinfer.replay.cli"]
    bundle = str(tmp_path / "b")
    r = subprocess.run([*cli, "pull", f"{trace:032x}", "--blob-url", str(store), "-o", bundle],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "replay", bundle, "--allow-module", mod.__name__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "7 passed, 0 failed" in r.stdout
    (mod_dir / f"{mod.__name__}.py").write_text(textwrap.dedent(CHANGED))
    r = subprocess.run([*cli, "replay", bundle, "--allow-module", mod.__name__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "not bit-exact" in r.stdout
    assert "6 passed, 1 failed" in r.stdout
    # tolerance large enough accepts the change
    r = subprocess.run([*cli, "replay", bundle, "--allow-module", mod.__name__,
                        "--atol", "0.01"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    # without --allow-module nothing of the user's is imported
    r = subprocess.run([*cli, "replay", bundle], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "outside flashinfer.*" in r.stdout


def test_s3_record_pull_replay(target, tmp_path):
    mod, _ = target
    with moto_s3() as s3:
        url = f"s3://{s3['bucket']}/blobs"
        settings = Settings(blob_url=url)
        rec = BlobRecorder(settings, install_handlers=False)
        trace = 0xFEED
        caps = record_session(rec, mod, trace)
        assert caps[0].manifest_url.startswith(f"s3://{s3['bucket']}/blobs/traces/")
        import s3fs

        fs = s3fs.S3FileSystem(**s3["storage_options"], skip_instance_cache=True)
        m = json.loads(fs.cat_file(caps[0].manifest_url[5:]))
        x_ref = m["args"][0]["value"]
        data = fs.cat_file(f"{s3['bucket']}/blobs/{x_ref['key']}")
        import hashlib

        assert hashlib.sha256(data).hexdigest() == x_ref["hash"]
        bundle = pull(f"{trace:032x}", url, str(tmp_path / "b"))
        assert bundle.objects > 0
        report = replay(str(tmp_path / "b"), allow_modules=[mod.__name__])
        assert report.ok and report.passed == 7


def test_error_call_recorded_and_replayed(target, tmp_path):
    mod, _ = target
    rec = BlobRecorder(Settings(blob_url=str(tmp_path / "s")), install_handlers=False)
    with pytest.raises(RuntimeError):
        call(rec, mod.scale_add, "scale_add", mod.__name__, "scale_add", 5, 1,
             torch.ones(3), torch.ones(4))
    assert rec.flush(10)
    bundle = pull(5, str(tmp_path / "s"), str(tmp_path / "b"))
    m = load_bundle(bundle.path)[0]
    assert m.status == "error" and m.error["type"] == "RuntimeError"
    report = replay(bundle.path, allow_modules=[mod.__name__])
    assert report.ok and "as recorded" in report.results[0].detail


def test_torch_format_roundtrip(target, tmp_path):
    mod, _ = target
    settings = dataclasses.replace(Settings(blob_url=str(tmp_path / "s")), blob_format="torch")
    rec = BlobRecorder(settings, install_handlers=False)
    record_session(rec, mod, 9)
    keys = [p for p in (tmp_path / "s" / "objects").rglob("*") if p.is_file()]
    assert keys and all(p.suffix == ".pt" for p in keys)
    # torch-format objects are pickles: read back only when asked, at pull and replay
    with pytest.raises(BundleError, match="--allow-pickle"):
        pull(9, str(tmp_path / "s"), str(tmp_path / "b"))
    bundle = pull(9, str(tmp_path / "s"), str(tmp_path / "b"), allow_pickle=True)
    with pytest.raises(BundleError, match="--allow-pickle"):
        replay(bundle.path, allow_modules=[mod.__name__])
    assert replay(bundle.path, allow_modules=[mod.__name__], allow_pickle=True).ok
