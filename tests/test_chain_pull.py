"""Pull follows each object's chain, whole-session pull and ``ls``: recorded by the
real instrumentation at level 10 into a real store (local folder, moto S3), pulled,
replayed bit-exact."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
import time
import uuid
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import otel_flashinfer
from otel_flashinfer import cli
from otel_flashinfer.blobs import index, layout
from otel_flashinfer.blobs.manifest import ManifestError
from otel_flashinfer.blobs.store import BlobStore
from otel_flashinfer.replay.pull import BundleError, pull
from otel_flashinfer.replay.runner import replay
from otel_flashinfer.replay.session import parse_time, pull_session

sys.path.insert(0, os.path.dirname(__file__))
from s3_fixture import moto_s3  # noqa: E402

#: A @traced class shaped like a FlashInfer wrapper: made once, planned per step, run
#: per layer.  ``run``'s output depends on the plan in force, so a replay that rebuilt
#: the object with the wrong plan cannot be bit-exact.
TARGET = '''
import torch
import otel_flashinfer

class Scaler:
    @otel_flashinfer.traced
    def __init__(self, dim):
        self.dim = dim
        self.w = torch.zeros(dim, dim)

    @otel_flashinfer.traced
    def plan(self, weight, bias):
        self.w = weight.clone()
        self.b = bias.clone()

    @otel_flashinfer.traced
    def run(self, x):
        return x @ self.w + self.b

@otel_flashinfer.traced
def norm(x):
    return x / x.abs().max()
'''


@pytest.fixture
def target(tmp_path):
    name = f"fi_chain_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TARGET))
    sys.path.insert(0, str(tmp_path))
    yield __import__(name)
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


def _trace(span) -> str:  # noqa: ANN001
    return f"{span.get_span_context().trace_id:032x}"


def record_engine(mod, tracer, url: str) -> dict:  # noqa: ANN001
    """An engine's life: the object is made outside any trace, planned in a warm-up
    trace, run in a step; planned again in another trace, run in a later step; a free
    function between, outside any trace."""
    otel_flashinfer.instrument(level=10, blob_url=url, journal_dir="")
    torch.manual_seed(0)
    obj = mod.Scaler(4)
    times = {"made": time.time_ns()}
    with tracer.start_as_current_span("warmup") as warm:
        obj.plan(torch.randn(4, 4), torch.randn(4))
    with tracer.start_as_current_span("engine.step") as step1:
        out1 = obj.run(torch.randn(3, 4))
    mod.norm(torch.randn(5))  # a root of its own
    time.sleep(0.01)
    times["mid"] = time.time_ns()
    time.sleep(0.01)
    with tracer.start_as_current_span("replan") as replan:
        obj.plan(torch.randn(4, 4), torch.randn(4))
    with tracer.start_as_current_span("engine.step") as step2:
        out2 = obj.run(torch.randn(3, 4))
        mod.norm(out2)
    assert otel_flashinfer.flush(30)
    otel_flashinfer.uninstrument()  # replay must not trace what it replays
    times["end"] = time.time_ns()
    return {"warm": _trace(warm), "step1": _trace(step1), "replan": _trace(replan),
            "step2": _trace(step2), "out1": out1, "out2": out2, "times": times,
            "step2_span": step2}


def _apis(bundle) -> list[str]:  # noqa: ANN001
    return [c["api"] for c in bundle.calls]


def test_run_pulled_by_its_trace_brings_init_and_plan_in_force(spans, target, tmp_path):
    store = str(tmp_path / "store")
    rec = record_engine(target, spans.tracer(), store)
    # The step's own trace holds the run only: __init__ and plan are elsewhere.
    assert len(BlobStore(store, check_writable=False).list_manifests(rec["step2"])) == 2
    bundle = pull(rec["step2"], store, str(tmp_path / "b2"))
    assert _apis(bundle) == ["Scaler.__init__", "Scaler.plan", "Scaler.run", "norm"]
    init, plan, run, _ = bundle.calls
    assert plan["trace_id"] == rec["replan"] and run["trace_id"] == rec["step2"]
    assert init["trace_id"] not in (rec["warm"], rec["step1"], rec["replan"], rec["step2"])
    out = io.StringIO()
    report = replay(str(tmp_path / "b2"), allow_modules=(target.__name__,), out=out)
    assert report.ok, out.getvalue()
    assert [r.detail for r in report.results] == ["object rebuilt", "bit-exact", "bit-exact",
                                                  "bit-exact"]
    # The first step gets the first plan, not the later one.
    bundle1 = pull(rec["step1"], store, str(tmp_path / "b1"))
    assert _apis(bundle1) == ["Scaler.__init__", "Scaler.plan", "Scaler.run"]
    assert bundle1.calls[1]["trace_id"] == rec["warm"]
    assert replay(str(tmp_path / "b1"), allow_modules=(target.__name__,), out=io.StringIO()).ok


def test_span_pull_brings_the_chain_of_that_span(spans, target, tmp_path):
    store = str(tmp_path / "store")
    rec = record_engine(target, spans.tracer(), store)
    manifests = BlobStore(store, check_writable=False).list_manifests(rec["step2"])
    run_span = layout.parse_manifest_name(manifests[0].rsplit("/", 1)[1])[1]
    bundle = pull(rec["step2"], store, str(tmp_path / "b"), span_id=run_span)
    assert _apis(bundle) == ["Scaler.__init__", "Scaler.plan", "Scaler.run"]
    assert replay(str(tmp_path / "b"), allow_modules=(target.__name__,), out=io.StringIO()).ok


def test_index_names_every_call_and_each_chain(spans, target, tmp_path):
    store_url = str(tmp_path / "store")
    record_engine(target, spans.tracer(), store_url)
    store = BlobStore(store_url, check_writable=False)
    (proc,) = index.list_processes(store)
    assert layout.process_pid(proc) == os.getpid()
    calls = index.list_calls(store, proc)
    assert [c["api"] for c in calls] == ["Scaler.__init__", "Scaler.plan", "Scaler.run",
                                         "norm", "Scaler.plan", "Scaler.run", "norm"]
    assert all(c["bytes"] > 0 for c in calls if c["api"] != "Scaler.__init__")
    m = json.loads((tmp_path / "store" / calls[2]["manifest"]).read_text())
    chain = index.list_chain(store, proc, m["instance_id"])
    assert [e["method"] for e in chain] == ["__init__", "plan", "plan"]
    info = index.read_info(store, proc)
    assert info["pid"] == os.getpid() and info["service"]


def test_missing_or_corrupt_init_is_refused_naming_the_file(spans, target, tmp_path):
    store = tmp_path / "store"
    rec = record_engine(target, spans.tracer(), str(store))
    s = BlobStore(str(store), check_writable=False)
    (proc,) = index.list_processes(s)
    init_entry = index.list_calls(s, proc)[0]
    init_path = store / init_entry["manifest"]
    original = init_path.read_bytes()
    init_path.write_bytes(b"{not json")
    out = tmp_path / "refused"
    with pytest.raises(ManifestError, match=init_entry["manifest"].rsplit("/", 1)[1]):
        pull(rec["step2"], str(store), str(out))
    assert not out.exists()  # nothing written when refused
    init_path.unlink()
    with pytest.raises(BundleError, match="manifest named by the store's index is missing"):
        pull(rec["step2"], str(store), str(out))
    init_path.write_bytes(original)
    # Without its index entry, the object has no __init__ the store knows of.
    run_key = s.list_manifests(rec["step2"])[0]
    for entry in (store / layout.INSTANCES).rglob("*__init__"):
        entry.unlink()
    with pytest.raises(BundleError, match=rf"{run_key.rsplit('/', 1)[1]}.*no recorded __init__"):
        pull(rec["step2"], str(store), str(out))
    assert not out.exists()


def test_session_pull_replays_a_whole_process_in_call_order(spans, target, tmp_path):
    store = str(tmp_path / "store")
    rec = record_engine(target, spans.tracer(), store)
    bundle = pull_session(store, str(tmp_path / "all"), process=str(os.getpid()))
    assert _apis(bundle) == ["Scaler.__init__", "Scaler.plan", "Scaler.run", "norm",
                             "Scaler.plan", "Scaler.run", "norm"]
    assert len({c["trace_id"] for c in bundle.calls}) == 6
    starts = [c["start_ns"] for c in bundle.calls]
    assert starts == sorted(starts)
    out = io.StringIO()
    report = replay(str(tmp_path / "all"), allow_modules=(target.__name__,), out=out)
    assert report.ok and report.passed == 7, out.getvalue()
    # A window after the first step: the object made and planned before it still comes.
    since = str(rec["times"]["mid"] / 1e9)
    late = pull_session(store, str(tmp_path / "late"), process=str(os.getpid()), since=since)
    assert _apis(late) == ["Scaler.__init__", "Scaler.plan", "Scaler.run", "norm"]
    assert replay(str(tmp_path / "late"), allow_modules=(target.__name__,),
                  out=io.StringIO()).ok
    # By service name (OTEL_SERVICE_NAME unset: the SDK's default).
    svc = index.read_info(BlobStore(store, check_writable=False),
                          index.list_processes(BlobStore(store, check_writable=False))[0])
    by_service = pull_session(store, str(tmp_path / "svc"), service=svc["service"])
    assert len(by_service.calls) == 7


def test_session_bad_input_is_named(spans, target, tmp_path):
    store = str(tmp_path / "store")
    rec = record_engine(target, spans.tracer(), store)
    out = tmp_path / "never"
    with pytest.raises(BundleError, match="process 999999999 has no recorded calls"):
        pull_session(store, str(out), process="999999999")
    with pytest.raises(BundleError, match="not a pid or a process name"):
        pull_session(store, str(out), process="12;rm")
    with pytest.raises(BundleError, match="service 'nope' has no recorded calls"):
        pull_session(store, str(out), service="nope")
    with pytest.raises(BundleError, match="--since 'yesterday-ish': not a time"):
        pull_session(store, str(out), process=str(os.getpid()), since="yesterday-ish")
    after = str(rec["times"]["end"] / 1e9 + 3600)
    with pytest.raises(BundleError, match=r"no recorded calls of process .* between"):
        pull_session(store, str(out), process=str(os.getpid()), since=after)
    with pytest.raises(BundleError, match=r"--until .* is before --since"):
        pull_session(store, str(out), process=str(os.getpid()), since="2026-01-02",
                     until="2026-01-01")
    assert not out.exists()
    assert parse_time("2026-12-04T13:00:00Z", "--since") == 1796389200 * 10**9
    assert parse_time("1796389200", "--since") == 1796389200 * 10**9


def _cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli.main(list(argv))
    return code, buf.getvalue()


def test_ls_and_cli_session_pull(spans, target, tmp_path, capsys):
    store = str(tmp_path / "store")
    record_engine(target, spans.tracer(), store)
    code, text = _cli("ls", "--blob-url", store, "--json")
    assert code == 0
    (proc,) = json.loads(text)
    assert proc["pid"] == os.getpid() and proc["calls"] == 7 and proc["traces"] == 6
    assert proc["apis"]["Scaler.run"]["calls"] == 2 and proc["apis"]["norm"]["calls"] == 2
    assert proc["bytes"] == sum(a["bytes"] for a in proc["apis"].values()) > 0
    code, text = _cli("ls", "--blob-url", store)
    assert code == 0 and f"process {proc['process']}" in text and "1 processes, 7 calls" in text
    code, text = _cli("pull", "--process", proc["process"], "--blob-url", store,
                      "-o", str(tmp_path / "b"))
    assert code == 0 and "pulled 7 calls" in text
    code, _ = _cli("pull", "--process", "1", "--blob-url", store, "-o", str(tmp_path / "x"))
    assert code == 1 and "process 1 has no recorded calls" in capsys.readouterr().err
    code, _ = _cli("pull", "00" * 16, "--process", "1", "--blob-url", store)
    assert code == 2 and "not both" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code, text = _cli("ls", "--blob-url", str(tmp_path / "empty"))
    assert code == 0 and text == "no recorded calls\n"
    # a folder that is not there is a typo, not a store without calls
    code, _ = _cli("ls", "--blob-url", str(tmp_path / "emtpy"))
    assert code == 1 and "no blob store there" in capsys.readouterr().err


@pytest.fixture
def fresh_s3fs():
    """s3fs caches filesystems by their arguments, not by AWS_ENDPOINT_URL: one made
    for this test's moto server must not outlive it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_chain_and_session_on_s3(spans, target, tmp_path, fresh_s3fs):
    with moto_s3() as s3:
        url = f"s3://{s3['bucket']}/blobs"
        rec = record_engine(target, spans.tracer(), url)
        bundle = pull(rec["step2"], url, str(tmp_path / "b"))
        assert _apis(bundle) == ["Scaler.__init__", "Scaler.plan", "Scaler.run", "norm"]
        assert replay(str(tmp_path / "b"), allow_modules=(target.__name__,),
                      out=io.StringIO()).ok
        session = pull_session(url, str(tmp_path / "s"), process=str(os.getpid()))
        assert len(session.calls) == 7
        report = replay(str(tmp_path / "s"), allow_modules=(target.__name__,),
                        out=io.StringIO())
        assert report.ok and report.passed == 7
        listing = index.describe_store(BlobStore(url, check_writable=False))
        assert [p["calls"] for p in listing] == [7]
    assert Path(tmp_path / "b" / "index.json").is_file()


def test_graph_replay_child_brings_its_chain_host_tensors(spans, target, tmp_path):
    """The CUDA-graph path with host tensors and a hand-opened capture (as
    test_blobs_graph_gpu does), so it runs anywhere: a replay child's manifest names
    its process, and its trace pulls the start-up __init__ and plan."""
    from otel_flashinfer import graphs, runtime

    store = str(tmp_path / "store")
    otel_flashinfer.instrument(level=10, blob_url=store, journal_dir="")
    obj = target.Scaler(4)
    obj.plan(torch.randn(4, 4), torch.randn(4))
    capture = graphs.Capture(9)
    graphs._capturing = capture  # what the patched capture_begin does
    try:
        want = obj.run(torch.randn(2, 4))
    finally:
        graphs._capturing = None
    with spans.tracer().start_as_current_span("engine.step") as step:
        now = time.time_ns()
        graphs.emit_replay(runtime.current(), capture, 1, now, now + 1000, None)
    assert otel_flashinfer.flush(30)
    otel_flashinfer.uninstrument()
    trace = _trace(step)
    keys = BlobStore(store, check_writable=False).list_manifests(trace)
    assert len(keys) == 1 and json.loads(Path(store, keys[0]).read_text())["process"]
    bundle = pull(trace, store, str(tmp_path / "b"))
    assert _apis(bundle) == ["Scaler.__init__", "Scaler.plan", "Scaler.run"]
    report = replay(str(tmp_path / "b"), allow_modules=(target.__name__,), out=io.StringIO())
    assert report.ok and report.results[-1].detail == "bit-exact"
    assert torch.equal(report.results[-1].call.result, want)


def test_tampered_index_is_refused_or_ignored(spans, target, tmp_path):
    """Index names are untrusted: foreign names are skipped; an entry that points at
    another call's manifest is refused, naming that manifest."""
    store = tmp_path / "store"
    rec = record_engine(target, spans.tracer(), str(store))
    s = BlobStore(str(store), check_writable=False)
    (proc,) = index.list_processes(s)
    calls = index.list_calls(s, proc)
    run = json.loads((store / calls[2]["manifest"]).read_text())
    folder = store / layout.instance_prefix(proc, run["instance_id"])
    for junk in ("zzz", "00000000000000000001-0000000000000001-" + "0" * 32 + "-run",
                 "notes.txt"):
        (folder / junk).write_bytes(b"")
    (store / layout.PROCESSES / "not-a-process").mkdir()
    assert _apis(pull(rec["step2"], str(store), str(tmp_path / "ok")))[:3] == [
        "Scaler.__init__", "Scaler.plan", "Scaler.run"]
    norm = calls[3]  # a plain function's call, recorded after the object was made
    planted = layout.chain_entry_name(norm["start_ns"], norm["span_id"], norm["trace_id"],
                                      "__init__")
    (folder / planted).write_bytes(b"")
    out = tmp_path / "refused"
    with pytest.raises(BundleError, match=rf"{norm['manifest'].rsplit('/', 1)[1]}: is not "
                                          r"the __init__ of instance"):
        pull(rec["step2"], str(store), str(out))
    assert not out.exists()
