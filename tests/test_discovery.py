"""Discovery of @flashinfer_api entry points from source, and against the real package."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from otel_flashinfer import discovery

SOURCE = textwrap.dedent(
    """
    from .api_logging import flashinfer_api, flashinfer_experimental_api
    from . import api_logging

    @flashinfer_api
    def bare(x): ...

    @flashinfer_api(trace=some_template)
    def called(x): ...

    @api_logging.flashinfer_api
    def attribute(x): ...

    @other
    @flashinfer_api
    def stacked(x): ...

    def plain(x): ...

    if HAS_THING:
        @flashinfer_api
        def conditional(x): ...

    @flashinfer_experimental_api(feature="x")
    def experimental(x): ...

    def outer():
        @flashinfer_api
        def inner(x): ...
        return inner

    class SomeWrapper:
        @flashinfer_api
        def __init__(self, buf): ...

        @flashinfer_api
        def run(self, q): ...

        @staticmethod
        @flashinfer_api
        def helper(x): ...

        def untouched(self): ...

        class Inner:
            @flashinfer_api
            def plan(self): ...
    """
)


def test_scan_source_finds_every_decorator_form() -> None:
    found = {e.qualname: e for e in discovery.scan_source(SOURCE, "flashinfer.mod")}
    assert set(found) == {
        "bare", "called", "attribute", "stacked", "conditional", "experimental",
        "SomeWrapper.__init__", "SomeWrapper.run", "SomeWrapper.helper",
        "SomeWrapper.Inner.plan",
    }
    assert found["bare"] == discovery.EntryPoint(
        "flashinfer.mod", "bare", "bare", False, "flashinfer_api", 6)
    assert found["SomeWrapper.run"].api_name == "SomeWrapper.run"
    assert found["SomeWrapper.run"].is_method
    # The innermost class names the span, as FlashInfer's log does.
    assert found["SomeWrapper.Inner.plan"].api_name == "Inner.plan"
    assert found["experimental"].experimental
    assert not found["called"].experimental


def test_module_names_follow_package_layout(tmp_path) -> None:
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("@flashinfer_api\ndef top(): ...\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("class W:\n    @flashinfer_api\n    def run(self): ...\n")
    (pkg / "sub" / "broken.py").write_text("flashinfer_api def oops(:\n")
    (pkg / "api_logging.py").write_text("def flashinfer_api(f): return f\n@flashinfer_api\n"
                                        "def not_counted(): ...\n")
    entries = discovery.scan_package(pkg, "fakepkg")
    assert [(e.module, e.qualname) for e in entries] == [
        ("fakepkg", "top"), ("fakepkg.sub.leaf", "W.run")]


def test_disk_cache_round_trip(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("@flashinfer_api\ndef f(): ...\n")
    first = discovery.discover("p", root=pkg, version="1.0")
    cache_files = list((tmp_path / "cache" / "otel_flashinfer").glob("discovery-*.json"))
    assert len(cache_files) == 1
    # A released version is immutable: the cache answers even after the source changes.
    (pkg / "__init__.py").write_text("@flashinfer_api\ndef g(): ...\n")
    discovery._memory.clear()
    assert discovery.discover("p", root=pkg, version="1.0") == first
    # A local build is re-read every time.
    assert [e.qualname for e in discovery.discover("p", root=pkg, version="1.0+local")] == ["g"]


def test_a_source_checkout_is_read_again_under_a_release_version(tmp_path,
                                                                   monkeypatch) -> None:
    """A FlashInfer checkout found first on sys.path (or an editable install) carries a
    release-like version but is edited in place: it is not cached on disk, so a new
    ``@flashinfer_api`` function is seen by the next process.  The installed copy is."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkout = tmp_path / "src" / "flashinfer"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text("@flashinfer_api\ndef old_api(): ...\n")
    version = discovery.package_version() or "0.7.2"
    assert [e.qualname for e in discovery.discover(root=checkout, version=version)] == [
        "old_api"]
    (checkout / "__init__.py").write_text("@flashinfer_api\ndef old_api(): ...\n"
                                          "@flashinfer_api\ndef new_api(): ...\n")
    discovery._memory.clear()  # noqa: SLF001 - a new process
    assert [e.qualname for e in discovery.discover(root=checkout, version=version)] == [
        "old_api", "new_api"]
    assert not list((tmp_path / "cache").rglob("discovery-*.json"))
    installed = discovery.package_root()
    if installed is not None and discovery.package_version():
        assert discovery._installed_release(installed)  # noqa: SLF001 - cached as before


def test_missing_package_discovers_nothing() -> None:
    assert discovery.package_root("no_such_package_xyz") is None
    assert discovery.discover("no_such_package_xyz") == ()


def test_real_flashinfer_counts() -> None:
    """flashinfer-python 0.7.2.post1: 408 @flashinfer_api (316 functions + 92 methods),
    plus 89 @flashinfer_experimental_api (72 + 17), which FlashInfer also logs."""
    pytest.importorskip("flashinfer")
    if discovery.package_version() != "0.7.2.post1":
        pytest.skip(f"counts are for 0.7.2.post1, found {discovery.package_version()}")
    entries = discovery.discover()
    counts = Counter((e.decorator, e.is_method) for e in entries)
    assert counts == {
        ("flashinfer_api", False): 316,
        ("flashinfer_api", True): 92,
        ("flashinfer_experimental_api", False): 72,
        ("flashinfer_experimental_api", True): 17,
    }
    by_name = {e.api_name: e for e in entries}
    assert by_name["BatchDecodeWithPagedKVCacheWrapper.run"].module == "flashinfer.decode"
    assert by_name["rmsnorm"].module == "flashinfer.norm"
    assert by_name["single_decode_with_kv_cache"].is_method is False
    assert len({(e.module, e.qualname) for e in entries}) == len(entries)
