"""Which CUDA graph replays are traced: a fixed one in N, or ``auto`` within a budget
(``graph_sampling``), and every replay span saying how many were skipped before it."""

from __future__ import annotations

import math
import time

import pytest
import torch

import otel_flashinfer
from otel_flashinfer.config import REPLAY_AUTO
from otel_flashinfer.graph_sampling import ReplaySampler

SKIPPED = "flashinfer.cuda_graph.replays_skipped"


def test_fixed_every_traces_one_in_n_and_counts_the_rest() -> None:
    sampler = ReplaySampler(3, 0.01)
    decisions, skipped = [], []
    for i in range(10):
        trace = sampler.should_trace(i * 1e-3)
        decisions.append(trace)
        if trace:
            skipped.append(sampler.take_skipped())
            sampler.traced(1.0, 5, 1.0)  # cost plays no part in a fixed N
    assert decisions == [i % 3 == 0 for i in range(10)]
    assert skipped == [0, 2, 2, 2]


def _run(sampler: ReplaySampler, phases: list[tuple[int, float, float]]) -> list[float]:
    """Replays back to back: (count, seconds between replays, tracing cost).  Returns
    per phase the share of its time that tracing cost (the second half of the phase,
    once the estimate has followed the change)."""
    now, shares = 0.0, []
    for count, period, cost in phases:
        spent = elapsed = 0.0
        for i in range(count):
            traced = sampler.should_trace(now)
            if traced:
                sampler.take_skipped()
                sampler.traced(cost * 0.6, 4, cost * 0.1)  # 0.6 + 4 x 0.1 = cost
            step = period + (cost if traced else 0.0)
            if i >= count // 2:
                spent += cost if traced else 0.0
                elapsed += step
            now += step
        shares.append(spent / elapsed)
    return shares


def test_auto_stays_within_its_budget_while_the_workload_changes() -> None:
    """Steps of 1 ms, then of 50 us (a smaller batch), then tracing gets 3x dearer (a
    slower exporter): the share of time spent tracing follows the budget in each."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    shares = _run(sampler, [(20_000, 1e-3, 50e-6), (200_000, 50e-6, 50e-6),
                            (200_000, 50e-6, 150e-6)])
    for share in shares:
        assert 0.008 <= share <= 0.0102, shares


def test_auto_traces_until_one_replay_measured_and_no_burst_after_idling() -> None:
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    assert sampler.should_trace(0.0)
    sampler.traced(5e-3, 3, 0.0, setup=True)  # built the templates: not what one costs
    assert sampler.should_trace(10e-6)  # the next measures
    sampler.traced(40e-6, 3, 20e-6)  # 100 us a traced replay
    assert not sampler.should_trace(20e-6)
    # A minute idle earns a minute's budget, but only a few replays' worth is kept.
    traced = sum(sampler.should_trace(60.0 + i * 20e-6) and (
        sampler.traced(40e-6, 3, 20e-6) or True) for i in range(100))
    assert 1 <= traced <= 5
    assert sampler.take_skipped() > 0


def test_auto_charges_its_own_bookkeeping_once() -> None:
    """What the caller spends after ``traced`` (the sampler's bookkeeping) is spent at
    once and counted in the next replay's estimate, never twice against the credit."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    assert sampler.should_trace(0.0)
    sampler.traced(1e-3, 0, 0.0, setup=True)
    sampler.charge_tail(0.0)
    assert sampler.should_trace(1.0)  # 10 ms of credit
    credit = sampler.credit_s
    sampler.traced(100e-6, 0, 0.0)
    sampler.charge_tail(20e-6)
    assert credit - sampler.credit_s == pytest.approx(120e-6)
    assert sampler.estimate() == pytest.approx(100e-6)  # no tail measured before it
    assert sampler.should_trace(2.0)
    credit = sampler.credit_s
    sampler.traced(100e-6, 0, 0.0)
    assert credit - sampler.credit_s == pytest.approx(100e-6)
    assert sampler.estimate() == pytest.approx(100e-6 + 0.2 * 20e-6)  # smoothed


def test_auto_is_not_starved_by_one_costly_first_replay() -> None:
    """The device case: the first traced replay built the templates (1 ms) and the
    worker's first batch paid its imports and the file's opening (65 us a span, 40x
    the steady 1.5 us).  Taken as the estimate, those made auto trace 0 of 500 replays
    of a 722 us step; it must trace what 1% of the time buys at the steady cost."""
    from otel_flashinfer.graph_sampling import CostEstimate

    worker = CostEstimate()
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, traced, now = 722e-6, 150e-6, 65, 0, 0.0
    for i in range(520):
        if sampler.should_trace(now):
            sampler.take_skipped()
            first = i == 0
            sampler.traced(1e-3 if first else caller, spans, worker.value, setup=first)
            worker.add(65e-6 if first else 1.5e-6)  # the worker's drain of its spans
            traced += i >= 20
        now += period
    steady = caller + spans * 1.5e-6  # 247.5 us a traced replay
    expected = 500 * period * 0.01 / steady  # 14.6
    assert 0.7 * expected <= traced <= 1.2 * expected, traced


def _auto_with_drains(drains: list[float], repeat: list[float], replays: int
                      ) -> tuple[int, float]:
    """``auto`` over ``replays`` of a 730 us step whose traced replays cost the caller
    60 us and hand on 65 spans, each traced replay's spans drained by a worker whose
    cost per span is ``drains`` in turn, then ``repeat`` over and over (the worker's
    own ``CostEstimate`` prices them).  Returns the replays traced and the share of
    the time they really cost (caller and drains), the setup and the one-time drains
    (``drains``) left out."""
    from itertools import chain, cycle

    from otel_flashinfer.graph_sampling import CostEstimate

    worker, costs = CostEstimate(), chain(drains, cycle(repeat))
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, now, traced, spent = 730e-6, 60e-6, 65, 0.0, 0, 0.0
    for i in range(replays):
        if sampler.should_trace(now, worker.value):
            sampler.take_skipped()
            sampler.traced(1e-3 if i == 0 else caller, spans, worker.value, setup=i == 0)
            cost = next(costs)
            worker.add(cost)  # the worker's drain of its spans
            if i:
                traced += 1
                spent += caller + (spans * cost if traced >= len(drains) else 0.0)
        now += period
    return traced, spent / now


@pytest.mark.parametrize("drains", [[65e-6, 189e-6], [65e-6, 189e-6, 130e-6],
                                    [65e-6, 1e-6, 1e-6, 189e-6]],
                         ids=["one_costly", "two_costly", "costly_later"])
def test_auto_is_not_held_up_by_costly_drains_after_the_first(drains) -> None:
    """H100, level 1, one process: a drain after the first (the one left out) cost 189
    us a span against a steady 1 us.  Taken as the price, it charged the spans traced
    so far 12 ms and priced the next replay at 12 ms; smoothed, it needed some 20 traced
    replays to come down, each waiting for that credit: ``auto`` traced 2 of 2,400.
    One costly drain or two at the start, or one later, must leave it tracing about
    what 1% of the time buys at the steady cost (the old estimate traced 1 of an
    expected 175 through the first sequence)."""
    traced, share = _auto_with_drains(drains, [1e-6], 3000)
    expected = 3000 * 730e-6 * 0.01 / (60e-6 + 65 * 1e-6)  # 175
    assert 0.6 * expected <= traced <= 1.1 * expected, traced
    assert share <= 0.0105, share


@pytest.mark.parametrize("repeat", [[1e-6, 1e-6, 5e-6], [1e-6, 20e-6, 1e-6, 1e-6, 20e-6],
                                    [1e-6, 1e-6, 1e-6, 20e-6]],
                         ids=["one_in_three_5x", "two_in_five_20x", "three_cheap_then_20x"])
def test_auto_charges_what_uneven_drains_cost_on_average(repeat) -> None:
    """Spans are charged at the worker's estimate, so an estimate below the mean of an
    uneven cost spends more than the budget: a median of the latest drains spent 1.7%
    and 4.95% of the time against 1% on the first two patterns, and starting the
    estimate again after three cheap drains in a row 1.35% on the third.  Smoothing
    tracks the mean."""
    traced, share = _auto_with_drains([65e-6], repeat, 60_000)
    assert traced > 100
    assert 0.0085 <= share <= 0.0106, share


def test_auto_pays_later_for_spans_traced_before_their_cost_was_known() -> None:
    """The worker's cost per span is known only after its fourth drain of replays (the
    first is left out, the price starts from the lowest of the next three): the
    replays traced before that were charged their spans at 0,
    and the estimate, smoothed from those, stayed low for many traced replays (H200:
    1.46% / 1.84% of the time against a 1% budget over 1,000 replays).  Spans are now
    priced when the price is known, and each decision takes the price of the day."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, per_span = 717e-6, 60e-6, 65, 4.4e-6
    now, traced, spent = 0.0, 0, 0.0
    for i in range(1000):
        known = per_span if traced >= 4 else 0.0  # the pipeline's estimate, when there
        if sampler.should_trace(now, known):
            sampler.take_skipped()
            sampler.traced(caller, spans, known, setup=i == 0)
            if i:
                spent += caller + spans * per_span
            traced += 1
        now += period
    assert spent / now <= 0.0102, spent / now
    assert spent / now >= 0.007, spent / now  # not starved either


def test_spans_priced_late_leave_a_bounded_debt() -> None:
    """Replays traced before the background's price is known are settled once it is
    (charged ``PROVISIONAL_PER_SPAN_S`` meanwhile); where the real price is far above
    that, the debt was seconds of credit, and ``auto`` stopped tracing for a minute or
    more.  It is at most what the budget earns in ``_MAX_DEBT_S`` (or ``_MAX_BURST``
    traced replays' cost), and tracing comes back about that soon."""
    from otel_flashinfer.graph_sampling import _MAX_BURST, _MAX_DEBT_S

    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, price, now = 730e-6, 20e-6, 65, 40e-6, 0.0
    for i in range(3000):  # the price is not known yet: spans provisionally priced
        if sampler.should_trace(now, 0.0):
            sampler.traced(1e-3 if i == 0 else caller, spans, 0.0, setup=i == 0)
        now += period
    assert sampler.unpriced >= 50 * spans  # 37 us a span owed: hundreds of ms
    assert not sampler.should_trace(now, price)  # priced: every span so far settled
    floor = max(_MAX_BURST * sampler.estimate(), 0.01 * _MAX_DEBT_S)
    assert sampler.credit_s == pytest.approx(-floor)  # the debt was larger: bounded
    later = 0
    for _ in range(20_000):  # 14.6 s
        now += period
        later += sampler.should_trace(now, price) and (
            sampler.traced(caller, spans, price) or True)
    expected = 20_000 * period * 0.01 / (caller + spans * price)  # 56
    assert 0.8 * expected <= later <= 1.05 * expected, later


@pytest.mark.parametrize("price", [10e-6, 1.4e-6])
def test_spans_priced_late_are_settled_in_full_below_the_bound(price: float) -> None:
    """The first traced replays of a process go out before the sender's price is known
    (it takes a few sends).  Their spans are settled in full once it is: the rest of
    what they cost where the price is above the provisional one (capped at a burst's
    worth, 85% of that debt went unpaid, 1.5 us a replay of a 3,000-replay run on the
    CPU box), and what the provisional price overcharged given back where it is
    below."""
    from otel_flashinfer.graph_sampling import PROVISIONAL_PER_SPAN_S

    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, now = 730e-6, 25e-6, 65, 0.0
    for i in range(600):  # the price is not known yet
        if sampler.should_trace(now, 0.0):
            sampler.traced(1e-3 if i == 0 else caller, spans, 0.0, setup=i == 0)
        now += period
    owed = sampler.unpriced * (price - PROVISIONAL_PER_SPAN_S)
    assert 1e-4 < abs(owed) < 0.01  # tens of replays' spans: under the bound
    spent = sampler.spent_s
    sampler.should_trace(now, price)
    assert sampler.unpriced == 0
    assert sampler.spent_s - spent == pytest.approx(owed)


def test_an_untraced_ask_during_a_late_priced_debt_is_still_charged() -> None:
    """The debt of spans priced late may reach what the budget earns in a second,
    deeper than a burst's worth; an untraced replay that asks meanwhile is charged its
    bookkeeping all the same (with a shallower floor of its own it was charged
    nothing), down to the same floor."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    now = 0.0
    for i in range(200):  # the price is not known yet
        if sampler.should_trace(now, 0.0):
            sampler.traced(1e-3 if i == 0 else 25e-6, 20, 0.0, setup=i == 0)
        now += 730e-6
    sampler.should_trace(now, 20e-6)  # priced: several ms of debt
    assert -0.01 < sampler.credit_s < -4 * sampler.estimate()
    before = sampler.spent_s
    for _ in range(100):
        sampler.charge_untraced(5e-6)
    assert sampler.spent_s - before == pytest.approx(100 * 5e-6)
    for _ in range(10_000):  # 50 ms of asks: down to the one floor, not below
        sampler.charge_untraced(5e-6)
    assert sampler.credit_s == pytest.approx(-0.01 * 1.0)  # a second of the budget


def test_auto_earns_by_the_gpu_time_when_the_host_runs_ahead() -> None:
    """Back to back the host enqueues a replay in 10 us while the GPU takes 700 us for
    it (up to 5,000 queued, then the host waits): earning by the host's time alone,
    ``auto`` spent 1% of about 10 us per replay (4 to 8 of 1,000 traced on the device).
    A traced replay's GPU time can be read once the GPU has run it, by the next replay
    that asks; with the C gate (stand-in) replays ask now and then until it is read.
    Tracing then costs the budget's share of the GPU's time, from the first thousand
    replays on, and never more."""
    gpu, host, caller, spans, per_span, depth = 700e-6, 10e-6, 200e-6, 65, 1.5e-6, 5000
    for gated in (False, True):
        sampler, skip = ReplaySampler(REPLAY_AUTO, 0.01), _Skip()
        now = gpu_free = spent = 0.0
        timed: tuple[float, float] | None = None  # (when the GPU is done with it, time)
        traced_by: dict[int, int] = {}
        replays = 20_000
        for i in range(replays):
            now = max(now, gpu_free - depth * gpu)  # a full queue holds the host back
            gpu_free = max(now, gpu_free) + gpu
            if gated and skip.let_through(sampler, now):
                now += host
                continue
            read = None
            if timed is not None and now >= timed[0]:
                read, timed = timed[1], None
            if sampler.should_trace(now, per_span, read):
                sampler.take_skipped()
                sampler.traced(caller, spans, per_span, setup=i == 0)
                cost = caller + spans * per_span
                if i:
                    spent += cost
                now += caller
                timed = (gpu_free, gpu)
                traced_by[i // 1000] = traced_by.get(i // 1000, 0) + 1
            if gated:
                sampler.arm(skip, timed is not None)
            now += host
        share = spent / (replays * gpu)  # the GPU's time is the step's time
        assert 0.008 <= share <= 0.0101, (gated, share, traced_by)
        assert traced_by[0] >= 18, (gated, traced_by)  # 1% of 0.7 s buys about 23


class _Skip:
    """What the C gate keeps per graph (``_hotpath.GraphSkip``), for the pure logic."""

    def __init__(self) -> None:
        self.count, self.skipped, self.until = 0, 0, 0.0

    def passes(self, now: float) -> bool:
        """The C gate's test (``skip_now`` in ``csrc/hotpath.c``), at time ``now``: a
        count, a deadline, or both (then the first of the two to run out ends it)."""
        if self.until > 0:
            if now >= self.until:
                self.count, self.until = 0, 0.0
                return False
            if self.count > 0:
                self.count -= 1
                if self.count == 0:
                    self.until = 0.0
        elif self.count > 0:
            self.count -= 1
        else:
            return False
        self.skipped += 1
        return True

    def let_through(self, sampler: ReplaySampler, now: float) -> bool:
        """Whether the gate sends this replay straight to torch; if not, the replays it
        did before are counted into the sampler first (``graphs.Capture.settle``)."""
        if self.passes(now):
            return True
        if self.skipped:
            sampler.passed(self.skipped)
            self.skipped = 0
        return False


@pytest.mark.parametrize(("every", "gpu_s"), [(1, None), (3, None), (REPLAY_AUTO, None),
                                             (REPLAY_AUTO, 0.4e-3)])
def test_replays_the_gate_lets_through_change_no_decision(every: int,
                                                          gpu_s: float | None) -> None:
    """``arm`` tells the gate which replays are surely untraced; those never ask.  The
    replays that do ask get the same answers as when every replay asked, and each
    traced one says the same number skipped before it: the credit untraced replays
    would have earned adds up, by time (and with a replay's GPU time known, by their
    number too), to what the next one that asks finds."""

    import random

    def decisions(gated: bool) -> list[tuple[int, int]]:
        sampler, skip = ReplaySampler(every, 0.01), _Skip()
        now, out, rng = 0.0, [], random.Random(7)  # jittered: no exact ties in the sums
        for i in range(30_000):
            period = (1e-3 if i < 10_000 else 50e-6) * (0.5 + rng.random())  # shorter
            cost = 50e-6 if i < 20_000 else 150e-6  # then tracing gets dearer
            if gated and skip.let_through(sampler, now):
                now += period
                continue
            traced = sampler.should_trace(now, None, gpu_s)
            if traced:
                out.append((i, sampler.take_skipped()))
                sampler.traced(cost * 0.6, 4, cost * 0.1)
            if gated:
                sampler.arm(skip)
            now += period + (cost if traced else 0.0)
        return out

    plain, gated = decisions(False), decisions(True)
    assert gated == plain
    assert 30 < len(plain) < 30_000 or every == 1


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU box: graphs.patch wraps its three
    methods exactly as it wraps torch's."""

    def capture_begin(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        pass

    def capture_end(self) -> None:
        pass

    def replay(self) -> None:
        pass


def _captured_step(monkeypatch, graph_cls: type = _FakeGraph) -> _FakeGraph:  # noqa: ANN001
    """Level 1 on, and a stand-in graph (``graph_cls``) with one traced call ("step")
    captured."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_cls)
    otel_flashinfer.instrument(level=1, journal_dir="")
    step = otel_flashinfer.traced(lambda x: x, name="step")
    graph = graph_cls()
    graph.capture_begin()
    step(torch.zeros(2))
    graph.capture_end()
    return graph


def test_untraced_replays_skip_the_python_replay(spans, monkeypatch, wrapper_path) -> None:
    """On the C path, the replays the sampler said are untraced go from the C gate
    straight to torch: only the traced ones run ``replay_`` (an untraced one cost
    about 2 us there), and the spans are the same either way."""
    from otel_flashinfer import graphs

    asked = []
    should_trace = ReplaySampler.should_trace
    monkeypatch.setattr(ReplaySampler, "should_trace",
                        lambda self, now, *more: asked.append(now) or should_trace(self, now,
                                                                                   *more))
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "4")
    graph = _captured_step(monkeypatch)
    for _ in range(12):
        graph.replay()
    replay_spans = sorted(spans.by_name("cuda_graph.replay"),
                          key=lambda s: s.attributes["flashinfer.cuda_graph.replay"])
    assert [(s.attributes["flashinfer.cuda_graph.replay"], s.attributes[SKIPPED])
            for s in replay_spans] == [(1, 0), (5, 3), (9, 3)]
    assert len(asked) == (3 if wrapper_path == "native" else 12)
    capture = graphs._graphs[graph]  # noqa: SLF001
    capture.settle()
    assert capture.replays == 12 and capture.sampler.seen == 12
    graph.replay()  # the 13th asks: the three after the last traced one were let through
    assert len(asked) == (4 if wrapper_path == "native" else 13)
    assert capture.replays == 13


def test_the_replay_gate_passes_calls_through_unchanged() -> None:
    """The C gate (``_hotpath.ReplayGate``): binds like a method, hands arguments and
    results through, lets exceptions out as they are, and sends a graph to torch only
    while its GraphSkip says so (a count, a CLOCK_MONOTONIC deadline, or both)."""
    import time
    import weakref

    from otel_flashinfer import native

    types = native.replay_gate_types()
    if types is None:
        pytest.skip("the C hot path is not built")
    gate_type, skip_type = types
    calls: list[tuple[str, tuple, dict]] = []

    def original(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(("torch", args, kwargs))
        if kwargs.get("fail"):
            raise kwargs["fail"]
        return "torch"

    def slow(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(("python", args, kwargs))
        return "python"

    skips: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    class Graph:
        replay = gate_type(original, slow, skips.data)

    graph, other = Graph(), Graph()
    skip = skip_type()
    skips[graph] = skip
    assert graph.replay(1, k=2) == "python"  # nothing armed
    skip.count = 2
    bound = graph.replay
    assert bound(3) == "torch" and Graph.replay(graph, 4, k=5) == "torch"
    assert graph.replay() == "python" and skip.count == 0 and skip.skipped == 2
    assert other.replay() == "python"  # a graph we did not capture
    assert calls[:3] == [("python", (1,), {"k": 2}), ("torch", (3,), {}),
                         ("torch", (4,), {"k": 5})]
    skip.until = time.monotonic() + 60
    error = ValueError("the user's own")
    with pytest.raises(ValueError) as raised:
        graph.replay(fail=error)
    assert raised.value is error and skip.skipped == 3
    skip.until = time.monotonic() - 1e-3  # past: asks again, and is disarmed
    assert graph.replay() == "python" and skip.until == 0.0
    # Both armed (``auto`` with a replay's GPU time known): the first to run out ends it.
    skip.count, skip.until = 2, time.monotonic() + 60
    assert [graph.replay() for _ in range(3)] == ["torch", "torch", "python"]
    assert (skip.count, skip.until) == (0, 0.0)
    skip.count, skip.until = 5, time.monotonic() - 1e-3
    assert graph.replay() == "python" and (skip.count, skip.until) == (0, 0.0)
    assert Graph.replay.original is original
    assert (Graph.replay.__name__, Graph.replay.__wrapped__) == ("original", original)
    with pytest.raises(TypeError, match="not initialised"):  # not a crash
        gate_type.__new__(gate_type)(graph)


def test_a_graph_captured_again_forgets_what_the_gate_knew(spans, monkeypatch,
                                                            wrapper_path) -> None:
    """Captured again under other settings, a graph's replays are all asked about:
    the gate's count armed by its last capture does not send them to torch (a review
    found the new capture's first replays missing from its spans)."""
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "4")
    graph = _captured_step(monkeypatch)
    graph.replay()
    graph.replay()
    otel_flashinfer.uninstrument()
    spans.exporter.clear()
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "1")
    otel_flashinfer.instrument(level=1, journal_dir="")
    step = otel_flashinfer.traced(lambda x: x, name="step")
    graph.capture_begin()
    step(torch.zeros(2))
    graph.capture_end()
    for _ in range(4):
        graph.replay()
    assert sorted(s.attributes["flashinfer.cuda_graph.replay"]
                  for s in spans.by_name("cuda_graph.replay")) == [1, 2, 3, 4]


@pytest.mark.parametrize("every", ["4", "auto"])
def test_replay_spans_say_what_was_skipped(spans, monkeypatch, every: str) -> None:
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", every)
    graph = _captured_step(monkeypatch)
    replays = 2000
    for _ in range(replays):
        graph.replay()
    replay_spans = sorted(spans.by_name("cuda_graph.replay"),
                          key=lambda s: s.attributes["flashinfer.cuda_graph.replay"])
    indices = [s.attributes["flashinfer.cuda_graph.replay"] for s in replay_spans]
    skipped = [s.attributes[SKIPPED] for s in replay_spans]
    # each traced replay's index is the previous one's plus what was skipped between
    assert indices[0] == 1 + skipped[0] == 1
    assert all(b - a == 1 + k for a, b, k in zip(indices, indices[1:], skipped[1:],
                                                   strict=False))
    if every == "4":
        assert indices == list(range(1, replays + 1, 4))
    else:  # fake replays cost nothing: 1% of that time buys few traced ones
        assert 1 <= len(replay_spans) < replays / 10, len(replay_spans)
    children = [s for s in spans.by_name("step") if s.parent is not None
                and s.parent.span_id in {r.context.span_id for r in replay_spans}]
    assert len(children) == len(replay_spans)
    # what the auto budget charges per span was measured on the worker (known from
    # its fourth drain on: the first pays one-time work, and the price starts from the
    # lowest of the next three); each round's 5 ms earn a traced replay's credit
    from otel_flashinfer import runtime

    pipeline = runtime.current().pipeline
    for _ in range(20):
        otel_flashinfer.flush(10)
        if pipeline.worker_cost_per_span_s > 0:
            break
        time.sleep(0.005)
        for _ in range(1000):
            graph.replay()
    assert pipeline.worker_cost_per_span_s > 0


def test_drops_are_said_on_the_next_replay_span(spans, monkeypatch) -> None:
    from otel_flashinfer import health

    graph = _captured_step(monkeypatch)
    graph.replay()
    health.count("spans_dropped", 5)  # a queue past its limit
    health.count("stats_dropped", 2)
    graph.replay()
    graph.replay()
    said = {s.attributes["flashinfer.cuda_graph.replay"]:
            s.attributes.get("flashinfer.cuda_graph.dropped_before")
            for s in spans.by_name("cuda_graph.replay")}
    assert said == {1: None, 2: 7, 3: None}


class _GateProbe:
    """A replay group whose captured work is gated, as the statistics rows are
    (``GraphRows``): it hears each replay's decision before the replay runs."""

    gated = True

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.open, self.calls = fail, None, []

    def seal(self) -> None:
        pass

    def set_gate(self, traced: bool) -> None:
        self.calls.append(traced)
        if self.fail:
            raise RuntimeError("gate write failed")
        self.open = traced

    def replay(self, _index: dict) -> list:
        return []


def _captured_with_group(monkeypatch, probe: _GateProbe, every: str,  # noqa: ANN001
                         graph_type: type = _FakeGraph) -> _FakeGraph:
    """Level 1 with ``REPLAY_EVERY=every``, and a stand-in graph whose one captured
    call joins ``probe`` as a replay group (as the statistics rows join a capture)."""
    from otel_flashinfer import graphs

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", every)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_type)
    otel_flashinfer.instrument(level=1, journal_dir="")
    step = otel_flashinfer.traced(
        lambda x: graphs.capture_state().group("probe", lambda: probe) and x, name="step")
    graph = graph_type()
    graph.capture_begin()
    step(torch.zeros(2))
    graph.capture_end()
    return graph


@pytest.mark.parametrize("fail", [False, True])
def test_gated_groups_hear_each_replays_decision_before_it_runs(spans, monkeypatch,
                                                                 fail: bool) -> None:
    from otel_flashinfer import health

    probe = _GateProbe(fail)
    seen_at_replay = []

    class _Graph(_FakeGraph):
        def replay(self) -> None:
            seen_at_replay.append(probe.open)

    graph = _captured_with_group(monkeypatch, probe, "3", _Graph)
    for _ in range(7):
        graph.replay()
    decisions = [True, False, False, True, False, False, True]
    assert probe.calls == decisions
    traced = [s.attributes["flashinfer.cuda_graph.replay"]
              for s in spans.by_name("cuda_graph.replay")]
    assert sorted(traced) == [1, 4, 7]  # a failing gate stops no replay and no span
    if fail:
        assert seen_at_replay == [None] * 7
        assert health.counters()["graph_errors"] == 7
        return
    assert seen_at_replay == decisions
    # under a parent that is not sampled a replay makes no span: the gate stays shut
    from opentelemetry import trace as trace_api

    unsampled = trace_api.NonRecordingSpan(trace_api.SpanContext(
        5, 6, False, trace_api.TraceFlags(0)))
    with trace_api.use_span(unsampled):
        for _ in range(3):  # replays 8, 9, 10: the sampler picks 10
            graph.replay()
    assert probe.calls[7:] == [False, False, False]


class _WordProbe(_GateProbe):
    """A gated group with a device word, as ``GraphRows`` has it: ``closed_gate`` over a
    stand-in for the extension's ``gate_key``, whose current stream the test moves."""

    def __init__(self) -> None:
        super().__init__()
        self.stream, self.written, self.asked = 16, -1, 0

    def gate_key(self, device: int, on: bool) -> int:
        self.asked += 1
        return self.stream << 1 | bool(on)

    def set_gate(self, traced: bool) -> None:
        super().set_gate(traced)
        self.written = self.stream << 1 | traced

    def closed_gate(self) -> tuple | None:
        if self.written < 0 or self.written & 1:
            return None
        return self.gate_key, 0, self.written


def test_a_gated_graph_skips_python_while_its_word_stays_closed(spans, monkeypatch,
                                                                  wrapper_path) -> None:
    """Level 5 with ``REPLAY_EVERY`` N or ``auto``: the statistics launches are gated by
    a word Python wrote before each replay, so every replay came through ``replay_``
    (uncharged by ``auto``).  Once an untraced replay closed the word, the C gate sends
    armed replays straight to torch while ``gate_key(device, False)`` still says what
    was written; on another stream the replay asks and Python writes the word there.
    Every replay still runs with the word as its decision says."""
    from otel_flashinfer import graphs

    probe = _WordProbe()
    seen_at_replay: list[bool | None] = []

    class _Graph(_FakeGraph):
        def replay(self) -> None:
            seen_at_replay.append(probe.open)

    graph = _captured_with_group(monkeypatch, probe, "4", _Graph)
    for i in range(1, 11):
        if i == 7:
            probe.stream = 32  # replays 7 on: another stream
        graph.replay()
    decisions = [i % 4 == 1 for i in range(1, 11)]
    assert seen_at_replay == decisions
    traced = sorted(s.attributes["flashinfer.cuda_graph.replay"]
                    for s in spans.by_name("cuda_graph.replay"))
    assert traced == [1, 5, 9]
    if wrapper_path == "native":
        # 1 traced; 2 closes the word and arms 3, 4; 5 traced; 6 closes and arms 7, 8;
        # 7 is on another stream: it asks, closes the word there and arms 8; 9 traced,
        # 10 asks after it (the word is open).
        assert probe.calls == [True, False, True, False, False, True, False]
        assert graphs._graphs[graph].skip.gate_closed == 32 << 1  # noqa: SLF001
    else:
        assert probe.calls == decisions


def test_a_gated_graph_whose_word_cannot_be_read_keeps_every_replay_in_python(
        spans, monkeypatch, wrapper_path) -> None:
    """No device word (CPU statistics, a failed gate) or a failing ``gate_key``: every
    replay asks, as before the C gate knew about gated graphs."""
    from otel_flashinfer import health

    probe = _WordProbe()

    def broken(device: int, on: bool) -> int:
        raise RuntimeError("CUDA error: context is destroyed")

    graph = _captured_with_group(monkeypatch, probe, "4", _FakeGraph)
    probe.gate_key = broken  # type: ignore[method-assign]
    for _ in range(8):
        graph.replay()
    assert probe.calls == [i % 4 == 1 for i in range(1, 9)]
    assert health.counters().get("graph_errors", 0) == 0  # an armed replay just asks


@pytest.mark.parametrize(("every", "gated"), [("1", False), ("3", True), ("auto", True)])
def test_statistics_rows_are_gated_unless_every_replay_is_traced(monkeypatch, every: str,
                                                                 gated: bool) -> None:
    from otel_flashinfer.config import load_settings
    from otel_flashinfer.graphs import Capture
    from otel_flashinfer.stats.graph_rows import graph_rows_of

    settings = load_settings({"OTEL_FLASHINFER_REPLAY_EVERY": every})
    capture = Capture(1)
    capture.sampler = ReplaySampler(settings.replay_every, settings.replay_budget)
    rows = graph_rows_of(lambda: capture)(torch.device("cpu"))
    assert rows.gated is gated
    assert rows.gate_address() == 0  # no CUDA device: torch ops, run on every replay
    capture.seal()
    assert capture.gates == ((rows,) if gated else ())


def test_the_gate_is_written_when_the_answer_or_the_stream_changes(monkeypatch) -> None:
    """One query per replay, a write only on a change; a new stream first waits for
    the last one (a replay there may still read the word).  A write that fails drops
    the graph's statistics: rows a skipped launch left unwritten are never read."""
    from otel_flashinfer import health
    from otel_flashinfer.stats.graph_rows import GraphRows

    class _Stream:
        def __init__(self, handle: int) -> None:
            self.handle, self.waited = handle, []

        def wait_stream(self, other: _Stream) -> None:
            self.waited.append(other.handle)

    streams = {16: _Stream(16), 32: _Stream(32)}
    current = [16]

    class _Module:
        def __init__(self) -> None:
            self.writes: list[tuple[int, bool]] = []
            self.fail = False

        def gate_key(self, device, on):  # noqa: ANN001, ANN202
            return current[0] << 1 | on

        def gate_write(self, device, gate, on):  # noqa: ANN001, ANN202
            if self.fail:
                raise RuntimeError("CUDA error: an illegal memory access")
            self.writes.append((current[0], on))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams[current[0]])
    health.reset()
    module = _Module()
    rows = GraphRows(torch.device("cpu"), gated=True)
    rows._gate, rows._gate_module = torch.zeros(1, dtype=torch.int32), module
    for traced in (True, True, False, False, True):
        rows.set_gate(traced)
    assert module.writes == [(16, True), (16, False), (16, True)]
    current[0] = 32  # the next replay on another stream, same answer
    rows.set_gate(True)
    assert module.writes[-1] == (32, True) and streams[32].waited == [16]
    assert not streams[16].waited
    module.fail = True
    rows.set_gate(False)
    assert rows.failed and health.counters()["stats_errors"] == 1
    rows.set_gate(True)  # no more writes once failed
    assert health.counters()["stats_errors"] == 1


def test_auto_leaves_out_the_replay_that_built_the_templates(spans, monkeypatch) -> None:
    """Under a parent that is not sampled a traced replay makes no span and builds no
    templates: its cost (ours around the replay, no spans) is measured as it is.  The
    replay that does build them later is the setup: neither charged nor estimated."""
    from opentelemetry import trace as trace_api

    from otel_flashinfer import graphs

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)
    capture = graphs._graphs[graph]  # noqa: SLF001
    sampler = capture.sampler
    unsampled = trace_api.NonRecordingSpan(trace_api.SpanContext(
        5, 6, False, trace_api.TraceFlags(0)))
    with trace_api.use_span(unsampled):
        graph.replay()
    assert not capture.has_template and not spans.by_name("cuda_graph.replay")
    assert sampler.measured == 1 and sampler.history[-1][1] == 0  # no spans handed on
    estimate = sampler.estimate()
    sampler.credit_s = 1.0  # the next replay is traced: asked, not let through by the
    if capture.skip is not None:  # C gate (armed with the deadline that credit was for)
        capture.skip.count, capture.skip.until = 0, 0.0
    graph.replay()
    assert capture.has_template and len(spans.by_name("cuda_graph.replay")) == 1
    assert sampler.history[-1][1] == 2  # the replay span and its child
    assert sampler.measured == 1 and sampler.estimate() == estimate  # left out


def test_a_cost_that_cannot_be_read_does_not_break_the_replay(spans, monkeypatch) -> None:
    """``auto`` reads the background's cost per span at each decision; a failure there
    is reported and the replay goes on (never the application's error)."""
    from otel_flashinfer import health, pipeline

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)

    def broken(_self):  # noqa: ANN001, ANN202
        raise RuntimeError("no cost")

    monkeypatch.setattr(pipeline.Pipeline, "replay_cost_per_span_s", property(broken))
    errors = health.counters().get("graph_errors", 0)
    for _ in range(5):
        graph.replay()
    assert health.counters()["graph_errors"] > errors
    assert spans.by_name("cuda_graph.replay")  # the first replays are traced still


def test_auto_charges_a_replay_whose_tracing_failed(spans, monkeypatch) -> None:
    """A traced replay whose tracing fails (here its GPU timer) still charges the
    budget what it cost.  Uncharged, ``auto`` never measured one and traced (and
    failed on) every replay."""
    from otel_flashinfer import graphs, health, runtime

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)
    sampler = graphs._graphs[graph].sampler  # noqa: SLF001

    def broken_timer():  # noqa: ANN202
        raise RuntimeError("no timer")

    monkeypatch.setattr(runtime.current(), "replay_timer", broken_timer)
    errors = health.counters().get("graph_errors", 0)
    for _ in range(200):
        graph.replay()
    graphs._graphs[graph].settle()  # noqa: SLF001 - replays the C gate let through
    assert sampler.measured >= 1 and sampler.history[-1][1] == 0  # charged, no spans
    assert sampler.seen == 200 and sampler.skipped > 150  # within its budget again
    assert not spans.by_name("cuda_graph.replay")
    assert health.counters()["graph_errors"] > errors  # reported (logged once)


def test_auto_charges_the_bookkeeping_of_an_untraced_replay_that_asked() -> None:
    """An untraced replay that asks (the C gate did not let it through) costs the caller
    our bookkeeping: it is spent from the credit, so the next traced replay comes later."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    assert sampler.should_trace(0.0)
    sampler.traced(100e-6, 0, 0.0)  # measured: 100 us a traced replay
    assert not sampler.should_trace(1e-3)  # 10 us earned
    spent = sampler.spent_s
    sampler.charge_untraced(5e-6)
    sampler.charge_untraced(-1.0)  # a clock that went back charges nothing
    assert sampler.asked_untraced == 2
    assert sampler.spent_s - spent == pytest.approx(5e-6)
    # From -100 us (the first replay's cost) to 100 us takes 20 ms; 5 us more, 0.5 ms.
    assert not sampler.should_trace(20.3e-3)
    assert sampler.should_trace(20.6e-3)
    fixed = ReplaySampler(4, 0.01)
    fixed.charge_untraced(5e-6)  # a fixed N keeps no books
    assert fixed.spent_s == 0.0 and fixed.asked_untraced == 0


def test_untraced_replays_are_charged_only_where_the_gate_could_skip_them(
        spans, monkeypatch, wrapper_path) -> None:
    """With the C gate, every untraced replay that still reached ``replay_`` is charged,
    none that the gate let through.  Without it every replay runs that Python whatever
    is decided: charging it would save nothing and starve ``auto`` (a review measured
    90 traced replays of 4,000 fall to 1 that way), so nothing is charged."""
    from otel_flashinfer import graphs

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)
    capture = graphs._graphs[graph]  # noqa: SLF001
    sampler = capture.sampler
    asked, charges = [], []
    should_trace, charge = ReplaySampler.should_trace, ReplaySampler.charge_untraced
    monkeypatch.setattr(ReplaySampler, "should_trace",
                        lambda self, *a: asked.append(should_trace(self, *a)) or asked[-1])
    monkeypatch.setattr(ReplaySampler, "charge_untraced",
                        lambda self, s: charges.append(s) or charge(self, s))
    for _ in range(300):
        graph.replay()
    capture.settle()
    assert sampler.seen == 300
    if wrapper_path == "native":
        assert len(asked) < 300  # the gate let most through without asking
        assert len(charges) == sampler.asked_untraced == asked.count(False)
        assert all(c > 0 for c in charges)
    else:
        assert len(asked) == 300 and asked.count(False) > 250
        assert charges == [] and sampler.asked_untraced == 0


def test_charges_for_untraced_replays_have_a_floor() -> None:
    """However many untraced replays are charged (each a wall time that a GIL hand-over
    can stretch), the debt stays within what the budget earns in a second (or a few
    traced replays' cost, where that is more): tracing resumes about a second later."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    assert sampler.should_trace(0.0)
    sampler.traced(100e-6, 0, 0.0)  # credit -100 us
    spent = sampler.spent_s
    for _ in range(10_000):
        sampler.charge_untraced(20e-6)
    assert sampler.credit_s == pytest.approx(-0.01)  # a second of a 1% budget
    assert sampler.spent_s - spent == pytest.approx(0.01 - 100e-6)  # what the credit lost
    assert not sampler.should_trace(0.5)
    assert sampler.should_trace(1.1)  # 11 ms earned covers the debt and one more


def test_the_gate_is_armed_with_the_untraced_replays_charge_spent(spans, monkeypatch) -> None:
    """An untraced replay that asked is charged before the gate is armed: the deadline
    the gate gets is the one the credit after the charge calls for."""
    from otel_flashinfer import graphs

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)
    capture = graphs._graphs[graph]  # noqa: SLF001
    if capture.skip is None:
        pytest.skip("no C gate (the extension is not built)")
    sampler = capture.sampler
    for _ in range(3):
        graph.replay()  # traced until measured
    for _ in range(100):
        capture.skip.count, capture.skip.until = 0, 0.0  # the next replay asks
        charged = sampler.asked_untraced
        graph.replay()
        if sampler.asked_untraced > charged:
            break
    else:
        pytest.fail("no untraced replay that asked was charged")
    need = sampler.estimate() - sampler.credit_s
    assert capture.skip.until == pytest.approx(sampler.last_s + need / sampler.budget,
                                               abs=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_auto_earns_by_a_traced_replays_gpu_time_only_where_nothing_is_gated(
        spans, monkeypatch, gated: bool) -> None:
    """A gated graph's traced replays run the statistics launches its untraced ones
    skip: their GPU time is not what a replay takes.  ``auto`` earned by it on an H200
    and charged itself 13.25 us a replay against the 7.9 its 1% allowed; a gated graph
    leaves it unread and earns by wall time."""
    from otel_flashinfer import graphs, runtime
    from otel_flashinfer.stats.pending import ReadyPending

    class _Timer:  # a traced replay's GPU timing, as a Pending the worker applies
        def begin(self) -> int:
            return 0

        def end_handle(self, mark: int) -> ReadyPending:
            return ReadyPending([], 0)

    if gated:
        graph = _captured_with_group(monkeypatch, _GateProbe(), "auto")
    else:
        monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
        graph = _captured_step(monkeypatch)
    monkeypatch.setattr(runtime.current(), "replay_timer", lambda: _Timer())
    capture = graphs._graphs[graph]  # noqa: SLF001
    graph.replay()
    assert len(spans.by_name("cuda_graph.replay")) == 1
    assert (capture.timed is None) is gated


def test_a_wait_for_the_gpus_queue_is_not_charged() -> None:
    """Back to back the host runs a full CUDA queue ahead of the GPU, and a traced
    replay's event then waits a replay's GPU time for room: on the H100 a traced level-3
    replay's caller was charged 1.5 ms (two events, 722 us each) where its own work
    took about 40 us, and ``auto`` charged itself more than the process spent.  The
    time beyond what the enqueues took unblocked is left out; a real rise in their cost
    is followed (the floor rises 2% a traced replay)."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    sampler.traced(200e-6, 65, 0.0, setup=True, enqueue_s=(8e-6, 0.0))  # builds the templates
    for _ in range(3):
        sampler.traced(40e-6, 65, 0.5e-6, enqueue_s=(6e-6, 0.0))
    unblocked = sampler.estimate()
    for _ in range(20):
        sampler.traced(40e-6 + 1.444e-3, 65, 0.5e-6, enqueue_s=(6e-6 + 1.444e-3, 0.0))
    assert sampler.estimate() < unblocked * 1.05
    assert sampler.queue_wait_s > 20 * 1.4e-3
    assert sampler.caller.value == pytest.approx(40e-6, rel=0.35)
    for _ in range(40):  # the enqueues cost 12 us now, for good
        sampler.traced(46e-6, 65, 0.5e-6, enqueue_s=(12e-6, 0.0))
    assert sampler.floors_s[0] == pytest.approx(12e-6)
    assert sampler.caller.value == pytest.approx(46e-6, rel=0.05)


def test_enqueues_of_different_kinds_keep_floors_of_their_own() -> None:
    """One floor for all enqueues took a replay without the statistics groups' copies
    (5 us of timer events) as the floor of one with them (35 us), and charged 30 us of
    each of those as a wait for the GPU's queue (found by review)."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    for k in range(20):
        sampler.traced(60e-6, 65, 0.5e-6, enqueue_s=(5e-6, 30e-6 if k % 2 else 0.0))
    assert sampler.queue_wait_s == pytest.approx(0.0, abs=1e-9)
    assert sampler.floors_s == pytest.approx([5e-6, 30e-6])


def _queue_full_after(unblocked: int) -> type:
    """A stand-in replay timer whose first event of a replay waits 3 ms for room in
    the GPU's queue after the first ``unblocked`` replays (the host a full queue
    ahead); ``calls`` counts the replays it timed."""

    class QueueFullTimer:
        calls = 0

        def begin(self) -> int:
            QueueFullTimer.calls += 1
            if QueueFullTimer.calls > unblocked:
                time.sleep(0.003)
            return 0

        def end_handle(self, mark: int) -> None:
            return None

    return QueueFullTimer


def test_a_gated_graphs_queue_waits_stay_charged(spans, monkeypatch) -> None:
    """A gated graph's traced replays run the statistics launches its untraced ones
    skip (+74% of the GPU's time on the H100's decode step), which no other charge
    sees: back to back, the host's waits in the GPU's queue stand for that time, and
    stay charged there."""
    from otel_flashinfer import graphs, runtime

    _QueueFullTimer = _queue_full_after(2)

    graph = _captured_with_group(monkeypatch, _GateProbe(), "auto")
    monkeypatch.setattr(runtime.current(), "replay_timer", lambda: _QueueFullTimer())
    capture = graphs._graphs[graph]  # noqa: SLF001
    assert capture.gates
    for _ in range(5):
        capture.sampler.credit_s = 1.0  # traced: asked, not let through by the C gate
        if capture.skip is not None:
            capture.skip.count, capture.skip.until = 0, 0.0
        graph.replay()
    assert _QueueFullTimer.calls == 5 and capture.sampler.measured >= 3
    assert capture.sampler.queue_wait_s == 0.0
    assert max(c for c, _, _ in capture.sampler.history) > 0.003  # the waits, charged


def test_a_replay_that_made_no_spans_sets_no_floor(spans, monkeypatch) -> None:
    """A traced replay under a parent that is not sampled makes no spans and enqueues
    less; as a floor it made the next replays' real enqueue time a queue wait."""
    from opentelemetry import trace as trace_api

    from otel_flashinfer import graphs, runtime

    class _Timer:
        def begin(self) -> int:
            return 0

        def end_handle(self, mark: int) -> None:
            return None

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    graph = _captured_step(monkeypatch)
    monkeypatch.setattr(runtime.current(), "replay_timer", lambda: _Timer())
    sampler = graphs._graphs[graph].sampler  # noqa: SLF001
    unsampled = trace_api.NonRecordingSpan(trace_api.SpanContext(
        5, 6, False, trace_api.TraceFlags(0)))
    with trace_api.use_span(unsampled):
        graph.replay()
    assert sampler.measured == 1 and sampler.history[-1][1] == 0  # traced, no spans
    assert sampler.floors_s == [math.inf, math.inf] and sampler.queue_wait_s == 0.0


def test_auto_traces_as_many_replays_while_the_host_runs_the_gpus_queue_full(
        spans, monkeypatch) -> None:
    """A graph whose traced replays' timer waits 3 ms for room in the GPU's queue (a
    stand-in: the host a full queue ahead) is charged what the work took, not the
    wait: charged, ``auto`` traced 7 of these 400 replays (275 on this box now)."""
    from otel_flashinfer import graphs, runtime

    _QueueFullTimer = _queue_full_after(3)

    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_EVERY", "auto")
    monkeypatch.setenv("OTEL_FLASHINFER_REPLAY_BUDGET", "0.05")
    graph = _captured_step(monkeypatch)
    monkeypatch.setattr(runtime.current(), "replay_timer", lambda: _QueueFullTimer())
    sampler = graphs._graphs[graph].sampler  # noqa: SLF001
    for _ in range(400):
        graph.replay()
        time.sleep(0.0005)  # the GPU's time, as wall
    print(f"\ntraced {_QueueFullTimer.calls} of 400")
    assert _QueueFullTimer.calls > 50
    assert sampler.queue_wait_s >= 0.5 * 0.003 * (_QueueFullTimer.calls - 3)
    assert sampler.caller.value < 1e-3, sampler.history


class _OnceGraph(_FakeGraph):
    """Refuses a second capture without ``reset``, as torch does for a graph that
    still owns its executable."""

    captured = False

    def capture_begin(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if self.captured:
            raise RuntimeError("This CUDAGraph instance already owns a captured graph")
        self.captured = True


def test_a_refused_capture_keeps_the_graphs_last_capture(spans, monkeypatch) -> None:  # noqa: ANN001
    """torch refuses to capture again into a graph that still has its executable: that
    graph replays its last capture, whose rows and nodes we must keep (dropping them
    freed memory its statistics nodes still write into), and its replays stay traced."""
    from otel_flashinfer import graphs

    graph = _captured_step(monkeypatch, _OnceGraph)
    capture = graphs._graphs[graph]  # noqa: SLF001
    with pytest.raises(RuntimeError, match="already owns"):
        graph.capture_begin()
    assert graphs._graphs[graph] is capture and graphs.capture_state() is None  # noqa: SLF001
    assert otel_flashinfer.flush(10)
    spans.exporter.clear()
    graph.replay()
    assert otel_flashinfer.flush(10)
    assert sorted(s.name for s in spans.exporter.get_finished_spans()) == [
        "cuda_graph.replay", "step"]


def test_auto_stays_within_budget_while_the_price_is_learnt_slowly() -> None:
    """The background's price per span takes four drains and the sender's own estimate
    to be known: seconds, where drains gather a quarter second.  Until then a traced
    replay was priced at the caller's time alone (tens of microseconds), so one in
    four was traced, and of their spans' debt all but a second's budget was forgiven:
    1.86% of the replays' time at level 3 on an H100 against a 1% budget.  While no
    price is known, spans are priced provisionally (``PROVISIONAL_PER_SPAN_S``)."""
    sampler = ReplaySampler(REPLAY_AUTO, 0.01)
    period, caller, spans, price, now = 720e-6, 25e-6, 65, 2.2e-6, 0.0
    cost = 0.0  # what tracing really cost: the caller's time and every span's
    replays = 3000  # 2.2 s, the price known after 1.5 s
    for i in range(replays):
        known = price if now >= 1.5 else 0.0
        if sampler.should_trace(now, known, period if i else None):
            sampler.traced(1e-3 if i == 0 else caller, spans, known, setup=i == 0)
            if i:
                cost += caller + spans * price
        now += period
    assert cost / now <= 0.0105, cost / now
    assert cost / now >= 0.005, cost / now  # not starved either
