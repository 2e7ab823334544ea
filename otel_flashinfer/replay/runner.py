"""Re-run a bundle's calls in recorded order and compare their outputs.

Objects are rebuilt through their recorded ``__init__`` and ``plan`` (matched by
instance id) before their ``run``.  A call that used a paged KV cache gets the
compact cache and its object is re-planned with the page indices remapped to it.
Only modules matching ``flashinfer`` / ``flashinfer.*`` or an allow pattern are
imported, and the check happens before the import.  Within ``flashinfer.*`` only its
API entry points (``@flashinfer_api``, as ``discovery`` reads them from the source) are
called: the package also holds functions that delete caches or run what a dump names.

Crashed calls (status ``crashed``, error type ``ProcessCrash``: a CRASH_SAFE
manifest completed by journal recovery) have no outputs to compare; replay
checks that the crash comes back.  The call is run, then (on CUDA) the device is
synchronized so an asynchronous fault surfaces; an exception is reported as
``PASS ... reproduced the crash: <type>: <message>``, a normal return as FAIL
(``not reproduced``).  A crash that kills the process (a segfault) ends the
replay too: run such bundles in a process of their own.  A call that was merely
in flight at SIGTERM or exit (``crashed`` without ``ProcessCrash``) passes if it
runs, as before.  A CUDA fault leaves the CUDA context unusable, so calls after
a reproduced CUDA crash fail: it is the last call of its process anyway.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from ..show import printable
from .bundle import EnumRef, PagedKV, RecordedCall, Unrepresentable, load_bundle

DEFAULT_ALLOW = ("flashinfer", "flashinfer.*")
INDEX_ARGS = ("indices", "paged_kv_indices")
PROCESS_CRASH = "ProcessCrash"


def remap_page_indices(idx: torch.Tensor, page_ids: list[int], num_pages: int) -> torch.Tensor:
    """Page indices of the original cache -> indices into the compact cache
    (``cache[i]`` = original page ``page_ids[i]``).  An index past the original cache
    stays past the compact one by the same amount, so a call that crashed on an
    out-of-range page still reads out of range; other unknown pages become -1."""
    src = idx.long().cpu()
    ids = torch.tensor(sorted(page_ids), dtype=torch.long)
    pos = torch.searchsorted(ids, src).clamp(max=max(len(ids) - 1, 0))
    found = ids[pos] == src if len(ids) else torch.zeros_like(src, dtype=torch.bool)
    past = src >= num_pages
    out = torch.where(found, pos, torch.where(past, src - num_pages + len(ids),
                                              torch.full_like(src, -1)))
    return out.to(idx.dtype).to(idx.device)


class ReplayRefused(ValueError):
    """A call the runner will not execute (names the manifest and the reason)."""


@dataclass
class CallResult:
    """Outcome of one replayed call."""

    call: RecordedCall
    passed: bool
    detail: str


@dataclass
class Report:
    """All outcomes of a replay."""

    results: list[CallResult] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def module_allowed(module: str, allow: tuple[str, ...]) -> bool:
    """Whether ``module`` may be imported (default ``flashinfer.*`` plus patterns)."""
    return any(fnmatch.fnmatchcase(module, p) for p in (*DEFAULT_ALLOW, *allow))


@functools.lru_cache(maxsize=1)
def _api_points() -> frozenset[tuple[str, str]]:
    """(module, qualname) of every FlashInfer API entry point installed here."""
    from ..discovery import discover

    return frozenset((e.module, e.qualname) for e in discover())


def check_api(obj: Any, where: str, allow: tuple[str, ...], construct: bool = False) -> None:
    """Refuse to call ``obj`` unless it is a FlashInfer API entry point (for
    ``construct``: a class with one), or its module matches an ``--allow-module``
    pattern the user gave.  ``flashinfer.*`` is allowed by default for its entry points
    only: it also holds functions such as ``jit.core.clear_cache_dir`` or
    ``api_logging.replay_from_dump`` (which imports and calls whatever a dump names)."""
    func = getattr(obj, "__func__", obj)
    module, qual = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qual, str):
        raise ReplayRefused(f"{where}: {obj!r} does not say where it is defined; not called")
    if any(fnmatch.fnmatchcase(module, p) for p in allow):
        return
    points = _api_points()
    if construct:
        ok = any(m == module and q.startswith(qual + ".") for m, q in points)
    else:
        ok = (module, qual) in points
    if not ok:
        raise ReplayRefused(f"{where}: {module}.{qual} is not a FlashInfer API entry point "
                            "(@flashinfer_api); replay calls only those, and what the "
                            "--allow-module patterns name; not called")


#: Private names a recorded qualname may still end in: what a recorded call is.
_DUNDERS = frozenset({"__init__", "__call__"})


def check_qualname(qualname: str, where: str) -> list[str]:
    """``qualname``'s parts, refused unless each is a public name (or a constructor or
    call): a manifest must not walk from an allowed module into what it imported
    (``flashinfer._os.system``) or into an object's internals."""
    parts = qualname.split(".")
    if "<locals>" in parts:
        raise ReplayRefused(f"{where}: {qualname!r} is a local function, cannot be resolved")
    for part in parts:
        if not part.isidentifier() or (part.startswith("_") and part not in _DUNDERS):
            raise ReplayRefused(f"{where}: {qualname!r} names {part!r}, which is private or "
                                "not a name; replay calls public API only")
    return parts


def resolve(module: str, qualname: str, allow: tuple[str, ...], where: str) -> Any:
    """Import ``module`` (after the allow check) and walk ``qualname``: every step must
    be defined in an allowed module (no step may be a module, or an object that an
    allowed module merely imported from elsewhere)."""
    if module == "__main__":
        # The recorded program's own script: importing ``__main__`` here gives replay's
        # own, and importing the script would run it whole.
        raise ReplayRefused(f"{where}: {qualname!r} was defined in the script the recorded "
                            "program ran (__main__), which replay cannot import; define "
                            "it in a module the program imports (python -m runs a module "
                            "as __main__ too, so that does not help) and allow that module "
                            "with --allow-module")
    if not module_allowed(module, allow):
        raise ReplayRefused(f"{where}: module {module!r} is outside flashinfer.* and the "
                            f"--allow-module patterns; not imported")
    parts = check_qualname(qualname, where)
    obj: Any = importlib.import_module(module)
    for part in parts:
        obj = getattr(obj, part)
        owner = getattr(obj, "__module__", None)
        if inspect.ismodule(obj) or not isinstance(owner, str) or not module_allowed(
                owner, allow):
            what = f"module {obj.__name__!r}" if inspect.ismodule(obj) else (
                f"an object of {owner!r}")
            raise ReplayRefused(f"{where}: {module}.{qualname} leads to {what}, outside "
                                "flashinfer.* and the --allow-module patterns; not called")
    return obj


def _materialize(value: Any, allow: tuple[str, ...], where: str) -> Any:
    if isinstance(value, Unrepresentable):
        raise ReplayRefused(f"{where}: an argument of type {value.type} was not recorded")
    if isinstance(value, EnumRef):
        # A member of an enum, by name: never an attribute of anything else (a recorded
        # "enum" naming a function would hand the call that function).
        module, sep, qual = value.cls.partition(":")
        cls = resolve(module, qual, allow, where) if sep else None
        if not (inspect.isclass(cls) and issubclass(cls, enum.Enum)):
            raise ReplayRefused(f"{where}: {value.cls!r} is not an enum class")
        member = cls.__members__.get(value.name)
        if member is None:
            raise ReplayRefused(f"{where}: {value.cls} has no member {value.name!r}")
        return member
    if isinstance(value, PagedKV):
        return value.cache
    if isinstance(value, tuple):
        return tuple(_materialize(v, allow, where) for v in value)
    if isinstance(value, list):
        return [_materialize(v, allow, where) for v in value]
    if isinstance(value, dict):
        return {k: _materialize(v, allow, where) for k, v in value.items()}
    return value


def _paged_ids(value: Any) -> PagedKV | None:
    """The (first) paged KV cache in an argument value."""
    if isinstance(value, PagedKV):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            ids = _paged_ids(v)
            if ids is not None:
                return ids
    return None


def _is_process_crash(call: RecordedCall) -> bool:
    return call.status == "crashed" and bool(call.error) and call.error.get(
        "type") == PROCESS_CRASH


def _surface_async_errors(pos: list, kw: dict) -> None:
    """Synchronize the devices a call used, so an asynchronous CUDA fault raises here."""
    tensors = [v for v in (*pos, *kw.values()) if isinstance(v, torch.Tensor)]
    for device in {t.device for t in tensors if t.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def _call_args(call: RecordedCall, allow: tuple[str, ...]) -> tuple[list, dict]:
    has_var = any(a.kind == "var_positional" for a in call.args)
    pos: list = []
    kw: dict = {}
    for a in call.args:
        v = _materialize(a.value, allow, call.path)
        if a.kind == "positional_only" or (a.kind == "positional_or_keyword" and has_var):
            pos.append(v)
        elif a.kind == "var_positional":
            if not isinstance(v, (list, tuple)):
                raise ReplayRefused(f"{call.path}: *{a.name} is a {type(v).__name__}, "
                                    "not a sequence")
            pos.extend(v)
        elif a.kind == "var_keyword":
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                raise ReplayRefused(f"{call.path}: **{a.name} is not a dict of names")
            kw.update(v)
        else:
            kw[a.name] = v
    return pos, kw


def compare(got: Any, want: Any, rtol: float | None, atol: float | None, path: str = "result"
            ) -> str | None:
    """None if equal (dtype-aware), else what differs."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: expected a tensor, got {type(got).__name__}"
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            return (f"{path}: got {got.dtype}{list(got.shape)}, "
                    f"recorded {want.dtype}{list(want.shape)}")
        got = got.detach().to("cpu")
        want = want.to("cpu")
        floating = want.is_floating_point() or want.is_complex()
        if floating and (rtol is not None or atol is not None):
            if torch.allclose(got, want, rtol=rtol or 0.0, atol=atol or 0.0, equal_nan=True):
                return None
            diff = (got.double() - want.double()).abs().nan_to_num(0).max().item()
            return f"{path}: not within rtol={rtol} atol={atol} (max abs diff {diff:g})"
        if want.numel() == 0:
            return None
        a = got.contiguous().reshape(-1).view(torch.uint8)
        b = want.contiguous().reshape(-1).view(torch.uint8)
        if torch.equal(a, b):
            return None
        if floating:
            diff = (got.double() - want.double()).abs().nan_to_num(0).max().item()
            return f"{path}: not bit-exact (max abs diff {diff:g})"
        return f"{path}: values differ ({int((got != want).sum())} elements)"
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{path}: expected a sequence of {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            why = compare(g, w, rtol, atol, f"{path}[{i}]")
            if why:
                return why
        return None
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{path}: dict keys differ"
        for k in want:
            why = compare(got[k], want[k], rtol, atol, f"{path}[{k!r}]")
            if why:
                return why
        return None
    if isinstance(want, float) and isinstance(got, float) and want != want and got != got:
        return None
    if isinstance(got, torch.Tensor):  # a recorded value that is not one: no elementwise !=
        return f"{path}: got a tensor, recorded {type(want).__name__} {want!r}"
    if got != want:
        return f"{path}: got {got!r}, recorded {want!r}"
    return None


class _Runner:
    def __init__(self, allow: tuple[str, ...], rtol: float | None, atol: float | None) -> None:
        self.allow = allow
        self.rtol = rtol
        self.atol = atol
        self.instances: dict[str, Any] = {}
        self.plans: dict[str, tuple[Any, list, dict]] = {}

    def target(self, call: RecordedCall) -> tuple[Any, bool]:
        """(callable, is_init): an API entry point (``check_api``)."""
        parts = call.qualname.split(".")
        if parts[-1] == "__init__" and len(parts) >= 2:
            cls = resolve(call.module, ".".join(parts[:-1]), self.allow, call.path)
            check_api(cls, call.path, self.allow, construct=True)
            return cls, True
        if call.instance_id is not None and len(parts) >= 2:
            if not module_allowed(call.module, self.allow):
                resolve(call.module, call.qualname, self.allow, call.path)  # raises
            check_qualname(call.qualname, call.path)
            obj = self.instances.get(call.instance_id)
            if obj is None:
                raise ReplayRefused(f"{call.path}: no recorded __init__ for instance "
                                    f"{call.instance_id}")
            method = getattr(obj, parts[-1])
            check_api(method, call.path, self.allow)
            return method, False
        fn = resolve(call.module, call.qualname, self.allow, call.path)
        check_api(fn, call.path, self.allow)
        return fn, False

    def replan(self, call: RecordedCall, paged: PagedKV) -> None:
        plan = self.plans.get(call.instance_id or "")
        if plan is None:
            return
        fn, pos, kw = plan
        for name in INDEX_ARGS:
            if name in kw and isinstance(kw[name], torch.Tensor):
                kw = {**kw, name: remap_page_indices(kw[name], paged.page_ids, paged.shape[0])}
        fn(*pos, **kw)

    def run(self, call: RecordedCall) -> CallResult:
        try:
            fn, is_init = self.target(call)
            pos, kw = _call_args(call, self.allow)
        except (ReplayRefused, ImportError, AttributeError) as exc:
            return CallResult(call, False, f"refused: {exc}")
        if call.qualname.endswith(".plan") and call.instance_id is not None:
            self.plans[call.instance_id] = (fn, pos, kw)
        ids = next((i for i in (_paged_ids(a.value) for a in call.args) if i is not None), None)
        crashed = _is_process_crash(call)
        try:
            if ids is not None:
                self.replan(call, ids)
            got = fn(*pos, **kw)
            if crashed:
                _surface_async_errors(pos, kw)
        except Exception as exc:  # noqa: BLE001 - a replayed call may raise anything
            if crashed:
                return CallResult(call, True, f"reproduced the crash: {type(exc).__qualname__}"
                                              f": {str(exc)[:300]}")
            if call.status == "error" and call.error and call.error.get("type") == type(
                    exc).__qualname__:
                return CallResult(call, True, f"raised {type(exc).__qualname__} as recorded")
            return CallResult(call, False, f"raised {type(exc).__qualname__}: {exc}")
        if is_init:
            if call.instance_id is not None:
                self.instances[call.instance_id] = got
            return CallResult(call, True, "object rebuilt")
        if crashed:
            return CallResult(call, False, "recorded a process crash, replay returned "
                                           "normally (not reproduced)")
        if call.status == "error":
            return CallResult(call, False, f"recorded {call.error and call.error.get('type')}, "
                                           "replay returned normally")
        if call.status != "ok":
            return CallResult(call, True, f"ran (recorded status {call.status}, no outputs)")
        if call.skipped:
            return CallResult(call, True, f"ran (outputs not recorded: {call.skipped})")
        try:
            why = compare(got, call.result, self.rtol, self.atol)
        except Exception as exc:  # noqa: BLE001 - a recorded value of a shape we never wrote
            why = f"could not compare the outputs: {type(exc).__name__}: {exc}"
        if why:
            return CallResult(call, False, why)
        exact = self.rtol is None and self.atol is None
        return CallResult(call, True, "bit-exact" if exact else "within tolerance")


def replay(
    path: str,
    device: str | None = None,
    allow_modules: tuple[str, ...] | list[str] = (),
    rtol: float | None = None,
    atol: float | None = None,
    out: TextIO | None = None,
    allow_pickle: bool = False,
) -> Report:
    """Re-run every call of a bundle; prints one line per call and ``N passed, N failed``."""
    out = out or sys.stdout
    runner = _Runner(tuple(allow_modules), rtol, atol)
    report = Report()
    for call in load_bundle(path, device=device, allow_pickle=allow_pickle):
        res = runner.run(call)
        report.results.append(res)
        mark = "PASS" if res.passed else "FAIL"
        # A bundle's names and messages are untrusted: no control character goes raw.
        out.write(printable(f"{mark} {call.seq:>5} {call.api} span={call.span_id}: "
                            f"{res.detail}") + "\n")
    out.write(f"{report.passed} passed, {report.failed} failed\n")
    return report
