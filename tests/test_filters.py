"""OTEL_FLASHINFER_INCLUDE/EXCLUDE on @traced functions, and BLOB_INCLUDE/_BLOB_EXCLUDE
on level-10 payloads: every combination, recorded for real into a store."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import sys
import textwrap
import uuid

import pytest
import torch

import otel_flashinfer
from otel_flashinfer.config import ConfigError, load_settings
from otel_flashinfer.filters import BlobFilter, blob_selected, is_chain_method, selected

TARGET = '''
import torch
import otel_flashinfer

@otel_flashinfer.traced
def scale(x):
    return x * 2

@otel_flashinfer.traced
def norm(x):
    return x / 3

class Dec:
    @otel_flashinfer.traced
    def __init__(self, n):
        self.n = n

    @otel_flashinfer.traced
    def plan(self, w):
        self.w = w.clone()

    @otel_flashinfer.traced
    def run(self, x):
        return x * self.w
'''
APIS = ("scale", "norm", "Dec.__init__", "Dec.plan", "Dec.run")

INCLUDES = ("", "Dec.*", "scale,Dec.run")
EXCLUDES = ("", "Dec.plan", "norm")
BLOB_INCLUDES = ("", "*.run", "scale")
BLOB_EXCLUDES = ("", "Dec.__init__", "norm,Dec.plan")


def _m(name: str, patterns: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns.split(",") if p)


def expected(include: str, exclude: str, blob_include: str, blob_exclude: str
             ) -> dict[str, str]:
    """The documented rules, written out: api -> 'stored' | 'filtered' (traced ones)."""
    out = {}
    for api in APIS:
        if (include and not _m(api, include)) or _m(api, exclude):
            continue  # not traced at all
        if _m(api, blob_exclude):
            out[api] = "filtered"
        elif not blob_include or _m(api, blob_include):
            out[api] = "stored"
        elif api in ("Dec.__init__", "Dec.plan") and _m("Dec.run", blob_include) \
                and not _m("Dec.run", blob_exclude):
            out[api] = "stored"  # the run is kept: what it needs to replay is kept too
        else:
            out[api] = "filtered"
    return out


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("filters")
    name = f"fi_filters_{uuid.uuid4().hex[:8]}"
    (path / f"{name}.py").write_text(textwrap.dedent(TARGET))
    sys.path.insert(0, str(path))
    yield __import__(name)
    sys.path.remove(str(path))


def test_pure_rules():
    assert selected("Dec.run", (), ())
    assert not selected("Dec.run", ("scale",), ())
    assert not selected("Dec.run", ("Dec.*",), ("*.run",))
    assert is_chain_method("Dec.__init__") and is_chain_method("Dec.plan_lse")
    assert not is_chain_method("plan") and not is_chain_method("Dec.run")
    assert blob_selected("Dec.plan", ("*Wrapper.run", "Dec.run"), ())
    assert blob_selected("Dec.__init__", ("Dec.forward",), ())
    assert not blob_selected("Dec.__init__", ("Dec.run",), ("Dec.__init__",))  # explicit
    assert not blob_selected("Dec.plan", ("Dec.run",), ("Dec.run",))  # run not kept
    assert not blob_selected("Other.plan", ("Dec.run",), ())
    f = BlobFilter(("Dec.run",), ())
    assert [f(a) for a in APIS] == [False, False, True, True, True]
    assert BlobFilter((), ()).everything


def test_settings_parse_blob_patterns():
    s = load_settings({"OTEL_FLASHINFER_BLOB_INCLUDE": " *Wrapper.run , scale ",
                       "OTEL_FLASHINFER_BLOB_EXCLUDE": "norm"})
    assert s.blob_include == ("*Wrapper.run", "scale") and s.blob_exclude == ("norm",)
    assert load_settings(blob_include=["a", "b"]).blob_include == ("a", "b")
    with pytest.raises(ConfigError, match="OTEL_FLASHINFER_AUTOSTART='maybe'"):
        from otel_flashinfer.config import autostart_enabled

        autostart_enabled({"OTEL_FLASHINFER_AUTOSTART": "maybe"})


COMBOS = list(itertools.product(INCLUDES, EXCLUDES, BLOB_INCLUDES, BLOB_EXCLUDES))


@pytest.mark.parametrize(("include", "exclude", "blob_include", "blob_exclude"), COMBOS,
                         ids=["|".join(c) or "none" for c in COMBOS])
def test_every_combination(spans, target, tmp_path, include, exclude, blob_include,
                           blob_exclude):
    store = tmp_path / "store"
    otel_flashinfer.instrument(level=10, blob_url=str(store), journal_dir="",
                               include=include, exclude=exclude, blob_include=blob_include,
                               blob_exclude=blob_exclude)
    x = torch.arange(6.0)
    assert torch.equal(target.scale(x), x * 2)
    assert torch.equal(target.norm(x), x / 3)
    obj = target.Dec(3)
    obj.plan(torch.full((6,), 0.5))
    assert torch.equal(obj.run(x), x * 0.5)
    finished = spans.finished()
    want = expected(include, exclude, blob_include, blob_exclude)
    got = {}
    for span in finished:
        attrs = span.attributes
        if attrs.get("flashinfer.blob.skipped") == "filtered":
            got[span.name] = "filtered"
        elif attrs.get("flashinfer.blob.manifest"):
            got[span.name] = "stored"
        else:
            got[span.name] = f"other: {dict(attrs)}"
    assert got == want
    # Filtered calls keep their argument attributes (level 3 and up): only payloads go.
    for span in finished:
        if span.name == "scale":
            assert span.attributes["flashinfer.arg.x.shape"] == (6,)
    stored = set()
    for path in (store / "traces").rglob("*.json") if (store / "traces").exists() else ():
        stored.add(json.loads(path.read_text())["api"])
    assert stored == {a for a, v in want.items() if v == "stored"}
    otel_flashinfer.uninstrument()


def test_blob_filter_in_a_subprocess_from_the_environment(target, tmp_path):
    """The FlashInfer user's line: trace everything, dump only the wrapper runs."""
    import subprocess

    program = tmp_path / "prog.py"
    program.write_text(textwrap.dedent(f'''
        import json, torch, otel_flashinfer
        from {target.__name__} import Dec, scale
        otel_flashinfer.instrument()
        scale(torch.ones(2)); d = Dec(1); d.plan(torch.ones(2)); d.run(torch.ones(2))
        print(json.dumps(otel_flashinfer.flush(30)))
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_FLASHINFER_LEVEL="10", OTEL_FLASHINFER_BLOB_INCLUDE="*.run",
               OTEL_FLASHINFER_BLOB_URL=str(tmp_path / "store"),
               OTEL_FLASHINFER_JOURNAL_DIR="", OTEL_TRACES_EXPORTER="none",
               PYTHONPATH=os.pathsep.join([os.path.dirname(target.__file__),
                                           os.path.dirname(os.path.dirname(otel_flashinfer.__file__))]))
    r = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    apis = sorted(json.loads(p.read_text())["api"]
                  for p in (tmp_path / "store" / "traces").rglob("*.json"))
    assert apis == ["Dec.__init__", "Dec.plan", "Dec.run"]


def test_include_exclude_apply_to_traced(spans, target):
    otel_flashinfer.instrument(level=1, journal_dir="", exclude="norm")
    target.scale(torch.ones(1))
    target.norm(torch.ones(1))
    assert sorted(s.name for s in spans.finished()) == ["scale"]
    otel_flashinfer.instrument(level=1, journal_dir="", include="n*")
    target.scale(torch.ones(1))
    target.norm(torch.ones(1))
    assert sorted(s.name for s in spans.finished()) == ["norm", "scale"]
