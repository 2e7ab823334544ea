"""``traced`` for coroutines and generators: the span lasts as long as the work.

A plain wrapper ends its span when the function returns, which for ``async def`` is
when the coroutine is made and for a generator when the generator object is: nothing
of the work inside.  These wrappers enter before the first step and leave after the
last (``spans.CallHooks``).  A generator's span is current only while its own code
runs, one step at a time, never while the consumer's code between two items does.
Closing a generator or a coroutine early ends its span normally; an exception thrown
into it, or one it raises, ends the span with that error (but a coroutine raising
``GeneratorExit`` itself, which looks like a close).  A step that runs in another
``contextvars.Context`` than the last one (another thread, ``asyncio.wait_for``'s task)
resumes in the generator's span rather than in what that step could not undo.  Nothing here runs for
untraced calls but one lookup of the hooks.  Unlike the plain function, a wrapper
checks its arguments at the first step, not at the call (it is itself a generator or
``async def``, so that ``inspect`` sees the same shape): a missing argument raises
there, and its span says so.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from .spans import CallHooks

#: ``hooks()`` -> the live ``CallHooks``, or None when the call is not to be traced.
HooksOf = Callable[[], "CallHooks | None"]

#: Set after each step of a traced generator: its token resets only in the Context the
#: step ran in, which tells whether the next step runs in the same one.
_STEP: contextvars.ContextVar[None] = contextvars.ContextVar("otel_flashinfer_step")


def shape_of(fn: Callable[..., Any]) -> str:
    """"coroutine", "async_generator", "generator", or "call"."""
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    if inspect.isasyncgenfunction(fn):
        return "async_generator"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "call"


def shaped_wrapper(fn: Callable[..., Any], shape: str, hooks: HooksOf) -> Callable[..., Any]:
    """A wrapper of ``fn``'s own shape (``inspect`` says the same of it as of ``fn``)."""
    return _FACTORIES[shape](fn, hooks)


def _coroutine(fn: Callable[..., Any], hooks: HooksOf) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        live = hooks()
        record = live.enter(args, kwargs) if live is not None else None
        if record is None:
            return await fn(*args, **kwargs)
        try:
            # The task's context holds our span from enter to leave: every await of
            # the body runs in it, and other tasks have contexts of their own.
            result = await fn(*args, **kwargs)
        except GeneratorExit:  # closed before it finished (a task never awaited again)
            live.leave(record, None)
            raise
        except BaseException as exc:
            live.failed(record, exc)
            raise
        live.leave(record, result)
        return result

    return wrapper


def _generator(fn: Callable[..., Any], hooks: HooksOf) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        live = hooks()
        record = live.enter(args, kwargs) if live is not None else None
        if record is None:
            return (yield from fn(*args, **kwargs))
        steps = _Steps(record, live.context)
        closed = False  # by the consumer: the span ended already
        try:
            gen = fn(*args, **kwargs)
            sent: Any = None
            error: BaseException | None = None
            while True:
                token = steps.enter()
                try:
                    item = gen.send(sent) if error is None else gen.throw(error)
                except StopIteration as stop:
                    result = stop.value
                    break
                finally:
                    steps.leave(token)
                    error = None
                try:
                    sent = yield item
                except GeneratorExit:
                    token = steps.enter()
                    try:
                        gen.close()
                    finally:
                        steps.leave(token)
                    closed = True
                    live.leave(record, None)  # the consumer stopped early: no error
                    raise
                except BaseException as exc:  # noqa: BLE001 - thrown in: the generator decides
                    error, sent = exc, None
        except BaseException as exc:
            if not closed:
                live.failed(record, exc)
            raise
        live.leave(record, result)
        return result

    return wrapper


def _async_generator(fn: Callable[..., Any], hooks: HooksOf) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        live = hooks()
        record = live.enter(args, kwargs) if live is not None else None
        steps = _Steps(record, live.context) if record is not None else _UNTRACED
        closed = False  # by the consumer: the span ended already
        try:
            agen = fn(*args, **kwargs)
            sent: Any = None
            error: BaseException | None = None
            while True:
                token = steps.enter()
                try:
                    item = await (agen.asend(sent) if error is None else agen.athrow(error))
                except StopAsyncIteration:
                    break
                finally:
                    steps.leave(token)
                    error = None
                try:
                    sent = yield item
                except GeneratorExit:
                    token = steps.enter()
                    try:
                        await agen.aclose()
                    finally:
                        steps.leave(token)
                    closed = True
                    if record is not None:
                        live.leave(record, None)  # the consumer stopped early: no error
                    raise
                except BaseException as exc:  # noqa: BLE001 - thrown in: the generator decides
                    error, sent = exc, None
        except BaseException as exc:
            if record is not None and not closed:
                live.failed(record, exc)
            raise
        if record is not None:
            live.leave(record, None)

    return wrapper


class _Steps:
    """A traced generator's span, current around each of its steps and only then.

    ``enter`` made it current; it goes back here, and the consumer's context with it.
    Each step resumes in what the last one left (a span the generator opened around a
    ``yield``), if it runs in the same ``contextvars.Context``; else (another thread,
    ``asyncio.wait_for``'s task: the last step's spans could not be undone there) in
    the generator's own span.  A private variable set after each step tells which."""

    __slots__ = ("_first", "_get", "_inner", "_mark", "_reset", "_set")

    def __init__(self, record: Any, context: tuple[Callable[..., Any], ...]) -> None:
        self._get, self._set, self._reset = context
        self._inner = self._first = self._get()
        token, record.token = record.token, None
        if token is not None:
            self._reset(token)
        self._mark: Any = None

    def enter(self) -> Any:
        """Before a step: the token ``leave`` takes."""
        if self._mark is not None:
            try:
                _STEP.reset(self._mark)
            except (ValueError, RuntimeError):  # another Context than the last step's
                self._inner = self._first
            self._mark = None
        return self._set(self._inner)

    def leave(self, token: Any) -> None:
        """After a step: keep where the next resumes, give the consumer its context."""
        self._inner = self._get()
        self._reset(token)
        self._mark = _STEP.set(None)


class _Untraced:
    """``_Steps`` for an untraced async generator: nothing to make current."""

    def enter(self) -> None:
        return None

    def leave(self, token: Any) -> None:
        pass


_UNTRACED = _Untraced()


_FACTORIES: dict[str, Callable[[Callable[..., Any], HooksOf], Callable[..., Any]]] = {
    "coroutine": _coroutine,
    "generator": _generator,
    "async_generator": _async_generator,
}
