"""Env-only activation through the installed start-up hook (``otel_flashinfer_autostart
.pth``), each program started with nothing but environment variables.

The hook is the repository's own ``.pth`` file, placed in a user site folder
(``PYTHONUSERBASE``), where Python processes ``.pth`` files exactly as in
site-packages.  The packaging tests check that ``pip install .`` and the PEP 660
editable build put the same file at the root of the wheel (site-packages).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
from servers import PhoenixServer, child_env, last_json_line, phoenix_installed

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_instrument import read_spans  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PTH = REPO / "otel_flashinfer_autostart.pth"
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None

pytestmark = pytest.mark.skipif(not site.ENABLE_USER_SITE,
                                reason="user site folders are off in this interpreter")


def hook_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment (no OTEL_*) whose Python processes run the start-up hook."""
    userbase = tmp_path / "userbase"
    site_dir = Path(sysconfig.get_path("purelib", f"{os.name}_user",
                                       vars={"userbase": str(userbase)}))
    site_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PTH, site_dir / PTH.name)
    env = child_env({"PYTHONUSERBASE": str(userbase), **extra})
    env = {k: v for k, v in env.items() if not k.startswith("FLASHINFER_")}
    env.setdefault("OTEL_FLASHINFER_JOURNAL_DIR", "")
    return env


def run(code: str, env: dict[str, str], cwd: Path, *args: str,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    script = cwd / f"prog_{uuid.uuid4().hex[:6]}.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


LOADED = """
import json, sys
print(json.dumps({m: m in sys.modules for m in (
    "otel_flashinfer", "otel_flashinfer_autostart", "opentelemetry", "flashinfer", "torch")}))
"""


def test_pth_is_one_guarded_import_line() -> None:
    lines = PTH.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import os;")
    assert "OTEL_FLASHINFER_LEVEL" in lines[0] and "OTEL_FLASHINFER_AUTOSTART" in lines[0]


@pytest.mark.parametrize("extra", [
    {}, {"OTEL_FLASHINFER_LEVEL": "0"}, {"OTEL_FLASHINFER_LEVEL": " "},
    {"OTEL_FLASHINFER_LEVEL": "3", "OTEL_FLASHINFER_AUTOSTART": "0"},
    {"OTEL_FLASHINFER_LEVEL": "3", "OTEL_FLASHINFER_AUTOSTART": "off"},
], ids=["unset", "zero", "blank", "opt-out", "opt-out-off"])
def test_off_imports_nothing(tmp_path: Path, extra: dict[str, str]) -> None:
    done = run(LOADED, hook_env(tmp_path, **extra), tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(last_json_line(done.stdout).values()), done.stdout
    assert done.stderr == ""


def test_on_sets_a_provider_and_imports_no_flashinfer(tmp_path: Path) -> None:
    code = LOADED.replace("print(", "from opentelemetry import trace\nprint(\"P\", "
                          "type(trace.get_tracer_provider()).__name__)\nprint(")
    done = run(code, hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="1"), tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = last_json_line(done.stdout)
    assert loaded["otel_flashinfer"] and loaded["opentelemetry"]
    assert not loaded["flashinfer"]  # wrapped when the application imports it, not before
    assert "P HandoffTracerProvider" in done.stdout


def test_bad_value_is_named_and_the_program_runs(tmp_path: Path) -> None:
    done = run("print('ran')", hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="7"), tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ran"
    assert "OTEL_FLASHINFER_LEVEL='7'" in done.stderr


@pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer-python")
def test_flashinfer_is_wrapped_when_imported(tmp_path: Path) -> None:
    code = """
    import json, sys
    before = "flashinfer" in sys.modules
    import flashinfer
    fn = flashinfer.rmsnorm
    print(json.dumps({"before": before, "api": getattr(fn, "_otel_flashinfer_api", None),
                      "double": hasattr(getattr(fn, "__wrapped__", None),
                                        "_otel_flashinfer_api")}))
    """
    done = run(code, hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="1"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert last_json_line(done.stdout) == {"before": False, "api": "rmsnorm", "double": False}


def test_handoff_tracers_follow_the_target() -> None:
    """In process, without touching the global provider: tracers handed out before a
    take-over (plain, context manager and decorator use) start spans in the provider the
    hand-off points at when each span starts; attributes are the target's."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_flashinfer.handoff import HandoffTracerProvider

    providers, exporters = [], []
    for _ in range(2):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
        exporters.append(exporter)
    handoff = HandoffTracerProvider(providers[0])
    tracer = handoff.get_tracer("engine", "1.0")

    @tracer.start_as_current_span("decorated")
    def step() -> int:
        return trace.get_current_span().get_span_context().span_id

    with tracer.start_as_current_span("one") as one:
        assert step() != one.get_span_context().span_id
    handoff.otel_flashinfer_target = providers[1]
    with tracer.start_as_current_span("two"):
        step()
    tracer.start_span("three").end()
    with pytest.raises(ValueError, match="boom"), tracer.start_as_current_span("raises"):
        raise ValueError("boom")
    names = [sorted(s.name for s in e.get_finished_spans()) for e in exporters]
    assert names == [["decorated", "one"], ["decorated", "raises", "three", "two"]]
    (raised,) = [s for s in exporters[1].get_finished_spans() if s.name == "raises"]
    assert raised.status.status_code.name == "ERROR"
    assert handoff.resource is providers[1].resource  # forwarded to the target
    assert handoff.force_flush(1000)
    for provider in providers:
        provider.shutdown()


# ---- end to end against a real receiver ------------------------------------------------

#: The engine takes its tracer at import, before anything of ours, and opens its step
#: span before its first traced call; a spawn worker does the same in its own process.
ENGINE = """
import json, multiprocessing as mp, os, sys
from opentelemetry import trace

tracer = trace.get_tracer("engine")
seen = {}

def note(name):
    seen[name] = format(trace.get_current_span().get_span_context().span_id, "016x")

def step(tag):
    import torch, flashinfer, otel_flashinfer

    @otel_flashinfer.traced(name=f"prepare.{tag}")
    def prepare(x):
        note(f"prepare.{tag}")
        return x + 1

    with tracer.start_as_current_span(f"engine.step.{tag}") as span:
        note(f"engine.step.{tag}")
        prepare(torch.ones(2))
        flashinfer.SegmentGEMMWrapper(torch.empty(1 << 16, dtype=torch.uint8))
    return format(span.get_span_context().trace_id, "032x")

def worker(queue):
    queue.put({"trace_id": step("worker"), "ids": seen, "pid": os.getpid()})

if __name__ == "__main__":
    trace_id = step("main")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=worker, args=(queue,))
    p.start()
    child = queue.get(timeout=120)
    p.join()
    print(json.dumps({"trace_id": trace_id, "ids": seen, "child": child,
                      "exit": p.exitcode,
                      "provider": type(trace.get_tracer_provider()).__name__}))
"""


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory):
    if not phoenix_installed():
        pytest.skip("needs arize-phoenix (test extra)")
    server = PhoenixServer(tmp_path_factory.mktemp("phoenix")).start()
    yield server
    server.stop()


def _check_step(spans: dict, report: dict, tag: str) -> None:
    by_name = {s["name"]: s for s in spans.values()}
    step = by_name[f"engine.step.{tag}"]
    assert step["parent_id"] is None
    assert step["context"]["span_id"] == report["ids"][f"engine.step.{tag}"]
    traced = by_name[f"prepare.{tag}"]
    assert traced["context"]["span_id"] == report["ids"][f"prepare.{tag}"]
    fi = by_name["SegmentGEMMWrapper.__init__"]
    for child in (traced, fi):
        assert child["parent_id"] == step["context"]["span_id"]
        assert child["context"]["trace_id"] == report["trace_id"]
    assert fi["attributes"]["flashinfer.api"] == "SegmentGEMMWrapper.__init__"
    assert fi["attributes"]["flashinfer.arg.float_workspace_buffer.shape"] == [65536]


@pytest.mark.server
@pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer-python")
def test_env_only_engine_span_is_the_parent_in_phoenix(phoenix: PhoenixServer,
                                                       tmp_path: Path) -> None:
    project = f"autostart-{uuid.uuid4().hex[:8]}"
    env = hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="3",
                   OTEL_EXPORTER_OTLP_ENDPOINT=phoenix.http_url,
                   OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_SERVICE_NAME="engine",
                   OTEL_RESOURCE_ATTRIBUTES=f"openinference.project.name={project}")
    done = run(ENGINE, env, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json_line(done.stdout)
    assert report["exit"] == 0 and report["provider"] == "HandoffTracerProvider"
    # Nothing flushed by hand: the processes' exit sends what they recorded.
    main = phoenix.wait_spans(project, 3, report["trace_id"], timeout_s=60)
    assert len(main) == 3, sorted(s["name"] for s in main.values())
    _check_step(main, report, "main")
    child = report["child"]
    assert child["pid"] != os.getpid()
    worker = phoenix.wait_spans(project, 3, child["trace_id"], timeout_s=60)
    assert len(worker) == 3
    _check_step(worker, child, "worker")
    assert not (tmp_path / "flashinfer_traces.jsonl").exists()


TAKE_OVER = """
import json, logging, otel_flashinfer
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

tracer = trace.get_tracer("engine")  # handed out by the start-up provider

@otel_flashinfer.traced
def kernel(x):
    return x + 1

def ids(span):
    c = span.get_span_context()
    return format(c.trace_id, "032x"), format(c.span_id, "016x")

with tracer.start_as_current_span("startup") as early:
    kernel(1)
# The application configures OpenTelemetry only now, as many do after their imports.
mine = TracerProvider(resource=Resource.create({"openinference.project.name": PROJECT}))
mine.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=ENDPOINT)))
trace.set_tracer_provider(mine)
took = trace.get_tracer_provider() is mine
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("opentelemetry.trace").addHandler(Catch())
trace.set_tracer_provider(TracerProvider())  # a second one: refused, as OTel always does
with tracer.start_as_current_span("engine.step") as step:
    kernel(2)
otel_flashinfer.flush(30)
mine.force_flush()
print(json.dumps({"early": ids(early), "step": ids(step), "took": took,
                  "still_mine": trace.get_tracer_provider() is mine, "warnings": warnings}))
"""


@pytest.mark.server
def test_application_provider_takes_over(phoenix: PhoenixServer, tmp_path: Path) -> None:
    project = f"takeover-{uuid.uuid4().hex[:8]}"
    code = TAKE_OVER.replace("PROJECT", repr(project)).replace(
        "ENDPOINT", repr(phoenix.http_url + "/v1/traces"))
    done = run(code, hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="1"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json_line(done.stdout)
    assert report["took"] and report["still_mine"]
    assert any("Overriding of current TracerProvider is not allowed" in w
               for w in report["warnings"])
    # From the take-over on: the engine's span and ours, nested, in the app's provider.
    (step_trace, step_id) = report["step"]
    spans = phoenix.wait_spans(project, 2, step_trace)
    by_name = {s["name"]: s for s in spans.values()}
    assert set(by_name) == {"engine.step", "kernel"}
    assert by_name["kernel"]["parent_id"] == step_id
    assert phoenix.spans(project, report["early"][0]) == []
    # Before it: in our provider (the local file, nothing else being configured).
    local = read_spans(tmp_path / "flashinfer_traces.jsonl")
    assert sorted(s["name"] for s in local) == ["kernel", "startup"]
    early = {s["name"]: s for s in local}
    assert early["startup"]["traceId"] == report["early"][0]
    assert early["kernel"]["parentSpanId"] == report["early"][1]


# ---- no double instrumentation -----------------------------------------------------------

COUNT = """
import json, sys, otel_flashinfer
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

mem = InMemorySpanExporter()
provider = trace.get_tracer_provider()
if not hasattr(provider, "add_span_processor"):  # opentelemetry-instrument without a distro
    from opentelemetry.sdk.trace import TracerProvider
    provider = TracerProvider()
    trace.set_tracer_provider(provider)
provider.add_span_processor(SimpleSpanProcessor(mem))

@otel_flashinfer.traced
def kernel(x):
    return x + 1

with trace.get_tracer("engine").start_as_current_span("engine.step"):
    kernel(1)
import flashinfer
otel_flashinfer.flush(30)
auto = sys.modules.get("otel_flashinfer._autostart")
print(json.dumps({"names": sorted(s.name for s in mem.get_finished_spans()),
                  "autostarted": bool(auto and auto.started),
                  "double": hasattr(flashinfer.rmsnorm.__wrapped__, "_otel_flashinfer_api")}))
"""


@pytest.mark.skipif(shutil.which("opentelemetry-instrument") is None or not HAS_FLASHINFER,
                    reason="needs opentelemetry-instrument and flashinfer-python")
def test_opentelemetry_instrument_with_the_hook_installed(tmp_path: Path) -> None:
    env = hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="1", OTEL_TRACES_EXPORTER="none",
                   OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    script = tmp_path / "count.py"
    script.write_text(textwrap.dedent(COUNT))
    done = subprocess.run(["opentelemetry-instrument", sys.executable, str(script)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json_line(done.stdout)
    assert report == {"names": ["engine.step", "kernel"], "autostarted": False,
                      "double": False}


@pytest.mark.skipif(not HAS_FLASHINFER, reason="needs flashinfer-python")
def test_otel_flashinfer_run_with_the_hook_installed(tmp_path: Path) -> None:
    env = hook_env(tmp_path, OTEL_FLASHINFER_LEVEL="1")
    script = tmp_path / "count.py"
    script.write_text(textwrap.dedent(COUNT).replace(
        "provider.add_span_processor(SimpleSpanProcessor(mem))", ""))
    done = subprocess.run([sys.executable, "-m", "otel_flashinfer", "run", "--",
                           sys.executable, str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = last_json_line(done.stdout)
    assert report["double"] is False and report["autostarted"] is True
    spans = read_spans(tmp_path / "flashinfer_traces.jsonl")
    names = sorted(s["name"] for s in spans)
    assert names == ["engine.step", "kernel", "otel-flashinfer run"], names
    by_name = {s["name"]: s for s in spans}
    assert by_name["engine.step"]["parentSpanId"] == by_name["otel-flashinfer run"]["spanId"]
    assert by_name["kernel"]["parentSpanId"] == by_name["engine.step"]["spanId"]


# ---- packaging: the hook lands in site-packages -----------------------------------------

def _wheel_pth(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        assert PTH.name in z.namelist(), z.namelist()
        return z.read(PTH.name)


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_install_ships_the_pth_at_the_site_packages_root(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    if kind == "wheel":
        cmd = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
               "--no-build-isolation", "-q", "-w", str(out)]
    else:
        cmd = [sys.executable, "-c", "import sys; from setuptools import build_meta; "
               "build_meta.build_editable(sys.argv[1])", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    assert _wheel_pth(wheel) == PTH.read_bytes()
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    if kind == "wheel":
        assert "otel_flashinfer_autostart.py" in names
    else:  # the editable finder's .pth sorts first, so our module is importable by then
        editable = sorted(n for n in names if n.endswith(".pth"))
        assert editable[0].startswith("__editable__") and editable[-1] == PTH.name
    json.dumps(names)  # a plain listing, for the failure message above
