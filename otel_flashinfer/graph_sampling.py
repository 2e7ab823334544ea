"""Which CUDA graph replays to trace (``OTEL_FLASHINFER_REPLAY_EVERY``).

A fixed ``N`` traces one replay in N.  ``auto`` traces as many as a budget allows: the
tracing of replays may cost ``OTEL_FLASHINFER_REPLAY_BUDGET`` (default 1%) of the
replays' time.  It is a token bucket: the replays since the last traced one earn
``budget x`` the longer of the host's time since then and their number times the GPU's
time a replay takes (``gpu_s``, learnt from traced replays' GPU times; back to back the
host enqueues replays far ahead of the GPU, and earning by its time alone traced a
quarter of what the budget allows, 8 of 1,000 on the device).  A replay is traced when
the credit covers what tracing one costs, and its measured cost is then spent.  Credit
is earned by the replays since the last traced one, not by which of them asked, so the
replays the C gate lets through (``arm``) change no decision in this logic; in the
wrapper, an untraced replay that asked where the gate could have let it through also
spends its own bookkeeping (``charge_untraced``).  What one costs is
measured, not assumed: the
caller's own time around the replay (not the replay itself), plus the background
worker's and the sender's CPU per replay span (``Pipeline.replay_cost_per_span_s``) for
each span it hands on (until the background's price is known, a provisional one,
settled once it is: ``PROVISIONAL_PER_SPAN_S``).  The traced replay that builds the
graph's templates sets up: it is neither charged nor taken as the estimate, and the
next is traced to measure.
So when the workload changes (longer steps, more captured calls, a slower exporter),
the share traced follows.

Every replay span says how many replays of its graph were skipped before it
(``flashinfer.cuda_graph.replays_skipped``), so rates stay computable downstream.
Pure logic, fed times by ``graphs``: testable without a GPU.
"""

from __future__ import annotations

import math
from typing import Any

from .config import REPLAY_AUTO

#: Estimates move by this share of each new measurement (smooths one slow replay).
_SMOOTHING = 0.2


def smoothed(last: float | None, sample: float) -> float:
    """An estimate after one more measurement: the first one (``last`` None or 0) as it
    is, later ones moving it by ``_SMOOTHING`` of the difference.  A replay's GPU time
    and, through ``CostEstimate``, the costs ``auto`` charges are kept this way."""
    return sample if not last else last + _SMOOTHING * (sample - last)


#: After the left-out first sample, a cost estimate starts from the lowest of this
#: many: one-time work may reach past the first drain (two of them on the device).
_SEED_FROM = 3


class CostEstimate:
    """A smoothed cost per unit that one-time work cannot hold up.

    The first batch a thread hands on, and the first replay a graph traces, pay
    one-time work: imports, opening the file or the connection, encoding the graph's
    templates, a full garbage collection.  Taken as the estimate, that (10 to 190x the
    steady cost on the device) made ``auto`` wait thousands of replays for the credit
    to trace the next one, and with few traced replays there were few samples to
    correct it: 0 of 500 replays traced, and, with only the first sample left out, 2
    of 2,400 after one costly drain more (H100, level 1).  So the first sample is left
    out and the estimate starts from the lowest of the next ``_SEED_FROM``; from then
    on it is smoothed (``smoothed``), which tracks the mean: spans are charged at it,
    and an estimate below the mean spends more than the budget (a median of the latest
    drains spent 1.7% of the time against 1% when one drain in three cost 5x; a rule
    that started it again after three cheap drains in a row spent 1.4 to 1.9% when a
    costly one followed every three).  ``value`` is 0.0 until known, or another
    estimate's (``carry``) until this one's seed is in.  ``warmup=False`` keeps every
    sample and knows the value from the first (a caller that knows which one was
    setup)."""

    __slots__ = ("_seed", "_warmup", "value")

    def __init__(self, warmup: bool = True) -> None:
        self.value = 0.0
        self._warmup = warmup
        #: The steady samples the estimate will start from (None: it has started).
        self._seed: list[float] | None = [] if warmup else None

    def carry(self, previous: CostEstimate) -> None:
        """Stand in with ``previous``'s value until this estimate's own is known (a
        new sender after a re-plan: at 0.0 meanwhile, its spans were charged nothing)."""
        if not self.value:
            self.value = previous.value

    def add(self, sample: float) -> None:
        if self._warmup:
            self._warmup = False
            return
        seed = self._seed
        if seed is not None:
            seed.append(sample)
            if len(seed) < _SEED_FROM:
                return
            sample, self._seed = min(seed), None
            self.value = 0.0  # a carried value is not this estimate's to smooth
        self.value = smoothed(self.value, sample)


#: While a traced replay's GPU time waits to be read, one replay in this many asks.
LEARN_EVERY = 16
#: The gate's count stays far below its C ``long long`` (a tiny budget would not fit).
_MAX_COUNT = 1 << 40

#: Credit never exceeds this many traced replays' cost: an idle minute must not buy a
#: burst of traced replays when the graph starts again.
_MAX_BURST = 4.0

#: Spans traced before their price was known leave at most what the budget earns in
#: this many seconds as debt (or a burst's worth, where that is more).
_MAX_DEBT_S = 1.0

#: What a span handed on is charged while the background's price is not known yet
#: (four drains and the sender's own estimate: up to seconds, where drains gather a
#: quarter second), settled at that price once it is.  Priced at nothing meanwhile, a
#: traced replay cost only the caller's time, one replay in four was traced, and all
#: but ``_MAX_DEBT_S`` of their spans' debt was forgiven: 1.86% against a 1% budget at
#: level 3 (H100, 3,000 replays).  Above every price measured so far (0.8 to 2.2 us on
#: the H100s and the CPU box), so that learning traces fewer replays, not more.
PROVISIONAL_PER_SPAN_S = 3e-6
#: The floor under a traced replay's CUDA enqueues (``ReplaySampler.queue_wait``) rises
#: by this factor at each traced replay, so that it follows a real rise in their cost
#: (doubled in 35 traced replays) while one blocked enqueue cannot raise it.
_FLOOR_RISE = 1.02


class ReplaySampler:
    """One graph's decision per replay; call ``should_trace`` at every replay and
    ``traced`` after each traced one."""

    __slots__ = ("asked_untraced", "budget", "caller", "credit_s", "every", "floors_s",
                 "gpu_s", "history", "last_s", "measured", "per_span_s", "queue_wait_s",
                 "seen", "skipped", "spans", "spent_s", "tail_s", "unpriced", "window_seen")

    def __init__(self, every: int, budget: float) -> None:
        self.every = every
        self.budget = budget
        #: The replaying thread's time a traced replay (setup left out by ``traced``).
        self.caller = CostEstimate(warmup=False)
        #: Spans the last traced replay handed on, and the background's latest cost per
        #: span (0.0 until the pipeline knows it): ``estimate`` prices them each time.
        self.spans = 0
        self.per_span_s = 0.0
        #: Spans handed on while their cost per span was unknown, charged once known.
        self.unpriced = 0
        #: Traced replays whose cost was measured; replays are traced until one was.
        self.measured = 0
        #: The first and the latest measurements, (caller s, spans, worker s per span),
        #: for benchmarks and debugging: what the estimate was made of.
        self.history: list[tuple[float, int, float]] = []
        #: Credit banked at the last traced replay (less what was spent since), and
        #: when that replay started and its ``seen``: the window the later ones earn in.
        self.credit_s = 0.0
        self.last_s: float | None = None
        self.window_seen = 0
        self.seen = 0
        #: The GPU's time a replay of this graph takes, smoothed (0.0: not known yet).
        self.gpu_s = 0.0
        #: Replays skipped since the last traced one.
        self.skipped = 0
        #: The caller's time after the last ``traced`` (this bookkeeping itself),
        #: charged with the next traced replay's cost (``charge_tail``).
        self.tail_s = 0.0
        #: Everything charged so far: set against the process's measured CPU, it says
        #: how much of what tracing costs the charges see (``bench_graph_step``).
        self.spent_s = 0.0
        #: Untraced replays that asked (the C gate did not let them through), each
        #: charged its bookkeeping (``charge_untraced``).
        self.asked_untraced = 0
        #: What a traced replay's CUDA enqueues take unblocked, the timer's and the
        #: statistics groups' apart (``queue_wait``), and the time beyond them that the
        #: caller waited for the GPU's queue, left uncharged.
        self.floors_s = [math.inf, math.inf]
        self.queue_wait_s = 0.0

    @property
    def auto(self) -> bool:
        return self.every == REPLAY_AUTO

    def estimate(self) -> float:
        """What tracing one more replay costs: the caller's smoothed time and the last
        replay's spans at the background's latest cost per span (provisional until
        known)."""
        return self.caller.value + self.spans * (self.per_span_s or PROVISIONAL_PER_SPAN_S)

    def _price(self, per_span_s: float | None) -> None:
        """Take the background's cost per span (None: unchanged), and settle the spans
        handed on before it was known (charged ``PROVISIONAL_PER_SPAN_S`` each)."""
        if per_span_s is None:
            return
        self.per_span_s = max(per_span_s, 0.0)
        if self.unpriced and self.per_span_s > 0:
            owed = self.unpriced * (self.per_span_s - PROVISIONAL_PER_SPAN_S)
            if owed > 0:
                # A bounded debt: replays traced before the price was known may be
                # thousands, and a debt of seconds would stop tracing for minutes.  It
                # is paid back within about ``_MAX_DEBT_S``.  Capped at a burst's worth
                # instead, the first 31 traced replays' spans went 85% unpaid on the
                # CPU box (4.6 of 5.4 ms), 1.5 us a replay over a 3,000-replay run.
                owed = min(owed, max(self.credit_s - self._debt_floor(), 0.0))
            self._spend(owed)  # below 0: what the provisional price overcharged
            self.unpriced = 0

    def _debt_floor(self, spent_s: float = 0.0) -> float:
        """The lowest the credit goes: a burst's worth of traced replays (or of
        ``spent_s``), or what the budget earns in ``_MAX_DEBT_S``, whichever is more.
        One floor for every charge: with a lower one for late-priced spans than for
        untraced asks, an ask during that debt was charged nothing."""
        return -max(_MAX_BURST * max(self.estimate(), spent_s), self.budget * _MAX_DEBT_S)

    def should_trace(self, now_s: float, per_span_s: float | None = None,
                     gpu_s: float | None = None) -> bool:
        """At a replay's start (``now_s``: a monotonic clock in seconds; ``per_span_s``:
        the background's cost per span now, as ``traced`` takes it; ``gpu_s``: a traced
        replay's GPU time that came in since, if one did)."""
        self.seen += 1
        if not self.auto:
            trace = (self.seen - 1) % self.every == 0
        else:
            self._price(per_span_s)
            if gpu_s is not None and gpu_s > 0:
                self.gpu_s = smoothed(self.gpu_s, gpu_s)
            cost = self.estimate()
            available = self.available(now_s)
            # Until one replay measured what tracing one costs, every replay is traced.
            trace = not self.measured or available >= cost
            if trace or self.last_s is None:  # bank what the window earned; a new one
                self.credit_s = min(available, _MAX_BURST * cost) if self.measured \
                    else available
                self.last_s, self.window_seen = now_s, self.seen
        if not trace:
            self.skipped += 1
        return trace

    def available(self, now_s: float) -> float:
        """The credit at ``now_s`` for the replay being asked about: the banked credit
        and what the replays since the last traced one (this one included) earned."""
        if self.last_s is None:
            return self.credit_s
        replays = self.seen - self.window_seen
        return self.credit_s + self.budget * max(now_s - self.last_s, replays * self.gpu_s)

    def charge_tail(self, tail_s: float) -> None:
        """The caller's time spent after ``traced`` measured the replay (the sampler's
        own bookkeeping): spent now, and in the estimate of what the next one costs.
        Left out, with the time before the sampler was asked, it was a quarter of what
        a traced replay cost the caller, paced (CPU box)."""
        if self.auto:
            self.tail_s = max(tail_s, 0.0)
            self._spend(self.tail_s)

    def _spend(self, spent_s: float) -> None:
        """Takes ``spent_s`` from the credit and books it in ``spent_s``."""
        self.credit_s -= spent_s
        self.spent_s += spent_s

    def charge_untraced(self, spent_s: float) -> None:
        """An untraced replay that asked: our bookkeeping on the caller's thread before
        it (folding in the gate's count, the decision), spent now: a few microseconds
        in Python, for the replays the C gate does not let through.  Before ``arm``,
        so that the gate's deadline is set with it spent."""
        if self.auto:
            spent_s = max(spent_s, 0.0)
            # A floor under the debt, a safety net: a charge is wall time, which a GIL
            # hand-over or a preemption inside it stretches, and no run of those may
            # stop tracing for long (``_debt_floor``).
            floor = self._debt_floor(spent_s)
            credit = max(self.credit_s - spent_s, min(floor, self.credit_s))
            self._spend(self.credit_s - credit)
            self.asked_untraced += 1

    def passed(self, n: int) -> None:
        """``n`` replays went untraced without asking (``arm`` said they would be)."""
        self.seen += n
        self.skipped += n

    def arm(self, skip: Any, learning: bool = False) -> None:
        """Say on ``skip`` (the C gate's ``GraphSkip``) which of the next replays are
        surely untraced, so that they go straight to torch: the ``every - 1`` after a
        traced one (fewer after an untraced one), or with ``auto`` every replay until
        the credit they earn covers a traced one's cost (never, with no budget).  Their
        number comes back through ``passed``; a replay past them asks again.  Credit is
        earned by time, so what the replays in between would have earned adds up to
        what the next one that asks finds (``until`` is in ``should_trace``'s clock,
        ``perf_counter``: the gate reads CLOCK_MONOTONIC, the same one on Linux).  Once a
        replay's GPU time is known, each replay earns at least that much: the gate also
        gets the ``count`` of replays that earn the rest, and stops at whichever of the
        two comes first.  ``learning``: a traced replay's GPU time is still to be read
        (only a replay that asks reads it), so one in ``LEARN_EVERY`` asks meanwhile:
        armed by the deadline alone, a host far ahead of the GPU went thousands of
        replays without one asking, and never learnt the time it earns by."""
        if not self.auto:
            skip.count = (self.every - self.seen % self.every) % self.every
        elif self.measured and self.last_s is not None:
            need = self.estimate() - self.credit_s  # what the window must earn
            if need <= 0:
                return
            count = None
            earned = self.budget * self.gpu_s
            if earned > 0:
                # The window's replays so far, then n gated and the one that asks.
                count = math.ceil(min(need / earned, _MAX_COUNT)) \
                    - (self.seen - self.window_seen) - 1
                if count <= 0:
                    return  # the next replay earns enough: it asks
            if learning:
                count = LEARN_EVERY if count is None else min(count, LEARN_EVERY)
            if count is not None:
                skip.count = count
            skip.until = self.last_s + need / self.budget if self.budget > 0 else math.inf

    def take_skipped(self) -> int:
        """Replays skipped before this traced one (said on its span); resets."""
        skipped, self.skipped = self.skipped, 0
        return skipped

    def queue_wait(self, enqueue_s: tuple[float, float]) -> float:
        """Of ``enqueue_s``, the time a traced replay that made its spans spent in its
        CUDA enqueues (the timer's events, then the statistics groups' copies, each
        against a floor of its own), what was a wait for room in the GPU's queue: the
        time beyond the least each has taken (risen by ``_FLOOR_RISE`` a traced replay
        since).  Back to back the host runs a full queue ahead of the
        GPU, and each enqueue then waits for a replay to finish (722 us on the
        H100's decode step): the replay's own launch would have waited that long in its
        place (the loop's wall is unchanged), but charged, it made a traced level-3
        replay's caller cost 1.5 ms where its work took about 40 us: ``auto`` charged
        itself 7.05 us a replay where the process spent 6.2 more than at level 0, and
        its estimate (1.74 ms a traced replay) swung with each wait.  Not asked for a
        gated graph (level 5): its traced replays add the statistics' GPU time, which
        the host's waits then stand for (``graphs``)."""
        if not self.auto:
            return 0.0
        waited = 0.0
        floors = self.floors_s
        for k, spent in enumerate(enqueue_s):
            if spent > 0.0:  # (none: nothing of that kind enqueued, no floor learnt)
                floors[k] = min(floors[k] * _FLOOR_RISE, spent)
                waited += spent - floors[k]
        self.queue_wait_s += waited
        return waited

    def traced(self, caller_s: float, spans: int, worker_per_span_s: float,
               setup: bool = False, enqueue_s: tuple[float, float] = (0.0, 0.0)) -> None:
        """What tracing the replay just traced cost: ``caller_s`` on the replaying
        thread (less what ``queue_wait`` finds of ``enqueue_s``, the part of it in CUDA
        enqueues, was a wait for the GPU's queue), and ``spans`` handed to the worker at
        ``worker_per_span_s`` each.  ``setup``: this replay built the graph's templates,
        a one-time cost that is neither charged nor taken as the estimate."""
        if not self.auto:
            return
        caller_s -= self.queue_wait(enqueue_s)
        if len(self.history) >= 8:
            del self.history[4]  # keeps the first four and the latest four
        self.history.append((caller_s, spans, worker_per_span_s))
        if setup:
            return
        self.measured += 1
        caller_s = max(caller_s, 0.0)
        self._spend(caller_s)
        self.caller.add(caller_s + self.tail_s)  # its tail is charged by ``charge_tail``
        self._price(worker_per_span_s)
        if spans > 0:
            self.spans = spans
            if self.per_span_s > 0:
                self._spend(spans * self.per_span_s)
            else:  # settled by ``_price`` once the price is known
                self.unpriced += spans
                self._spend(spans * PROVISIONAL_PER_SPAN_S)
