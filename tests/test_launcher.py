"""``otel-flashinfer run``: environment, resource attributes, and one trace across
a parent, a multiprocessing spawn worker, a fork worker and a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from otel_flashinfer import launcher

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_instrument import read_spans  # noqa: E402

from otel_flashinfer.resource import cuda_device, process_resource_attributes

REPO = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_child_environment_defaults_and_bootstrap_first() -> None:
    env = launcher.child_environment(
        {"PYTHONPATH": f"/a{os.pathsep}{launcher.bootstrap_dir()}", "TRACESTATE": "old=1"},
        {"traceparent": TRACEPARENT, "tracestate": "k=v"})
    assert env["OTEL_FLASHINFER_LEVEL"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [launcher.bootstrap_dir(), "/a"]
    assert env["TRACEPARENT"] == TRACEPARENT and env["TRACESTATE"] == "k=v"
    kept = launcher.child_environment({"OTEL_FLASHINFER_LEVEL": "3"}, {})
    assert kept["OTEL_FLASHINFER_LEVEL"] == "3"
    assert "TRACEPARENT" not in kept and kept["PYTHONPATH"] == launcher.bootstrap_dir()


def test_context_round_trip_through_environment() -> None:
    from opentelemetry import trace

    ctx = launcher.context_from_environment({"TRACEPARENT": TRACEPARENT})
    sc = trace.get_current_span(ctx).get_span_context()
    assert (sc.trace_id, sc.span_id, sc.is_remote) == (
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True)
    assert launcher.inject_carrier(ctx)["traceparent"] == TRACEPARENT
    empty = launcher.context_from_environment({})
    assert not trace.get_current_span(empty).get_span_context().is_valid


def test_resource_attributes() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert process_resource_attributes(env, pid=42) == {
        "process.pid": 42, "flashinfer.rank": 5, "flashinfer.local_rank": 1,
        "flashinfer.world_size": 8, "flashinfer.cuda.device": "5",
        "flashinfer.cuda.visible_devices": "4,5,6"}
    assert process_resource_attributes({"RANK": "x"}, pid=1) == {"process.pid": 1}
    assert process_resource_attributes({}, pid=None)["process.pid"] == os.getpid()
    assert cuda_device({"CUDA_VISIBLE_DEVICES": "GPU-abc"}) == "GPU-abc"
    assert cuda_device({"LOCAL_RANK": "3"}) == "3"
    assert cuda_device({"CUDA_VISIBLE_DEVICES": "0,1"}) is None
    assert cuda_device({"CUDA_VISIBLE_DEVICES": "0,1", "LOCAL_RANK": "7"}) is None


def test_run_without_command_is_a_usage_error() -> None:
    assert launcher.run_command(["--"]) == 2


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLASHINFER_"))}
    env["PYTHONPATH"] = str(REPO)
    env["OTEL_FLASHINFER_JOURNAL_DIR"] = ""
    env["RANK"] = "0"
    return env


MAIN = """
import multiprocessing as mp, os, subprocess, sys

def work(tag):
    import torch, flashinfer
    flashinfer.SegmentGEMMWrapper(torch.empty(1 << 16, dtype=torch.uint8))
    print(tag, os.getpid(), flush=True)

if __name__ == "__main__":
    work("main")
    for method in ("spawn", "fork"):
        p = mp.get_context(method).Process(target=work, args=(method,))
        p.start(); p.join()
        assert p.exitcode == 0, method
    subprocess.run([sys.executable, "-c", "import main; main.work('subprocess')"], check=True)
    sys.exit(3)
"""


def test_run_puts_every_process_in_one_trace(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "main.py").write_text(textwrap.dedent(MAIN))
    done = subprocess.run(
        [sys.executable, "-m", "otel_flashinfer", "run", "--", sys.executable, "main.py"],
        cwd=tmp_path, env={**_env(tmp_path), "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # the command's exit code comes back
    pids = dict(line.split() for line in done.stdout.splitlines() if line[:1].isalpha())
    assert set(pids) == {"main", "spawn", "fork", "subprocess"}
    spans = read_spans(tmp_path / "flashinfer_traces.jsonl")
    (run,) = [s for s in spans if s["name"] == launcher.RUN_SPAN_NAME]
    inits = [s for s in spans if s["name"] == "SegmentGEMMWrapper.__init__"]
    assert len(inits) == 4, (inits, done.stderr)  # the fork child flushed before os._exit
    pids_seen = {str(s["resource"]["process.pid"]) for s in inits}
    assert pids_seen >= {pids["main"], pids["spawn"], pids["subprocess"]}, (pids_seen, pids)
    for span in inits:
        assert span["traceId"] == run["traceId"]
        assert span["parentSpanId"] == run["spanId"]
        assert span["resource"]["flashinfer.rank"] == 0
    assert {a["key"] for a in run.get("attributes", ())} >= {"process.exit.code"}


def test_bootstrap_chains_to_an_existing_sitecustomize(tmp_path) -> None:  # noqa: ANN001
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['CHAINED'] = 'yes'\n")
    env = {**_env(tmp_path), "OTEL_FLASHINFER_LEVEL": "1", "TRACEPARENT": TRACEPARENT,
           "PYTHONPATH": os.pathsep.join([launcher.bootstrap_dir(), str(REPO), str(other)])}
    code = ("import os; from opentelemetry import trace; "
            "print(os.environ.get('CHAINED'), "
            "format(trace.get_current_span().get_span_context().trace_id, '032x'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["yes", TRACEPARENT.split("-")[1]]


FORK = """
import multiprocessing as mp, os, otel_flashinfer

@otel_flashinfer.traced(name="forked_call")
def call():
    print(os.getpid(), flush=True)

if __name__ == "__main__":
    otel_flashinfer.instrument(level=1, journal_dir="")
    call()
    p = mp.get_context("fork").Process(target=call)
    p.start(); p.join()
"""


def test_fork_child_spans_name_their_own_pid(tmp_path) -> None:  # noqa: ANN001
    """Waits on the core: the provider's Resource is built before fork, so a forked
    child must report its own pid (re-created resource, or a span attribute)."""
    (tmp_path / "forker.py").write_text(textwrap.dedent(FORK))
    done = subprocess.run([sys.executable, "forker.py"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = done.stdout.split()
    spans = [s for s in read_spans(tmp_path / "flashinfer_traces.jsonl")
             if s["name"] == "forked_call"]
    assert len(spans) == 2
    seen = set()
    for span in spans:
        attrs = {a["key"]: a["value"] for a in span.get("attributes", ())}
        pid = attrs.get("process.pid", {}).get("intValue", span["resource"]["process.pid"])
        seen.add(str(pid))
    assert seen == set(pids)
