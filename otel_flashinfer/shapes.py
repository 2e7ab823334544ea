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
        get, set_context, reset = live.context
        inner = first = _step_out(record, get, reset)
        mark = None
        closed = False  # by the consumer: the span ended already
        try:
            gen = fn(*args, **kwargs)
            sent: Any = None
            error: BaseException | None = None
            while True:
                inner, mark = _same_context(mark, inner, first), None
                token = set_context(inner)
                try:
                    item = gen.send(sent) if error is None else gen.throw(error)
                except StopIteration as stop:
                    result = stop.value
                    break
                finally:
                    # What the step left current (a span of its own around a yield) is
                    # where its next step resumes.
                    inner = get()
                    reset(token)
                    mark = _STEP.set(None)
                    error = None
                try:
                    sent = yield item
                except GeneratorExit:
                    inner, mark = _same_context(mark, inner, first), None
                    token = set_context(inner)
                    try:
                        gen.close()
                    finally:
                        reset(token)
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
        traced = record is not None
        if traced:
            get, set_context, reset = live.context
            inner = first = _step_out(record, get, reset)
        mark = None
        closed = False  # by the consumer: the span ended already
        try:
            agen = fn(*args, **kwargs)
            sent: Any = None
            error: BaseException | None = None
            while True:
                if traced:
                    inner, mark = _same_context(mark, inner, first), None
                token = set_context(inner) if traced else None
                try:
                    item = await (agen.asend(sent) if error is None else agen.athrow(error))
                except StopAsyncIteration:
                    break
                finally:
                    if traced:
                        inner = get()  # where its next step resumes
                        reset(token)
                        mark = _STEP.set(None)
                    error = None
                try:
                    sent = yield item
                except GeneratorExit:
                    if traced:
                        inner, mark = _same_context(mark, inner, first), None
                    token = set_context(inner) if traced else None
                    try:
                        await agen.aclose()
                    finally:
                        if traced:
                            reset(token)
                    closed = True
                    if traced:
                        live.leave(record, None)  # the consumer stopped early: no error
                    raise
                except BaseException as exc:  # noqa: BLE001 - thrown in: the generator decides
                    error, sent = exc, None
        except BaseException as exc:
            if traced and not closed:
                live.failed(record, exc)
            raise
        if traced:
            live.leave(record, None)

    return wrapper


def _same_context(mark: Any, inner: Any, first: Any) -> Any:
    """Where a step resumes: what the last step left, if it ran in this same Context
    (its own spans' tokens reset only there); else the span's own context."""
    if mark is None:
        return inner
    try:
        _STEP.reset(mark)
    except (ValueError, RuntimeError):
        return first
    return inner


def _step_out(record: Any, get: Callable[[], Any], reset: Callable[[Any], Any]) -> Any:
    """The context with the generator's span (made current by ``enter``), and the
    consumer's context back: the span is set again around each step."""
    inner = get()
    token, record.token = record.token, None
    if token is not None:
        reset(token)
    return inner


_FACTORIES: dict[str, Callable[[Callable[..., Any], HooksOf], Callable[..., Any]]] = {
    "coroutine": _coroutine,
    "generator": _generator,
    "async_generator": _async_generator,
}
