"""FlashInferInstrumentor against the real flashinfer-python package (CPU).

Identity tests use a stand-in wrapper factory so that they check only where wrappers
go and that everything comes back; span tests use the real core (``spans`` fixture
from conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

flashinfer = pytest.importorskip("flashinfer")
import torch  # noqa: E402
from flashinfer import rmsnorm as EARLY_RMSNORM  # noqa: E402  (imported before instrument)
from opentelemetry.trace import StatusCode  # noqa: E402

import otel_flashinfer  # noqa: E402
from otel_flashinfer import discovery  # noqa: E402
from otel_flashinfer.config import Settings  # noqa: E402
from otel_flashinfer.instrumentor import FlashInferInstrumentor, import_all, selected  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_instrument import read_spans  # noqa: E402

#: Every test here runs over the C hot path and the pure-Python wrapper.
pytestmark = pytest.mark.usefixtures("wrapper_path")

REPO = Path(__file__).resolve().parents[1]


def stand_in(fn, api_name, *, settings):  # noqa: ANN001, ANN201
    """A wrapper that only marks itself, like spans.make_wrapper does."""

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    wrapper._otel_flashinfer_api = api_name
    return wrapper


@pytest.fixture(scope="module")
def entries():  # noqa: ANN201
    found = discovery.discover()
    _, failed = import_all(found)
    # Only modules needing optional packages (triton, quack-kernels) may fail.
    assert len(failed) <= 3, failed
    assert all(("triton" in why or "quack" in why) for why in failed.values()), failed
    return [e for e in found if e.module in sys.modules]


def _resolve(entry: discovery.EntryPoint):  # noqa: ANN202
    """(container, attribute, raw value) where the entry point is defined."""
    container = sys.modules[entry.module]
    *classes, name = entry.qualname.split(".")
    for part in classes:
        container = vars(container)[part]
    return container, name, vars(container)[name]


def _function(raw):  # noqa: ANN001, ANN202
    return raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw


def _holders(originals: dict[int, object]) -> dict[tuple[int, str], tuple[object, object]]:
    """Every module attribute in the process that holds one of ``originals``."""
    out = {}
    for module in list(sys.modules.values()):
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in items:
            if id(value) in originals and originals[id(value)] is value:
                out[(id(module), attr)] = (module, value)
    return out


def _instrument(**settings):  # noqa: ANN003, ANN202
    inst = FlashInferInstrumentor()
    inst.instrument(settings=Settings(**settings), wrapper_factory=stand_in,
                    skip_dep_check=True)
    return inst


def test_every_entry_point_wrapped_everywhere_and_restored(entries) -> None:  # noqa: ANN001
    before = {(e.module, e.qualname): _resolve(e)[2] for e in entries}
    originals = {id(_function(r)): _function(r) for r in before.values()}
    holders = _holders(originals)
    assert len(entries) >= 494
    inst = _instrument(level=1)
    try:
        seen_wrappers = {}
        for entry in entries:
            _, _, raw = _resolve(entry)
            fn = _function(raw)
            old = before[(entry.module, entry.qualname)]
            for kind in (staticmethod, classmethod):  # a static method stays static
                assert isinstance(raw, kind) == isinstance(old, kind), entry
            assert fn._otel_flashinfer_api == entry.api_name, entry
            assert fn.__wrapped__ is _function(before[(entry.module, entry.qualname)])
            seen_wrappers[id(fn.__wrapped__)] = fn
        # Wrapped once: one wrapper per original, and it is what every re-export holds.
        assert inst.wrapped_count() == len(originals)
        for (_, attr), (module, value) in holders.items():
            assert vars(module)[attr] is seen_wrappers[id(value)], (module.__name__, attr)
        assert flashinfer.rmsnorm is flashinfer.norm.rmsnorm
        assert EARLY_RMSNORM is flashinfer.rmsnorm  # this module's early from-import too
        assert flashinfer.rmsnorm.__wrapped__ is originals[id(flashinfer.rmsnorm.__wrapped__)]
        decode_run = vars(flashinfer.BatchDecodeWithPagedKVCacheWrapper)["run"]
        assert decode_run._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.run"
    finally:
        inst.uninstrument()
    for entry in entries:
        assert _resolve(entry)[2] is before[(entry.module, entry.qualname)], entry
    for (_, attr), (module, value) in holders.items():
        assert vars(module)[attr] is value, (module.__name__, attr)
    assert EARLY_RMSNORM is originals[id(EARLY_RMSNORM)]
    assert _holders(originals).keys() == holders.keys()


def test_the_names_flashinfer_gives_an_entry_point_are_wrapped_too(entries) -> None:  # noqa: ANN001
    """``begin_forward = plan``, ``run_return_lse = partialmethod(run, ...)`` and the
    module's ``partial(single_prefill_with_kv_cache, ...)`` held the unwrapped function:
    their calls made no span (FlashInfer's own logger sees them).  They now hold the
    wrapper (the partials rebuilt around it) and get their own back."""
    import functools

    cls = flashinfer.BatchDecodeWithPagedKVCacheWrapper
    prefill = sys.modules["flashinfer.prefill"]
    before = dict(vars(cls))
    lse_before = vars(prefill)["single_prefill_with_kv_cache_return_lse"]
    inst = _instrument(level=1)
    try:
        now = vars(cls)
        assert now["begin_forward"] is now["plan"]
        assert now["plan"]._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.plan"
        lse = now["run_return_lse"]
        assert isinstance(lse, functools.partialmethod) and lse.func is now["run"]
        assert lse.keywords == before["run_return_lse"].keywords
        single = vars(prefill)["single_prefill_with_kv_cache_return_lse"]
        assert single.func._otel_flashinfer_api == "single_prefill_with_kv_cache"
        assert single.keywords == lse_before.keywords
        assert single.__doc__ == lse_before.__doc__  # FlashInfer sets its own
        # the public name, flashinfer's own import of it, is the same rebuilt partial
        assert flashinfer.single_prefill_with_kv_cache_return_lse is single
    finally:
        inst.uninstrument()
    for name in ("plan", "begin_forward", "run", "run_return_lse"):
        assert vars(cls)[name] is before[name]
    assert vars(prefill)["single_prefill_with_kv_cache_return_lse"] is lse_before
    assert flashinfer.single_prefill_with_kv_cache_return_lse is lse_before


def test_a_subclass_inheriting_an_entry_point_is_named_by_its_own_class(entries) -> None:  # noqa: ANN001
    """FlashInfer's logger names a call by the object's class: a
    ``CUDAGraphBatchDecodeWithPagedKVCacheWrapper`` (or gpt-oss's
    ``BatchAttentionWithAttentionSinkWrapper``) calls its inherited ``run`` under its
    own name.  Our spans said the base class's, and an include pattern on the subclass's
    name matched nothing.  The filters judge the subclass's name; uninstrument() leaves
    the method inherited again."""
    sub = sys.modules["flashinfer.decode"].CUDAGraphBatchDecodeWithPagedKVCacheWrapper
    base = flashinfer.BatchDecodeWithPagedKVCacheWrapper
    sink = sys.modules["flashinfer.attention._core"].BatchAttentionWithAttentionSinkWrapper
    raw = vars(base)["run"]
    assert "run" not in vars(sub) and "run" not in vars(sink)
    inst = _instrument(level=1)
    try:
        assert vars(sub)["run"]._otel_flashinfer_api == \
            "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.run"
        assert vars(sub)["run"].__wrapped__ is raw
        assert vars(base)["run"]._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.run"
        assert vars(sink)["run"]._otel_flashinfer_api == \
            "BatchAttentionWithAttentionSinkWrapper.run"
    finally:
        inst.uninstrument()
    assert "run" not in vars(sub) and vars(base)["run"] is raw and "run" not in vars(sink)
    for name in ("begin_forward", "run_return_lse"):  # its aliases: inherited again
        assert name not in vars(sub)
    inst = _instrument(level=1, include=("CUDAGraph*",))
    try:
        assert vars(sub)["run"]._otel_flashinfer_api == \
            "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.run"
        assert vars(base)["run"] is raw  # the base class's own name is not included
        # the aliases it inherits come with its name
        assert vars(sub)["begin_forward"] is vars(sub)["plan"]
        assert vars(sub)["plan"]._otel_flashinfer_api == \
            "CUDAGraphBatchDecodeWithPagedKVCacheWrapper.plan"
        assert vars(sub)["run_return_lse"].func is vars(sub)["run"]
    finally:
        inst.uninstrument()
    inst = _instrument(level=1, exclude=("CUDAGraph*",))
    try:
        assert vars(sub)["run"] is raw  # not traced under the base class's name either
        assert vars(sub)["run_return_lse"].func is raw
        assert not hasattr(vars(sub)["begin_forward"], "_otel_flashinfer_api")
        assert vars(base)["run"]._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.run"
    finally:
        inst.uninstrument()
    assert "run" not in vars(sub)


def test_an_applications_subclass_keeps_the_base_classs_wrapper(entries) -> None:  # noqa: ANN001
    """Only FlashInfer's own subclasses are named by their class: an application's
    subclass is traced under the base class's name whenever it is defined (before, its
    name depended on whether it existed when instrument() ran), and one that refuses
    attributes does not stop the base class from being wrapped."""
    base = flashinfer.BatchDecodeWithPagedKVCacheWrapper

    class Frozen(type):
        def __setattr__(cls, name, value):  # noqa: ANN001, ANN204, N805
            raise AttributeError("frozen")

    class Early(base):
        pass

    class Refusing(base, metaclass=Frozen):
        pass

    inst = _instrument(level=1)
    try:
        class Late(base):
            pass

        for cls in (Early, Late, Refusing):
            assert "run" not in vars(cls)
            assert cls.run._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.run"
    finally:
        inst.uninstrument()


def test_level_0_installs_nothing(entries) -> None:  # noqa: ANN001
    before = {(e.module, e.qualname): _resolve(e)[2] for e in entries}
    inst = _instrument(level=0)
    try:
        assert inst.wrapped_count() == 0
        assert inst.installed() == []
        for entry in entries:
            assert _resolve(entry)[2] is before[(entry.module, entry.qualname)]
    finally:
        inst.uninstrument()


def test_selected_include_then_exclude() -> None:
    assert selected("rmsnorm", (), ())
    assert not selected("rmsnorm", ("Batch*",), ())
    assert selected("BatchDecodeWithPagedKVCacheWrapper.run", ("Batch*",), ("*.plan",))
    assert not selected("BatchDecodeWithPagedKVCacheWrapper.plan", ("Batch*",), ("*.plan",))
    assert not selected("rmsnorm", (), ("rms*",))


def _installed_api(value):  # noqa: ANN001, ANN202
    """The API name of an installed wrapper, inside a static/class method or a partial
    (an alias of an entry point)."""
    import functools

    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, (functools.partial, functools.partialmethod)):
        value = value.func
    return getattr(value, "_otel_flashinfer_api", None)  # None: an original put back


def test_include_exclude_patterns(entries) -> None:  # noqa: ANN001
    inst = _instrument(level=1, include=("BatchDecode*", "rmsnorm"), exclude=("*.plan",))
    try:
        names = {_installed_api(p[3]) for p in inst.installed()} - {None}
        assert "rmsnorm" in names
        assert "BatchDecodeWithPagedKVCacheWrapper.run" in names
        assert "BatchDecodeWithPagedKVCacheWrapper.plan" not in names
        assert "fused_add_rmsnorm" not in names
        assert all(n == "rmsnorm" or n.startswith("BatchDecode") for n in names)
        assert not hasattr(vars(flashinfer.BatchDecodeWithPagedKVCacheWrapper)["plan"],
                           "_otel_flashinfer_api")
    finally:
        inst.uninstrument()


def test_instrument_twice_is_refused_and_state_kept(entries) -> None:  # noqa: ANN001
    inst = _instrument(level=1)
    try:
        wrapped = flashinfer.rmsnorm
        FlashInferInstrumentor().instrument(settings=Settings(level=1),
                                            wrapper_factory=stand_in)
        assert flashinfer.rmsnorm is wrapped  # not wrapped a second time
    finally:
        inst.uninstrument()
    assert not hasattr(flashinfer.rmsnorm, "_otel_flashinfer_api")


# ---- with the real core ---------------------------------------------------------------


def test_cpu_error_span_and_exception_unchanged(entries, spans) -> None:  # noqa: ANN001
    x, w = torch.randn(4, 64), torch.ones(64)
    with pytest.raises(BaseException) as plain:
        flashinfer.rmsnorm(x, w)
    otel_flashinfer.instrument(level=1, journal_dir="")
    with spans.tracer().start_as_current_span("engine.step") as step:
        with pytest.raises(type(plain.value)) as traced:
            flashinfer.rmsnorm(x, w)
    assert str(traced.value) == str(plain.value)
    (span,) = spans.by_name("rmsnorm")
    assert span.parent.span_id == step.get_span_context().span_id
    assert span.context.trace_id == step.get_span_context().trace_id
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["flashinfer.api"] == "rmsnorm"
    assert any(ev.name == "exception" for ev in span.events)


def test_cpu_wrapper_init_span_with_instance_id(entries, spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=3, journal_dir="")
    workspace = torch.empty(1 << 20, dtype=torch.uint8)
    gemm = flashinfer.SegmentGEMMWrapper(workspace)
    (span,) = spans.by_name("SegmentGEMMWrapper.__init__")
    assert span.status.status_code is not StatusCode.ERROR
    assert span.attributes["flashinfer.instance.id"] == f"{os.getpid()}:{id(gemm)}"
    assert tuple(span.attributes["flashinfer.arg.float_workspace_buffer.shape"]) == (1 << 20,)
    assert span.attributes["flashinfer.arg.float_workspace_buffer.dtype"] == "uint8"


# ---- other processes ------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "FLASHINFER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OTEL_FLASHINFER_JOURNAL_DIR"] = ""
    env["OTEL_FLASHINFER_TRACES_FILE"] = str(tmp_path / "traces.jsonl")
    env.update(extra)
    return env


def _run_python(code: str, env: dict[str, str], cwd: Path, *prefix: str
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=240)


def test_modules_imported_later_are_wrapped_on_import(tmp_path) -> None:  # noqa: ANN001
    code = """
        import sys, otel_flashinfer
        otel_flashinfer.instrument(level=1)
        assert "flashinfer" not in sys.modules
        import flashinfer
        import flashinfer.norm
        assert flashinfer.rmsnorm._otel_flashinfer_api == "rmsnorm"
        assert flashinfer.norm.rmsnorm is flashinfer.rmsnorm
        run = vars(flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper)["run"]
        assert run._otel_flashinfer_api == "BatchDecodeWithPagedKVCacheWrapper.run"
        otel_flashinfer.uninstrument()
        assert not hasattr(flashinfer.rmsnorm, "_otel_flashinfer_api")
        assert flashinfer.norm.rmsnorm is flashinfer.rmsnorm
        print("ok")
    """
    done = _run_python(code, _env(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_coexists_with_flashinfer_loglevel(tmp_path) -> None:  # noqa: ANN001
    code = """
        import torch, flashinfer, otel_flashinfer
        from flashinfer.gemm import SegmentGEMMWrapper
        # (a list: module globals holding an original are re-pointed like from-imports)
        theirs = [vars(SegmentGEMMWrapper)["__init__"]]
        assert theirs[0].__wrapped__ is not theirs[0]   # FlashInfer's own logging wrapper
        otel_flashinfer.instrument(level=1)
        ours = vars(SegmentGEMMWrapper)["__init__"]
        assert ours.__wrapped__ is theirs[0]
        SegmentGEMMWrapper(torch.empty(1 << 20, dtype=torch.uint8))
        assert otel_flashinfer.flush(10)
    """
    env = _env(tmp_path, FLASHINFER_LOGLEVEL="1", FLASHINFER_LOGDEST="stdout")
    done = _run_python(code, env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("FlashInfer API Call: SegmentGEMMWrapper.__init__") == 1
    names = [s["name"] for s in read_spans(tmp_path / "traces.jsonl")]
    assert names.count("SegmentGEMMWrapper.__init__") == 1


def test_opentelemetry_instrument_picks_up_the_entry_point(tmp_path) -> None:  # noqa: ANN001
    eps = [ep for ep in entry_points(group="opentelemetry_instrumentor")
           if ep.name == "flashinfer"]
    if not eps:
        pytest.skip("otel-flashinfer is not installed (pip install -e .) so no entry point")
    assert eps[0].load() is FlashInferInstrumentor
    code = """
        import torch, flashinfer
        flashinfer.SegmentGEMMWrapper(torch.empty(1 << 20, dtype=torch.uint8))
        import otel_flashinfer
        assert otel_flashinfer.flush(10)
    """
    exe = Path(sys.executable).with_name("opentelemetry-instrument")
    prefix = str(exe) if exe.exists() else "opentelemetry-instrument"
    done = _run_python(code, _env(tmp_path, OTEL_FLASHINFER_LEVEL="1"), tmp_path, prefix)
    assert done.returncode == 0, done.stderr
    names = [s["name"] for s in read_spans(tmp_path / "traces.jsonl")]
    assert names.count("SegmentGEMMWrapper.__init__") == 1, (names, done.stderr)


def test_missing_instrumentor_is_reported_not_silent(monkeypatch, caplog) -> None:  # noqa: ANN001
    """A broken install (opentelemetry-instrumentation missing) used to trace nothing
    without a word: the failure is counted and logged once."""
    from otel_flashinfer import health

    health.reset()
    # As if opentelemetry-instrumentation were not installed: our module fails to import.
    monkeypatch.delitem(sys.modules, "otel_flashinfer.instrumentor")
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.instrumentor", None)
    with caplog.at_level("WARNING", logger="otel_flashinfer"):
        otel_flashinfer.instrument(level=1, journal_dir="")
    try:
        assert health.counters().get("instrumentor_unavailable") == 1
        assert "is opentelemetry-instrumentation installed?" in caplog.text
        run = vars(flashinfer.BatchDecodeWithPagedKVCacheWrapper)["run"]
        assert "otel_flashinfer" not in run.__code__.co_filename
    finally:
        monkeypatch.undo()
        otel_flashinfer.uninstrument()
