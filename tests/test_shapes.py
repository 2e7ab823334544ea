"""`traced` on coroutines and generators: the span covers the work, nests what runs in
it and nothing the consumer does between items, and ends with the right status."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest
from opentelemetry.trace import StatusCode

import otel_flashinfer
from otel_flashinfer import health

pytestmark = pytest.mark.usefixtures("wrapper_path")


@otel_flashinfer.traced(name="leaf")
def leaf(x: int) -> int:
    return x


@otel_flashinfer.traced(name="step")
async def step(x: int, pause: float = 0.05) -> int:
    await asyncio.sleep(pause)
    leaf(x)
    return 2 * x


@otel_flashinfer.traced(name="tokens")
def tokens(n: int):  # noqa: ANN201
    for i in range(n):
        leaf(i)
        time.sleep(0.01)
        yield i
    return "end"


@otel_flashinfer.traced(name="stream")
async def stream(n: int):  # noqa: ANN201
    for i in range(n):
        await asyncio.sleep(0.01)
        leaf(i)
        yield i


def _ms(span) -> float:  # noqa: ANN001
    return (span.end_time - span.start_time) / 1e6


def test_the_wrappers_keep_the_functions_shape() -> None:
    # Frameworks (FastAPI, pytest-asyncio, Starlette) branch on exactly these checks.
    assert inspect.iscoroutinefunction(step)
    assert inspect.isgeneratorfunction(tokens)
    assert inspect.isasyncgenfunction(stream)
    assert step.__name__ == "step" and step.__wrapped__ is not None


def test_an_async_span_lasts_until_the_coroutine_finishes(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=3)
    assert asyncio.run(step(3)) == 6
    (outer,), (inner,) = spans.by_name("step"), spans.by_name("leaf")
    assert _ms(outer) >= 45  # the await is inside the span, not after it
    assert inner.parent.span_id == outer.context.span_id
    assert outer.attributes["flashinfer.arg.x"] == 3
    assert {k: v for k, v in outer.attributes.items() if k.startswith("flashinfer.result")} \
        == {"flashinfer.result.0": 6}  # what the awaited body returned
    assert outer.status.status_code is StatusCode.UNSET


def test_concurrent_tasks_each_nest_under_their_own_span(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    async def main() -> list[int]:
        return await asyncio.gather(*(step(i, 0.02 * (3 - i)) for i in range(3)))

    assert asyncio.run(main()) == [0, 2, 4]
    outers = {s.context.span_id: s for s in spans.by_name("step")}
    inners = spans.by_name("leaf")
    assert len(outers) == 3 and len(inners) == 3
    assert {s.parent.span_id for s in inners} == set(outers)


def test_an_async_error_ends_the_span_with_it_and_passes_through(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    class Boom(Exception):
        pass

    @otel_flashinfer.traced(name="fails")
    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise Boom("no")

    with pytest.raises(Boom, match="no"):
        asyncio.run(fails())
    (span,) = spans.by_name("fails")
    assert span.status.status_code is StatusCode.ERROR
    assert span.events[0].attributes["exception.type"].endswith("Boom")
    assert _ms(span) >= 5


def test_a_generator_span_covers_its_steps_not_the_consumers_code(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)
    gen = tokens(3)
    assert spans.by_name("tokens") == []  # nothing ran yet
    seen = []
    for value in gen:
        seen.append(value)
        leaf(100 + value)  # the consumer's own call, between two items
    assert seen == [0, 1, 2]
    (outer,) = spans.by_name("tokens")
    inner = [s for s in spans.by_name("leaf")]
    mine = [s for s in inner if s.parent is not None]
    theirs = [s for s in inner if s.parent is None]
    assert len(mine) == 3 and len(theirs) == 3
    assert {s.parent.span_id for s in mine} == {outer.context.span_id}
    assert _ms(outer) >= 25
    assert outer.status.status_code is StatusCode.UNSET


def test_a_generator_closed_early_ends_cleanly(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)
    closed = []

    @otel_flashinfer.traced(name="endless")
    def endless():  # noqa: ANN202
        try:
            while True:
                yield 1
        finally:
            closed.append(True)

    gen = endless()
    assert next(gen) == 1
    gen.close()
    assert closed == [True]
    (span,) = spans.by_name("endless")
    assert span.status.status_code is StatusCode.UNSET


def test_send_throw_and_return_value_reach_the_generator(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    @otel_flashinfer.traced(name="echo")
    def echo():  # noqa: ANN202
        got = yield "ready"
        while True:
            try:
                got = yield f"got {got}"
            except KeyError:
                got = "recovered"
            except ValueError:
                return "stopped"

    gen = echo()
    assert next(gen) == "ready"
    assert gen.send(5) == "got 5"
    assert gen.throw(KeyError("k")) == "got recovered"
    with pytest.raises(StopIteration) as stop:
        gen.throw(ValueError("v"))
    assert stop.value.value == "stopped"
    (span,) = spans.by_name("echo")
    assert span.status.status_code is StatusCode.UNSET  # handled inside: no error


def test_a_generator_that_raises_ends_its_span_with_the_error(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    @otel_flashinfer.traced(name="breaks")
    def breaks():  # noqa: ANN202
        yield 1
        raise RuntimeError("mid-stream")

    gen = breaks()
    next(gen)
    with pytest.raises(RuntimeError, match="mid-stream"):
        next(gen)
    (span,) = spans.by_name("breaks")
    assert span.status.status_code is StatusCode.ERROR


def test_an_async_generator_span_covers_its_steps(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    async def consume() -> list[int]:
        out = []
        async for value in stream(3):
            out.append(value)
            leaf(100 + value)
        return out

    assert asyncio.run(consume()) == [0, 1, 2]
    (outer,) = spans.by_name("stream")
    inner = spans.by_name("leaf")
    assert sorted(s.attributes["flashinfer.api"] for s in inner) == ["leaf"] * 6
    assert {s.parent.span_id for s in inner if s.parent} == {outer.context.span_id}
    assert sum(1 for s in inner if s.parent is None) == 3
    assert _ms(outer) >= 25


def test_an_async_generator_closed_early_and_one_that_raises(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=1)

    @otel_flashinfer.traced(name="bad_stream")
    async def bad_stream():  # noqa: ANN202
        yield 1
        raise ValueError("stream broke")

    async def main() -> None:
        agen = stream(10)
        assert await agen.__anext__() == 0
        await agen.aclose()
        with pytest.raises(ValueError, match="stream broke"):
            async for _ in bad_stream():
                pass

    asyncio.run(main())
    (early,) = spans.by_name("stream")
    assert early.status.status_code is StatusCode.UNSET
    (bad,) = spans.by_name("bad_stream")
    assert bad.status.status_code is StatusCode.ERROR


def test_untraced_shapes_behave_as_the_plain_functions(spans) -> None:  # noqa: ANN001
    otel_flashinfer.instrument(level=0)
    assert asyncio.run(step(2, 0)) == 4
    gen = tokens(2)
    assert list(gen) == [0, 1]

    async def consume() -> list[int]:
        return [v async for v in stream(2)]

    assert asyncio.run(consume()) == [0, 1]
    assert spans.finished() == []
    assert health.counters().get("wrapper_errors", 0) == 0


def test_a_coroutine_closed_outside_its_task_still_ends_its_span(spans) -> None:  # noqa: ANN001
    """A task left pending when its loop closes; the coroutine is closed later, in
    another context: resetting our context there raised, and the span was lost."""
    otel_flashinfer.instrument(level=1)

    @otel_flashinfer.traced(name="waits")
    async def waits() -> None:
        await asyncio.sleep(10)

    async def main() -> asyncio.Task:
        task = asyncio.ensure_future(waits())
        await asyncio.sleep(0.01)
        return task

    loop = asyncio.new_event_loop()
    task = loop.run_until_complete(main())
    coro = task._coro  # noqa: SLF001
    loop.close()
    coro.close()
    (span,) = spans.by_name("waits")
    assert span.status.status_code is StatusCode.UNSET  # closed early, as a generator
    assert health.counters().get("wrapper_errors", 0) == 0


def test_a_generators_own_span_around_a_yield_stays_current(spans) -> None:  # noqa: ANN001
    """Each step resumed from the context of the first, so a span the generator opened
    around a ``yield`` was gone when its code went on after it."""
    otel_flashinfer.instrument(level=3)
    tracer = spans.tracer()

    @otel_flashinfer.traced(name="opens")
    def opens():  # noqa: ANN202
        with tracer.start_as_current_span("mine"):
            yield 1
            leaf(1)

    @otel_flashinfer.traced(name="aopens")
    async def aopens():  # noqa: ANN202
        with tracer.start_as_current_span("amine"):
            yield 1
            leaf(2)

    assert list(opens()) == [1]

    async def consume() -> list[int]:
        return [v async for v in aopens()]

    assert asyncio.run(consume()) == [1]
    mine, amine = spans.by_name("mine")[0], spans.by_name("amine")[0]
    leaves = {s.attributes["flashinfer.arg.x"]: s for s in spans.by_name("leaf")}
    assert leaves[1].parent.span_id == mine.context.span_id
    assert leaves[2].parent.span_id == amine.context.span_id


def test_a_generator_that_raises_generator_exit_itself_ends_its_span(spans) -> None:  # noqa: ANN001
    """GeneratorExit raised by the generator's own step (not a close of ours) went out
    with the span never ended and its journal note left live."""
    otel_flashinfer.instrument(level=1)

    @otel_flashinfer.traced(name="quits")
    def quits():  # noqa: ANN202
        yield 1
        raise GeneratorExit

    gen = quits()
    next(gen)
    with pytest.raises(GeneratorExit):
        next(gen)
    (span,) = spans.by_name("quits")
    assert span.status.status_code is StatusCode.ERROR
    from otel_flashinfer import runtime

    journal = runtime.current().journal
    assert journal is None or journal.live_count() == 0


@pytest.mark.parametrize("where", ["another thread", "another context"])
def test_steps_in_other_contexts_resume_under_the_generators_own_span(
        spans, where: str) -> None:  # noqa: ANN001
    """A span the generator opened around a yield cannot be detached by a step that runs
    in another Context (another thread, a callback, asyncio.wait_for's task): resuming
    from what such a step left kept that ended span current for every later step."""
    import contextvars
    import logging
    import threading

    otel_flashinfer.instrument(level=3)
    tracer = spans.tracer()

    @otel_flashinfer.traced(name="g")
    def g():  # noqa: ANN202
        with tracer.start_as_current_span("mine"):
            yield 1
            leaf(1)
        leaf(2)
        yield 2
        leaf(3)

    def step(it) -> None:  # noqa: ANN001
        contextvars.copy_context().run(next, it, None)

    it = g()
    logging.disable(logging.CRITICAL)  # OTel logs the detach that cannot happen there
    try:
        for _ in range(3):
            if where == "another thread":
                worker = threading.Thread(target=step, args=(it,))
                worker.start()
                worker.join()
            else:
                step(it)
    finally:
        logging.disable(logging.NOTSET)
    (outer,) = spans.by_name("g")
    parents = {s.attributes["flashinfer.arg.x"]: s.parent.span_id for s in spans.by_name("leaf")}
    assert parents[2] == parents[3] == outer.context.span_id
