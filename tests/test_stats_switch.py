"""How level 5 moves from the Python statistics hooks to the C++ ones once the
extension has built: the hot path's Switch, the kernel's ready listeners, and the hooks'
hand-over (CPU-only; the C++ hooks themselves are checked in test_stats_native_gpu)."""

from __future__ import annotations

import threading
import types

import pytest

from otel_flashinfer import health, native
from otel_flashinfer.stats import hooks, kernel
from otel_flashinfer.stats.recorder import StatsRecorder

_hotpath = pytest.importorskip("otel_flashinfer._hotpath")


def test_switch_forwards_calls_and_swaps_target():
    seen = []
    switch = _hotpath.Switch(lambda *a, **k: seen.append(("first", a, k)) or 1)
    assert switch(1, 2, x=3) == 1
    switch.target = lambda *a: seen.append(("second", a)) or 2
    assert switch("r", "s") == 2
    assert seen == [("first", (1, 2), {"x": 3}), ("second", ("r", "s"))]
    with pytest.raises(TypeError, match="callable"):
        switch.target = 3
    assert switch("t") == 2  # a refused target leaves the old one


def test_switch_passes_exceptions_through():
    def boom(*_):
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        _hotpath.Switch(boom)()


@pytest.fixture
def fresh_kernel(monkeypatch):
    """The kernel module's state as before any build, with a build we control."""
    gate = threading.Event()
    module = types.SimpleNamespace()
    monkeypatch.setattr(kernel, "_done", threading.Event())
    monkeypatch.setattr(kernel, "_module", None)
    monkeypatch.setattr(kernel, "_thread", None)
    monkeypatch.setattr(kernel, "_failed", False)
    monkeypatch.setattr(kernel, "_ready_callbacks", [])

    def build():
        gate.wait(10)
        return module

    monkeypatch.setattr(kernel, "_build", build)
    return gate, module


def test_listeners_run_before_get_reports_the_module(fresh_kernel):
    gate, module = fresh_kernel
    order = []
    kernel.when_ready(lambda m: order.append(("early", m)))
    assert kernel.get() is None
    gate.set()
    assert kernel.get(wait=True, timeout=10) is module
    assert order == [("early", module)]  # done by the time get() returned it
    kernel.when_ready(lambda m: order.append(("late", m)))  # after: called at once
    assert order[-1] == ("late", module)


def test_failing_listener_is_reported_not_raised(fresh_kernel):
    gate, module = fresh_kernel
    before = health.counters().get("stats_errors", 0)
    kernel.when_ready(lambda m: 1 / 0)
    gate.set()
    assert kernel.get(wait=True, timeout=10) is module
    assert health.counters().get("stats_errors", 0) == before + 1


def test_no_listener_call_when_the_build_fails(monkeypatch, fresh_kernel):
    gate, _ = fresh_kernel
    monkeypatch.setattr(kernel, "_build", lambda: None)
    called = []
    kernel.when_ready(called.append)
    gate.set()
    assert kernel.get(wait=True, timeout=10) is None
    assert called == []


def test_hooks_switch_to_the_extension_when_built(fresh_kernel, monkeypatch):
    if native.switch_type() is None:
        pytest.skip("C hot path off")
    gate, module = fresh_kernel
    made = {}

    def make_span_hooks(config):
        made.update(config)
        return (lambda *a: ("native before", a)), (lambda *a: ("native after", a))

    module.make_span_hooks = make_span_hooks
    rec = StatsRecorder(use_kernel=True)
    before, after = hooks.make_hooks(rec)
    assert before.target.__name__ == "before" and after.target.__name__ == "after"
    kernel.get()
    gate.set()
    kernel.get(wait=True, timeout=10)
    assert before("r", "p", (), {})[0] == "native before"
    assert after("r", None, None, None)[0] == "native after"
    # the C++ hooks hand back to these Python hooks, over this recorder's rings
    assert made["rings"] is rec._rings and made["before"].__name__ == "before"
    assert made["max_rows"] == rec.rows and made["max_bytes"] == rec.max_bytes


def test_hooks_stay_python_when_the_extension_refuses(fresh_kernel):
    if native.switch_type() is None:
        pytest.skip("C hot path off")
    gate, module = fresh_kernel

    def make_span_hooks(config):
        raise RuntimeError("no")

    module.make_span_hooks = make_span_hooks
    errors = health.counters().get("stats_errors", 0)
    before, _ = hooks.make_hooks(StatsRecorder(use_kernel=True))
    kernel.get()
    gate.set()
    kernel.get(wait=True, timeout=10)
    assert before.target.__name__ == "before"
    assert health.counters().get("stats_errors", 0) == errors + 1


def test_python_only_without_the_switch(monkeypatch):
    monkeypatch.setattr(hooks, "use_native", False)
    before, after = hooks.make_hooks(StatsRecorder(use_kernel=True))
    assert before.__name__ == "before" and after.__name__ == "after"


def test_python_hooks_under_the_python_wrapper(monkeypatch):
    """Without the C entries (the pure-Python wrapper) the GPU-timing hook is a plain
    before/after pair: the C++ hooks' timing hand-over relies on the C order."""
    monkeypatch.setattr(native, "entry_type", lambda var: None)
    before, after = hooks.make_hooks(StatsRecorder(use_kernel=True))
    assert before.__name__ == "before" and after.__name__ == "after"
