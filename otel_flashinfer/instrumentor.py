"""``FlashInferInstrumentor``: puts a traced wrapper on every FlashInfer API entry point.

Which functions: ``discovery`` reads them from FlashInfer's source.  Where: each
original is wrapped once, and that one wrapper is installed wherever the original is
reachable: its defining module, the class for methods, every ``flashinfer*`` module
that re-exports it and any other module that did ``from flashinfer import x`` before
we ran.  Modules not imported yet are wrapped the moment they are imported (a
post-import hook), so a process that never uses FlashInfer never imports it because
of us.  Every replacement is recorded and ``uninstrument`` puts the original back,
also in modules that picked the wrapper up while we were active.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from . import discovery
from .filters import selected

_LOG = logging.getLogger(__name__)

_instruments = ("flashinfer-python >= 0.6",)

WrapperFactory = Callable[..., Callable[..., Any]]


def _is_flashinfer_module(name: str) -> bool:
    return name == "flashinfer" or name.startswith("flashinfer.")


#: A ``_Patch`` original for an attribute the container did not have (a subclass that
#: inherited the method): restoring deletes it.
_ABSENT = object()


class _Patch:
    """One attribute we replaced: put ``original`` back if ``installed`` is still there."""

    __slots__ = ("container", "installed", "name", "original")

    def __init__(self, container: Any, name: str, original: Any, installed: Any) -> None:
        self.container = container
        self.name = name
        self.original = original
        self.installed = installed


class _State:
    """Everything one ``_instrument`` did, so ``_uninstrument`` can undo exactly that."""

    def __init__(self, settings: Any, factory: WrapperFactory, runtime: Any,
                 entries: tuple[discovery.EntryPoint, ...]) -> None:
        self.settings = settings
        self.factory = factory
        self.runtime = runtime
        self.by_module: dict[str, list[discovery.EntryPoint]] = {}
        #: Method entry points left out by the filters: a subclass's name may be in.
        self.unselected: dict[str, list[discovery.EntryPoint]] = {}
        for entry in entries:
            if selected(entry.api_name, settings.include, settings.exclude):
                self.by_module.setdefault(entry.module, []).append(entry)
            elif entry.is_method:
                self.unselected.setdefault(entry.module, []).append(entry)
        #: id(class) -> (class, {method: (raw value, its aliases as they were)}) of the
        #: entry points' own classes, for the subclasses that inherit them
        #: (``_inherited``), also ones imported later.
        self.classes: dict[int, tuple[type, dict[str, tuple[Any, list]]]] = {}
        #: (id(original), api name) -> wrapper: a subclass's name gets its own.
        self.named: dict[tuple[int, str], Any] = {}
        self.patches: list[_Patch] = []
        self.patched: set[tuple[int, str]] = set()
        # id(original) -> (original, wrapper); id(wrapper) -> (wrapper, original)
        self.originals: dict[int, tuple[Any, Any]] = {}
        self.wrappers: dict[int, tuple[Any, Any]] = {}
        self.done_modules: set[str] = set()
        self.failed_modules: set[str] = set()
        self.active = True
        self.lock = threading.RLock()

    def module_names(self) -> list[str]:
        """Modules to wrap on import: those with entry points the filters select, and
        those whose unselected methods a subclass's name may select."""
        return list(dict.fromkeys([*self.by_module, *self.unselected]))

    # -- building and installing ------------------------------------------------------

    def wrapper_for(self, original: Any, api_name: str) -> Any:
        known = self.originals.get(id(original))
        if known is not None and known[0] is original:
            return known[1]
        wrapper = self._make(original, api_name)
        self.originals[id(original)] = (original, wrapper)
        return wrapper

    def _make(self, func: Any, api_name: str) -> Any:
        """A new wrapper of ``func`` named ``api_name``, known as a wrapper."""
        if self.runtime is not None:
            wrapper = self.factory(func, api_name, settings=self.settings, runtime=self.runtime)
        else:
            wrapper = self.factory(func, api_name, settings=self.settings)
        self.wrappers[id(wrapper)] = (wrapper, func)
        return wrapper

    def install(self, container: Any, name: str, original: Any, installed: Any) -> None:
        key = (id(container), name)
        if key in self.patched:
            return
        setattr(container, name, installed)
        self.patched.add(key)
        self.patches.append(_Patch(container, name, original, installed))

    def wrap_module(self, module: ModuleType) -> None:
        """Wrap the entry points defined in ``module`` (just imported, or already there)."""
        name = module.__name__
        with self.lock:
            if not self.active or name in self.done_modules:
                return
            self.done_modules.add(name)
            for entry in self.by_module.get(name, ()):
                try:
                    if entry.is_method:
                        self._wrap_method(module, entry)
                    else:
                        self._wrap_function(module, entry)
                except Exception as exc:  # noqa: BLE001 - one odd target must not stop the rest
                    _LOG.debug("otel_flashinfer: cannot wrap %s.%s: %s",
                               entry.module, entry.qualname, exc)
            for entry in self.unselected.get(name, ()):
                try:
                    self._wrap_method(module, entry, selected_here=False)
                except Exception as exc:  # noqa: BLE001
                    _LOG.debug("otel_flashinfer: cannot look at %s.%s: %s",
                               entry.module, entry.qualname, exc)
            try:
                self._subclasses_in(module)
            except Exception as exc:  # noqa: BLE001
                _LOG.debug("otel_flashinfer: cannot look at %s's classes: %s", name, exc)

    def _wrap_function(self, module: ModuleType, entry: discovery.EntryPoint) -> None:
        original = vars(module).get(entry.qualname)
        if original is None or not callable(original) or id(original) in self.wrappers:
            return
        wrapper = self.wrapper_for(original, entry.api_name)
        self.install(module, entry.qualname, original, wrapper)
        self._aliases(module, entry.qualname, original, wrapper)

    def _aliases(self, container: Any, name: str, original: Any, installed: Any) -> None:
        """The other names ``container`` (a module or class) gives ``original``: the same
        object (``begin_forward = plan``, ``forward = run``) or a ``functools.partial`` /
        ``partialmethod`` of it (``run_return_lse = partialmethod(run, return_lse=True)``,
        ``single_prefill_with_kv_cache_return_lse = partial(...)``).  They held the
        unwrapped function, so their calls made no span (FlashInfer's logger sees them:
        they call the decorated function)."""
        for attr, value in _alias_values(container, name, original):
            if value is original:
                self.install(container, attr, value, installed)
                continue
            known = self.originals.get(id(value))
            if known is not None and known[0] is value:
                rebuilt = known[1]
            else:
                rebuilt = _rebuilt(value, _func(installed))
                # Known both ways, as a wrapper is: re-exports (``flashinfer``'s own
                # import of it) get it too, and ``restore`` gives each its own back.
                self.originals[id(value)] = (value, rebuilt)
                self.wrappers[id(rebuilt)] = (rebuilt, value)
            self.install(container, attr, value, rebuilt)

    def _wrap_method(self, module: ModuleType, entry: discovery.EntryPoint,
                     selected_here: bool = True) -> None:
        *class_path, method = entry.qualname.split(".")
        cls: Any = module
        for part in class_path:
            cls = vars(cls).get(part)
            if not isinstance(cls, type):
                return
        raw = vars(cls).get(method)
        if raw is None:
            return
        known = self.classes.setdefault(id(cls), (cls, {}))[1]
        if method not in known:  # its aliases as they are before any is wrapped
            known[method] = (raw, _alias_values(cls, method, raw))
        for sub in _subclasses(cls):
            self._inherited_safely(sub, method, raw)
        if not selected_here:
            return
        if isinstance(raw, (staticmethod, classmethod)):
            func = raw.__func__
            if id(func) in self.wrappers:
                return
            installed = type(raw)(self.wrapper_for(func, entry.api_name))
        elif callable(raw):
            if id(raw) in self.wrappers:
                return
            installed = self.wrapper_for(raw, entry.api_name)
        else:
            return
        self.install(cls, method, raw, installed)
        self._aliases(cls, method, raw, installed)

    def _inherited_safely(self, sub: type, method: str, raw: Any) -> None:
        """``_inherited``; a class that refuses it (a metaclass of its own) is skipped,
        never the entry point or the other classes."""
        try:
            self._inherited(sub, method, raw)
        except Exception as exc:  # noqa: BLE001
            _LOG.debug("otel_flashinfer: cannot name %s.%s: %s", sub.__qualname__, method, exc)

    def _inherited(self, sub: type, method: str, raw: Any) -> None:
        """A subclass that inherits an entry point's method: FlashInfer's logger names
        the call by the object's class (``CUDAGraphBatchDecodeWithPagedKVCacheWrapper.run``,
        ``BatchAttentionWithAttentionSinkWrapper.run``), so the subclass gets a wrapper of
        that name, and the filters judge that name.  Excluded there: the original, so
        its calls are not traced under the base class's name either."""
        if method in vars(sub):  # its own method (or one we installed already)
            return
        owner = next((b for b in sub.__mro__[1:] if method in vars(b)), None)
        entry = self._entry_method(owner, method) if owner is not None else None
        if entry is None:
            if owner is None or (id(owner), method) not in self.patched:
                return  # it inherits another class's method, not the entry point's
            # a FlashInfer subclass we named already: the entry point is further up
            entry = next(filter(None, (self._entry_method(b, method)
                                       for b in owner.__mro__[1:])), None)
            if entry is None:
                return
        aliases = entry[1]
        api = f"{sub.__name__}.{method}"
        func = _func(raw)
        if not selected(api, self.settings.include, self.settings.exclude):
            # Its calls (and its aliases') are not traced under the base class's name.
            self.install(sub, method, _ABSENT, raw)
            for attr, value in aliases:
                if attr not in vars(sub):
                    self.install(sub, attr, _ABSENT, value)
            return
        wrapper = self.named.get((id(func), api))
        if wrapper is None:
            wrapper = self.named[(id(func), api)] = self._make(func, api)
        installed = type(raw)(wrapper) if isinstance(raw, (staticmethod, classmethod)) \
            else wrapper
        self.install(sub, method, _ABSENT, installed)
        for attr, value in aliases:  # begin_forward = plan, run_return_lse = ...(run)
            if attr not in vars(sub):
                self.install(sub, attr, _ABSENT,
                             installed if value is raw else _rebuilt(value, wrapper))

    def _entry_method(self, cls: type, method: str) -> tuple[Any, list] | None:
        """(raw value, aliases) where ``cls`` is an entry point's own class for
        ``method``, else None."""
        known = self.classes.get(id(cls))
        return known[1].get(method) if known is not None and known[0] is cls else None

    def _subclasses_in(self, module: ModuleType) -> None:
        """FlashInfer's classes of a module imported after their base was wrapped."""
        for value in list(vars(module).values()):
            if not isinstance(value, type) or value.__module__ != module.__name__:
                continue
            for base in value.__mro__[1:]:
                known = self.classes.get(id(base))
                if known is not None and known[0] is base:
                    for method, (raw, _) in known[1].items():
                        self._inherited_safely(value, method, raw)

    def reexports(self, modules: Iterable[ModuleType]) -> None:
        """Install wrappers where ``modules`` hold a wrapped original under any name."""
        with self.lock:
            for module, attr, value, replacement in _holders(modules, self.originals):
                try:
                    self.install(module, attr, value, replacement)
                except (AttributeError, TypeError) as exc:
                    _LOG.debug("otel_flashinfer: cannot patch %s.%s: %s",
                               getattr(module, "__name__", module), attr, exc)

    # -- undoing ----------------------------------------------------------------------

    def restore(self) -> None:
        with self.lock:
            self.active = False
            for patch in reversed(self.patches):
                try:
                    current = vars(patch.container).get(patch.name)
                    if current is patch.installed and patch.original is _ABSENT:
                        delattr(patch.container, patch.name)  # inherited again
                    elif current is patch.installed:
                        setattr(patch.container, patch.name, patch.original)
                    else:
                        _LOG.debug("otel_flashinfer: %s.%s was replaced by someone else; "
                                   "left as it is", patch.container, patch.name)
                except Exception as exc:  # noqa: BLE001
                    _LOG.debug("otel_flashinfer: cannot restore %s: %s", patch.name, exc)
            self.patches.clear()
            self.patched.clear()
            # Modules that imported a wrapper while we were active get the original back.
            for module, attr, _, original in _holders(list(sys.modules.values()),
                                                      self.wrappers):
                try:
                    setattr(module, attr, original)
                except (AttributeError, TypeError):
                    pass


class _ImportHooks:
    """Post-import hooks (wrapt), registered once per module name for the process and
    routed to whichever state is live, because wrapt cannot unregister a hook."""

    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.state: _State | None = None

    def watch(self, names: Iterable[str]) -> None:
        import wrapt

        for name in names:
            if name not in self.registered:
                self.registered.add(name)
                wrapt.register_post_import_hook(self._on_import, name)

    def _on_import(self, module: ModuleType) -> None:
        state = self.state
        if state is not None and state.active:
            try:
                state.wrap_module(module)
            except Exception as exc:  # noqa: BLE001 - never break the user's import
                _LOG.debug("otel_flashinfer: wrapping %s failed: %s", module.__name__, exc)


_hooks = _ImportHooks()


def import_all(entries: Iterable[discovery.EntryPoint]) -> tuple[list[str], dict[str, str]]:
    """Import every defining module (tests, ``warm`` start); returns (ok, failed->why)."""
    ok: list[str] = []
    failed: dict[str, str] = {}
    for name in sorted({e.module for e in entries}):
        try:
            importlib.import_module(name)
            ok.append(name)
        except Exception as exc:  # noqa: BLE001 - e.g. modules needing triton
            failed[name] = f"{type(exc).__name__}: {exc}"
            _LOG.debug("otel_flashinfer: cannot import %s: %s", name, failed[name])
    return ok, failed


def _default_factory() -> WrapperFactory:
    from .spans import make_wrapper

    return make_wrapper


class FlashInferInstrumentor(BaseInstrumentor):
    """Traces every ``@flashinfer_api`` entry point (the ``flashinfer`` instrumentor).

    ``instrument()`` keyword arguments: ``settings`` (a ready ``Settings``) or any
    ``Settings`` field (``level=3``, ``include=[...]``) overriding the environment;
    ``import_all=True`` imports every defining module now instead of on first use.
    """

    _state: _State | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        settings = kwargs.pop("settings", None)
        factory: WrapperFactory | None = kwargs.pop("wrapper_factory", None)
        eager = bool(kwargs.pop("import_all", False))
        kwargs.pop("tracer_provider", None)  # the application's global provider is used
        if settings is None:
            from .config import load_settings

            settings = load_settings(**kwargs)
        if settings.level <= 0:
            return
        runtime = None
        if factory is None:
            from . import runtime as _runtime

            factory = _default_factory()
            runtime = _runtime.current()
            if runtime is None or runtime.settings != settings:
                runtime = _runtime.activate(settings)
        entries = discovery.discover()
        state = _State(settings, factory, runtime, entries)
        self._state = state
        _hooks.state = state
        if eager:
            import_all(e for mod in state.by_module.values() for e in mod)
        for name in state.module_names():
            module = sys.modules.get(name)
            if module is not None:
                state.wrap_module(module)
        # Already-imported modules holding originals: re-exports and early from-imports.
        state.reexports(
            m for n, m in list(sys.modules.items())
            if m is not None and not n.startswith("otel_flashinfer")
        )
        _hooks.watch(state.module_names())
        _install_exit_flush()

    def _uninstrument(self, **kwargs: Any) -> None:
        state = self._state
        self._state = None
        if _hooks.state is state:
            _hooks.state = None
        if state is None:
            return
        state.restore()
        if state.runtime is not None:
            from . import runtime as _runtime

            if _runtime.current() is state.runtime:
                _runtime.deactivate()

    # -- introspection (tests, ``otel-flashinfer`` diagnostics) ---------------------------

    def wrapped_count(self) -> int:
        """Distinct originals wrapped so far (an alias's rebuilt partial is not one)."""
        state = self._state
        if state is None:
            return 0
        return sum(1 for original, _ in state.originals.values()
                   if not isinstance(original, (functools.partial, functools.partialmethod)))

    def installed(self) -> list[tuple[Any, str, Any, Any]]:
        """(container, attribute, original, installed) for every live replacement."""
        state = self._state
        if state is None:
            return []
        return [(p.container, p.name, p.original, p.installed) for p in state.patches]


_exit_flush_installed = False


def _install_exit_flush() -> None:
    """Flush when a multiprocessing fork child ends: it leaves through ``os._exit``,
    which skips ``atexit``, and its last spans would be lost."""
    global _exit_flush_installed
    if _exit_flush_installed:
        return
    _exit_flush_installed = True
    try:
        from .runtime import install_fork_exit_flush

        install_fork_exit_flush()
    except Exception as exc:  # noqa: BLE001
        _LOG.debug("otel_flashinfer: no exit flush for fork children: %s", exc)


def _subclasses(cls: type) -> Iterator[type]:
    """Every subclass of ``cls`` that FlashInfer defines, depth first, each once.  An
    application's own subclasses keep the base class's wrapper (and name), whenever
    they are defined: one rule, whatever the import order."""
    seen: set[int] = set()
    stack = list(type.__subclasses__(cls))
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        if _is_flashinfer_module(getattr(sub, "__module__", "") or ""):
            yield sub
        stack.extend(type.__subclasses__(sub))


def _func(value: Any) -> Any:
    """The function inside a static or class method, else ``value``."""
    return value.__func__ if isinstance(value, (staticmethod, classmethod)) else value


def _alias_values(container: Any, name: str, original: Any) -> list[tuple[str, Any]]:
    """(name, value) of ``container``'s (a module's or class's) other names for
    ``original``: the same object, or a ``functools.partial`` / ``partialmethod`` of its
    function (``_aliases``)."""
    func = _func(original)
    return [(attr, value) for attr, value in list(vars(container).items())
            if attr != name and (value is original or (
                isinstance(value, (functools.partial, functools.partialmethod))
                and value.func is func))]


def _rebuilt(alias: Any, wrapper: Any) -> Any:
    """A partial / partialmethod alias made again around ``wrapper``, with the same
    arguments (and a partial's ``__doc__``, which FlashInfer sets)."""
    rebuilt = type(alias)(wrapper, *alias.args, **alias.keywords)
    if isinstance(alias, functools.partial):
        rebuilt.__dict__.update(vars(alias))
    return rebuilt


def _holders(modules: Iterable[ModuleType], table: dict[int, tuple[Any, Any]]
             ) -> Iterator[tuple[ModuleType, str, Any, Any]]:
    """(module, name, value, partner) for every module global that is one of ``table``'s
    objects (keyed by id, checked by identity): where a from-import put a function."""
    for module in modules:
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in items:
            known = table.get(id(value))
            if known is not None and known[0] is value:
                yield module, attr, value, known[1]
