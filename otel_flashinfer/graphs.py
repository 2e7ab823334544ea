"""CUDA graph bookkeeping: which calls were captured into which graph, and one
``cuda_graph.replay`` span per sampled replay with a child per captured call.

Host code never runs again when a captured graph replays, so a capture-time span
alone would hide every later execution.  We patch ``torch.cuda.CUDAGraph``'s
``capture_begin``/``capture_end``/``replay`` (what ``torch.cuda.graph(...)`` and
``make_graphed_callables`` use), note the calls traced while a capture is open,
and on each sampled replay emit the replay span and its children, each linked to
its capture-time span.  Work captured with a call (statistics, GPU timing) is
handed back per replay through ``Capture.replay_hooks``.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from random import getrandbits
from time import perf_counter, time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.trace import Link

from . import capture_guard, health
from .graph_rng import RngWatch
from .graph_sampling import ReplaySampler
from .pipeline import TIME_ATTR, CallRecord, ReplayRecord

_ids = itertools.count(1)
_capturing: Capture | None = None
_graphs: weakref.WeakKeyDictionary[Any, Capture] = weakref.WeakKeyDictionary()
#: graph -> its ``_hotpath.GraphSkip``, read by the C ``ReplayGate`` (``patch``).
_skips: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_originals: dict[str, Any] = {}
#: Graphs made with ``keep_graph=True`` by us, not their maker (``_keep_for_nodes``):
#: their capture ends by instantiating them, as torch's would have.
_kept_by_us: weakref.WeakSet[Any] = weakref.WeakSet()
#: graph -> the generators handed to its ``register_generator_state`` (``patch``): with
#: the capture device's default one, those whose offsets show whether a replay drew
#: random numbers (``graph_rng.RngWatch``).
_registered_generators: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
#: Run before a capture begins and before it ends, by owner (``set_capture_hooks``).
_capture_hooks: dict[str, tuple[Callable[[], None] | None, Callable[[], None] | None]] = {}


class Capture:
    """The calls captured into one graph, and what each replay must resolve."""

    def __init__(self, graph_id: int) -> None:
        self.graph_id = graph_id
        self.thread = threading.get_ident()
        self.records: list[CallRecord] = []
        #: record id -> its caller-side attributes, copied when it was added (the
        #: worker writes to the record's own dict later, while replays read these).
        self.attributes: dict[int, dict[str, Any]] = {}
        #: record -> callables(stream, child) returning a Pending for one replay (the
        #: stream is None: the current one, where the replay ran);
        #: ``child`` is that replay's span record of the captured call (its ids,
        #: start time and attributes are set; hooks may read them, not submit it).
        self.replay_hooks: dict[int, list[Callable[[Any, CallRecord], Any]]] = {}
        self.any_hooks = False
        self.replays = 0
        #: Which replays are traced (set when the capture begins, from the settings).
        self.sampler: ReplaySampler | None = None
        #: The C gate's state for this graph (``_hotpath.GraphSkip``): the replays the
        #: sampler says are untraced, which skip ``replay_``; None without the gate.
        self.skip: Any = None
        #: The attributes of the last traced replay timed on the GPU: the worker adds
        #: its GPU time there, which ``auto`` then learns from (``_replay_gpu_s``).
        self.timed: dict[str, Any] | None = None
        #: ``health.dropped()`` when this graph's last replay span was made.
        self.dropped_seen = health.dropped()
        #: Hooks that read the child record they are given (level 10's manifests name
        #: its span): their replays make the children here, not on the worker.
        self.hooks_need_child = False
        #: Work that serves many captured calls at once (a graph's statistics rows,
        #: ``stats.graph_rows``): ``seal()`` when the capture ends, and after each traced
        #: replay ``replay(None)`` gives (record id, Pending) for the children.
        self.groups: dict[Any, Any] = {}
        #: Groups whose captured work skips untraced replays: told before each replay
        #: whether it is traced (``set_gate``), set when the capture ends.
        self.gates: tuple[Any, ...] = ()
        self.gate_lock = threading.Lock()
        #: How a replay through torch shows whether the graph drew random numbers
        #: (``graph_rng.RngWatch``, set when the capture begins; None: it cannot,
        #: and no copy of the graph replaces torch's replay), and the capture's device.
        self.rng_watch: Any = None
        self.device: int | None = None
        #: The gated graph's executable copy without its statistics nodes, which
        #: untraced replays launch (``stats.lean_graph.LeanGraph``), made when the
        #: capture ends; None where there is none (the nodes are switched instead).
        self.lean: Any = None
        self._lean_failed_seen = 0
        self._template: tuple[tuple[CallRecord, ...], tuple[tuple, ...]] | None = None
        self._index: dict[int, int] = {}

    def settle(self) -> None:
        """Count the replays the C gate sent straight to torch since the last one that
        came through ``replay_`` (their indices, and the sampler's seen and skipped)."""
        skip = self.skip
        if skip is not None and skip.skipped:
            passed, skip.skipped = skip.skipped, 0
            self.replays += passed
            if self.sampler is not None:
                self.sampler.passed(passed)

    def add(self, record: CallRecord) -> None:
        # The wrapper gave a captured call its own attributes (``CallRecord.own``).
        self.attributes[id(record)] = dict(record.attributes)
        self.records.append(record)
        self._template = None

    @property
    def has_template(self) -> bool:
        """Whether ``template`` was made (the first traced replay makes it)."""
        return self._template is not None

    def template(self) -> tuple[tuple[CallRecord, ...], tuple[tuple, ...]]:
        """(prototypes, their replay hooks), made once: per captured call a read-only
        record that each replay's child is made from (``pipeline.ReplayRecord``): its
        name, attributes but the replay index, link to the capture-time span and
        capture-time argument snapshots."""
        template = self._template
        if template is None:
            protos = []
            for captured in self.records:
                attrs = {k: v for k, v in self.attributes[id(captured)].items()
                         if k != "flashinfer.cuda_graph.capturing"}
                proto = CallRecord(captured.name, 0, 0, None, 0, 0, attrs,
                                   describe=captured.describe)
                proto.data, proto.kw, proto.result = captured.data, captured.kw, captured.result
                proto.links = [Link(trace_api.SpanContext(
                    captured.trace_id, captured.span_id, False,
                    trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)))]
                proto.shared = True  # never written: the encoder keeps its block
                protos.append(proto)
            template = (
                tuple(protos),
                tuple(tuple(self.replay_hooks.get(id(c), ())) for c in self.records))
            #: Whether any captured call has a replay hook (most graphs: none).
            self.any_hooks = any(template[1])
            self._index = {id(c): i for i, c in enumerate(self.records)}
            # Last: another thread replaying this graph takes the template as made once
            # it sees it, and reads ``any_hooks`` and ``_index`` with it.
            self._template = template
        return template

    def replay_stamper(self) -> Any:
        """The group that stamps a traced replay's GPU time into its own pending, if
        one can now (``stats.graph_rows.GraphRows.times_replay``): the replay then
        needs no event pair around it."""
        for group in self.groups.values():
            times = getattr(group, "times_replay", None)
            if times is not None and times():
                return group
        return None

    def group(self, key: Any, make: Callable[[], Any]) -> Any:
        """The replay group ``key`` of this capture, made by ``make`` the first time."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = make()
        return group

    def seal(self, graph: Any = None) -> None:
        """The capture of ``graph`` has ended: the groups set up what their replays
        need, and gated ones learn the graph (``bind_graph``)."""
        for group in self.groups.values():
            try:
                group.seal()
            except Exception as exc:  # noqa: BLE001
                health.report("graph_errors", "could not finish a CUDA graph capture", exc)
        self.gates = tuple(g for g in self.groups.values() if getattr(g, "gated", False))
        for gate in self.gates if graph is not None else ():
            bind = getattr(gate, "bind_graph", None)
            if bind is not None:
                try:
                    bind(graph)
                except Exception as exc:  # noqa: BLE001
                    health.report("graph_errors", "could not finish a CUDA graph capture", exc)
        build = getattr(self.gates[0], "build_lean", None) if self.gates else None
        if graph is not None and build is not None and graph in _kept_by_us:
            # Only a graph kept for us: a maker who kept their own may edit it and
            # instantiate again, which a copy made now would not follow.
            try:
                self.lean = build(graph, self.gates, self.device, self.rng_watch)
            except Exception as exc:  # noqa: BLE001 - the nodes are switched instead
                health.report("graph_lean_refused",
                              "a CUDA graph's untraced replays switch its statistics nodes "
                              "off instead of leaving them out", exc)

    def close_lean(self) -> None:
        """The copy is never launched again (torch's graph is going, or it failed).  A
        C gate armed for it is disarmed: armed so, it does not check the word."""
        lean, self.lean = self.lean, None
        skip = self.skip
        if skip is not None:
            skip.lean_exec = 0
            skip.count, skip.until = 0, 0.0
        if lean is not None:
            lean.close()

    def lean_ready(self, skip: Any) -> bool:
        """Whether an untraced replay may launch the copy without statistics (it is
        proven, ``LeanGraph.ready``, and the C gate's launches have not failed)."""
        if skip is not None and skip.lean_failed != self._lean_failed_seen:
            self._lean_failed_seen = skip.lean_failed
            health.report("graph_errors", "could not replay a CUDA graph without its "
                          "statistics (C gate)")
            self.close_lean()
            return False
        lean = self.lean
        return lean is not None and lean.ready

    def lean_untraced(self, skip: Any) -> bool:
        """An untraced replay through the copy (``lean_ready`` said so); False where its
        launch failed (reported, the copy dropped: replay through torch).  Arms ``skip``
        so that the C gate launches the copy for the next untraced replays."""
        lean = self.lean
        try:
            lean.launch()
        except Exception as exc:  # noqa: BLE001 - torch's replay goes instead
            health.report("graph_errors", "could not replay a CUDA graph without its "
                          "statistics", exc)
            self.close_lean()
            return False
        if skip is not None:
            skip.gate_key = None  # the copy reads no word
            skip.gate_closed = -1
            skip.lean, skip.lean_exec, skip.lean_device = lean.launcher, lean.exec, lean.device
        return True

    def torch_replay(self, replay: Callable[..., Any], graph: Any, args: Any,
                     kwargs: Any) -> Any:
        """torch's replay of a gated graph; the first while its copy waits for proof
        tells whether the graph draws random numbers (``LeanGraph.proven``)."""
        lean = self.lean
        if lean is None or not lean.pending:
            return replay(graph, *args, **kwargs)
        result, drew_nothing = lean.watch.run(lambda: replay(graph, *args, **kwargs))
        lean.proven(drew_nothing)
        return result

    def open_gates(self, traced: bool) -> None:
        """Before a replay: the gated groups' captured work runs only if ``traced``."""
        for gate in self.gates:
            try:
                gate.set_gate(traced)
            except Exception as exc:  # noqa: BLE001
                health.report("graph_errors", "could not gate a CUDA graph replay", exc)

    def arm_gate(self, skip: Any) -> bool:
        """After an untraced replay closed the gated group's word: tell the C gate
        ``skip`` how to check it is still closed for the replay's stream (``GraphSkip``),
        so that armed replays need not come through Python to keep it shut.  False
        where it cannot (several gated groups, no device word, a failed gate): every
        replay of the graph then comes through ``replay_``."""
        if len(self.gates) != 1:
            return False
        try:
            closed = getattr(self.gates[0], "closed_gate", None)
            got = closed() if closed is not None else None
            if got is None:
                return False
            skip.gate_key, skip.gate_device, skip.gate_closed = got
            skip.lean = None  # armed by the word, not for a copy
            return True
        except Exception as exc:  # noqa: BLE001
            health.report("graph_errors", "could not arm the CUDA graph replay gate", exc)
            return False

    def group_pendings(self) -> tuple[list[Any] | None, list[list[Any] | None] | None]:
        """After a traced replay: the groups' Pendings for the whole replay, and each
        child's own from a group that could not serve the replay (None: none)."""
        whole: list[Any] | None = None
        out: list[list[Any] | None] | None = None
        for group in self.groups.values():
            got = group.replay(self._index)
            if type(got) is not list:
                whole = [got] if whole is None else [*whole, got]
                continue
            if out is None:
                out = [None] * len(self.records)
            for i, pending in got:
                out[i] = [pending] if out[i] is None else [*out[i], pending]
        return whole, out

    def add_replay_hook(self, record: CallRecord,
                        hook: Callable[[Any, CallRecord | None], Any],
                        needs_child: bool = True) -> None:
        """Run ``hook(stream, child)`` after each sampled replay, for the child span of
        the captured call ``record``; a Pending it returns is added to that child.
        ``needs_child=False``: the hook ignores ``child`` (it is then None), which lets
        the worker make the children instead of the replaying thread."""
        self.replay_hooks.setdefault(id(record), []).append(hook)
        self.hooks_need_child = self.hooks_need_child or needs_child
        self._template = None


def set_capture_hooks(owner: str, before_begin: Callable[[], None] | None = None,
                      before_end: Callable[[], None] | None = None) -> None:
    """Work around every capture, one pair per ``owner`` (a later call replaces it):
    ``before_begin`` for what must not run while a capture is open (taking a stream from
    torch's pool), ``before_end`` for what a capture cannot end without (joining a
    stream a hook forked).  Both None: the owner's hooks are removed."""
    if before_begin is None and before_end is None:
        _capture_hooks.pop(owner, None)
    else:
        _capture_hooks[owner] = (before_begin, before_end)


def _run_capture_hooks(which: int) -> None:
    for hooks in list(_capture_hooks.values()):
        hook = hooks[which]
        if hook is None:
            continue
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - never break the application's capture
            health.report("graph_errors", "a CUDA graph capture hook failed", exc)


def capture_state() -> Capture | None:
    """The capture open on this thread, if any (read on every traced call)."""
    capture = _capturing
    if capture is None or capture.thread != threading.get_ident():
        return None
    return capture


_waiting_for_torch: list[Any] = []  # [runtime] while a torch import would patch
_torch_hook_registered = False


def _on_torch_import(_module: Any) -> None:
    if _waiting_for_torch:
        try:
            patch(*_waiting_for_torch)
        except Exception as exc:  # noqa: BLE001 - never break the application's import
            health.report("graph_errors", "could not hook CUDA graph replays", exc)


def patch(runtime: Any, gate_types: tuple[Any, Any] | None = None) -> None:
    """Install the CUDAGraph hooks (idempotent); no-op without torch.cuda.

    Where torch is not imported yet (start-up hook, level 1), the hooks go in when the
    application imports it: a process that never uses torch does not pay its import.
    ``gate_types``: the C hot path's (ReplayGate, GraphSkip) (``native``), which let
    replays the sampler says are untraced skip the Python ``replay_``.
    """
    global _torch_hook_registered
    if "torch" not in sys.modules:
        _waiting_for_torch[:] = [runtime, gate_types]
        if not _torch_hook_registered:
            import wrapt

            wrapt.register_post_import_hook(_on_torch_import, "torch")
            _torch_hook_registered = True
        return
    _waiting_for_torch.clear()
    try:
        import torch
    except ImportError:
        return
    graph_cls = getattr(getattr(torch, "cuda", None), "CUDAGraph", None)
    if graph_cls is None or _originals:
        return
    _originals["capture_begin"] = graph_cls.capture_begin
    _originals["capture_end"] = graph_cls.capture_end
    _originals["replay"] = graph_cls.replay
    begin, end, replay = (_originals[k] for k in ("capture_begin", "capture_end", "replay"))
    if _takes_keep_graph(graph_cls):
        # The class's own (None: inherited from torch's base, which unpatch restores).
        _originals["__init__"] = graph_cls.__dict__.get("__init__")
        init = graph_cls.__init__

        def init_(self: Any, keep_graph: bool = False, *args: Any, **kwargs: Any) -> None:
            forced = not keep_graph and _keep_for_nodes(runtime)
            init(self, bool(keep_graph) or forced, *args, **kwargs)
            if forced:
                _kept_by_us.add(self)

        graph_cls.__init__ = init_

    for name in ("register_generator_state", "reset"):
        if callable(getattr(graph_cls, name, None)):
            # The class's own, or None where inherited (unpatch restores either).
            _originals[name] = graph_cls.__dict__.get(name)
    register_generator = getattr(graph_cls, "register_generator_state", None)
    reset = getattr(graph_cls, "reset", None)

    if "register_generator_state" in _originals:
        def register_generator_state(self: Any, generator: Any, *args: Any,
                                     **kwargs: Any) -> Any:
            result = register_generator(self, generator, *args, **kwargs)
            with _lock:
                _registered_generators.setdefault(self, []).append(_state_of(generator))
            return result

        graph_cls.register_generator_state = register_generator_state

    if "reset" in _originals:
        def reset_(self: Any, *args: Any, **kwargs: Any) -> Any:
            # The copy without statistics runs on the memory torch frees here.
            with _lock:
                capture = _graphs.pop(self, None)
                _skips.pop(self, None)
                _registered_generators.pop(self, None)  # torch forgets them too
            if capture is not None:
                capture.close_lean()
            return reset(self, *args, **kwargs)

        graph_cls.reset = reset_

    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _capturing
        _run_capture_hooks(0)
        capture_guard.begin_capture()
        try:
            result = begin(self, *args, **kwargs)
        except BaseException:
            # Refused (a graph that still owns its executable): it replays its last
            # capture, whose rows and nodes stay ours.
            capture_guard.end_capture()
            raise
        with _lock:
            # A graph captured again forgets what the gate knew of its last capture, and
            # the last capture itself: its statistics nodes belong to a graph torch has
            # now replaced (stats.node_switch).
            _skips.pop(self, None)
            old = _graphs.pop(self, None)
        if old is not None:
            old.close_lean()
        try:
            capture = Capture(next(_ids))
            if self in _kept_by_us:  # only such a graph gets a copy (``Capture.seal``)
                capture.device, capture.rng_watch = _rng_watch_of(self, graph_cls)
            settings = runtime.settings
            capture.sampler = ReplaySampler(settings.replay_every, settings.replay_budget)
            if gate_types is not None and settings.replay_every != 1:
                capture.skip = gate_types[1]()
            with _lock:
                _graphs[self] = capture
                if capture.skip is not None:
                    _skips[self] = capture.skip
            _capturing = capture
        except Exception as exc:  # noqa: BLE001
            health.report("graph_errors", "could not note a CUDA graph capture", exc)
        return result

    def capture_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _capturing
        capture = _capturing
        _run_capture_hooks(1)
        ended = False
        try:
            result = end(self, *args, **kwargs)
            if self in _kept_by_us:
                self.instantiate()  # where torch's capture_end would have (not kept)
            ended = True
            return result
        finally:
            _capturing = None
            capture_guard.end_capture()
            if capture is not None and capture.groups:
                capture.seal(self if ended else None)  # no graph: nothing to bind

    def replay_(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = perf_counter()  # what tracing costs counts from here (``auto``)
        capture = _graphs.get(self)
        if capture is None or not capture.records:
            return replay(self, *args, **kwargs)
        sampler = capture.sampler
        skip = capture.skip
        capture.settle()
        capture.replays += 1
        index = capture.replays
        if sampler is None:
            traced = True
        elif sampler.auto:
            traced = sampler.should_trace(t0, _per_span(runtime), _replay_gpu_s(capture))
        else:
            traced = sampler.should_trace(t0)
        if capture.gates:
            if not traced and capture.lean is not None and capture.lean_ready(skip):
                t1 = perf_counter()  # what tracing costs ends where the replay starts
                if capture.lean_untraced(skip):
                    # The copy without statistics nodes ran: no word written, nothing off.
                    if skip is not None:
                        sampler.charge_untraced(t1 - t0)
                        _arm(sampler, skip, capture)
                    return None
            # The gate and the replay it is written for go in together: another
            # thread's write must not land between them.
            with capture.gate_lock:
                if skip is not None:
                    skip.gate_closed = -1  # before any write: the C gate asks meanwhile
                # A replay under a parent span that is not sampled makes no span
                # (emit_replay): its statistics would run for nobody.
                capture.open_gates(traced and _parent_sampled())
                if not traced:
                    if skip is not None and capture.arm_gate(skip):
                        # The word is closed on this stream: the C gate may send the
                        # next untraced replays straight to torch while it stays so.
                        sampler.charge_untraced(perf_counter() - t0)
                        _arm(sampler, skip, capture)
                    return capture.torch_replay(replay, self, args, kwargs)
                b0 = perf_counter()
                begun = _begin(runtime, capture)
                t1 = perf_counter()
                result = capture.torch_replay(replay, self, args, kwargs)
        elif not traced:
            if skip is not None:
                # The C gate could have let this replay through (a build without the gate
                # runs this Python for every replay, and charging what tracing less
                # cannot save would only starve ``auto``; so does a gated graph whose
                # word the gate cannot check, above).  Charged before arming, so that
                # the gate's deadline counts it (a fixed N keeps no books: the sampler
                # ignores it).
                sampler.charge_untraced(perf_counter() - t0)
                _arm(sampler, skip, capture)
            return replay(self, *args, **kwargs)
        else:
            b0 = perf_counter()
            begun = _begin(runtime, capture)
            t1 = perf_counter()
            result = replay(self, *args, **kwargs)
        t2 = perf_counter()
        submitted = setup = False
        # CUDA enqueues, which ``auto`` checks for waits on the GPU's queue: the timer's
        # events (its first, and its last) and the statistics groups' copies.
        timer_s, groups = t1 - b0, [0.0]
        if begun is not None:
            timer, mark, start = begun
            try:
                end_ns = time_ns()
                skipped = sampler.take_skipped() if sampler is not None else 0
                setup = not capture.has_template
                e0 = perf_counter()
                handle = timer.end_handle(mark) if timer is not None else None
                timer_s += perf_counter() - e0
                submitted = emit_replay(runtime, capture, index, start, end_ns, handle,
                                        skipped, groups)
            except Exception as exc:  # noqa: BLE001
                health.report("graph_errors", "could not trace a CUDA graph replay", exc)
        if sampler is not None:
            # What tracing it cost: our time around the replay, not the replay; the spans
            # only if it made them (not under an unsampled parent).  A replay whose
            # tracing failed is charged too: ``auto`` traces every replay until one is.
            try:
                t3 = perf_counter()
                sampler.traced((t1 - t0) + (t3 - t2),
                               1 + len(capture.records) if submitted else 0,
                               runtime.pipeline.replay_cost_per_span_s,
                               setup=setup and submitted,
                               # Not where a replay that made no spans enqueued less (not
                               # a floor), nor in a gated graph: its traced replays run the
                               # statistics launches, GPU time no other charge sees, which
                               # its waits in the GPU's queue stand for.
                               enqueue_s=(timer_s, groups[0])
                               if submitted and not capture.gates else (0.0, 0.0))
                sampler.charge_tail(perf_counter() - t3)
                if skip is not None and not capture.gates:
                    _arm(sampler, skip, capture)
            except Exception as exc:  # noqa: BLE001
                health.report("graph_errors", "could not budget a CUDA graph replay", exc)
        return result

    graph_cls.capture_begin = capture_begin
    graph_cls.capture_end = capture_end
    graph_cls.replay = (replay_ if gate_types is None else
                        gate_types[0](replay, replay_, _skips.data))


def _takes_keep_graph(graph_cls: type) -> bool:
    """Whether this torch's CUDAGraph has ``keep_graph`` (torch 2.8 and later) and the
    executable graph's handle (``raw_cuda_graph_exec``), which switching nodes needs."""
    try:
        params = inspect.signature(graph_cls.__new__).parameters
    except (TypeError, ValueError):
        return False
    return "keep_graph" in params and hasattr(graph_cls, "raw_cuda_graph_exec")


def _rng_watch_of(graph: Any, graph_cls: type) -> tuple[int | None, Any]:
    """(the capture's device, how its replays show random numbers drawn:
    ``graph_rng.RngWatch``, or None where that cannot be told).  A torch with
    ``register_generator_state`` registers the current device's default generator with
    every capture and the others through it; a later one registers, from C++, any
    generator a capture uses, and only its replay prologue tells."""
    try:
        import torch

        device = torch.cuda.current_device()
        default = _state_of(torch.cuda.default_generators[device])
        if callable(getattr(graph_cls, "register_generator_state", None)):
            with _lock:
                registered = list(_registered_generators.get(graph, ()))
            return device, RngWatch((default, *registered))
        return device, RngWatch((default,), ops=True)
    except Exception:  # noqa: BLE001
        return None, None


def _state_of(generator: Any) -> Any:
    """A generator sharing ``generator``'s state now, as torch registers it with a
    graph: a later ``graphsafe_set_state`` on ``generator`` does not move it."""
    get = getattr(generator, "graphsafe_get_state", None)
    try:
        return get() if get is not None else generator
    except Exception:  # noqa: BLE001 - a generator without one: itself
        return generator


def _keep_for_nodes(runtime: Any) -> bool:
    """Whether a graph made now should keep its captured cudaGraph_t: level 5 with
    replays sampled, whose untraced replays launch a copy without the statistics nodes
    (``stats.lean_graph``) or switch them off (``stats.node_switch``), both made from
    it.  Never raises: a graph is made either way."""
    try:
        settings = runtime.settings
        return settings.level >= 5 and settings.replay_every != 1
    except Exception:  # noqa: BLE001
        return False


def _per_span(runtime: Any) -> float | None:
    """The background's cost per replay span now (``auto`` prices with it), or None
    when it cannot be read (reported; the replay goes on with the last price)."""
    try:
        return runtime.pipeline.replay_cost_per_span_s
    except Exception as exc:  # noqa: BLE001
        health.report("graph_errors", "could not read what a replay span costs", exc)
        return None


def _arm(sampler: ReplaySampler, skip: Any, capture: Capture) -> None:
    """Tell the C gate which replays are surely untraced (reported if that fails: the
    replays then ask, and the application's replay goes on)."""
    try:
        sampler.arm(skip, capture.timed is not None)
    except Exception as exc:  # noqa: BLE001
        health.report("graph_errors", "could not arm the CUDA graph replay gate", exc)


def _replay_gpu_s(capture: Capture) -> float | None:
    """The GPU time of this graph's last timed replay, in seconds, once the worker has
    resolved it (then read once), else None."""
    attributes = capture.timed
    if attributes is None:
        return None
    ns = attributes.get(TIME_ATTR)
    if type(ns) is not int:
        return None  # not resolved yet (or never: the next timed replay replaces it)
    capture.timed = None
    return ns * 1e-9 if ns > 0 else None


def _parent_sampled() -> bool:
    """Whether the current span (the replay's parent), if any, is sampled."""
    context = trace_api.get_current_span().get_span_context()
    return not context.is_valid or bool(context.trace_flags & 1)


def _begin(runtime: Any, capture: Capture) -> tuple[Any, Any, int] | None:
    """A traced replay's start: (its GPU timer, the timer's mark, host start in ns), or
    None when that failed (reported; the replay then goes untraced).  The timer is a
    group of the capture's that stamps the replay's GPU time on the GPU, where one
    does (``Capture.replay_stamper``), else the runtime's CUDA event pair."""
    try:
        timer = runtime.replay_timer()  # None: GPU timing is off, or no CUDA
        if timer is not None:
            timer = capture.replay_stamper() or timer
        return timer, timer.begin() if timer is not None else None, time_ns()
    except Exception as exc:  # noqa: BLE001
        health.report("graph_errors", "could not trace a CUDA graph replay", exc)
        return None


def unpatch() -> None:
    global _capturing
    _waiting_for_torch.clear()
    torch = sys.modules.get("torch")
    if torch is None or not _originals:
        _capturing = None
        return
    graph_cls = torch.cuda.CUDAGraph
    for name, original in _originals.items():
        if original is None:
            delattr(graph_cls, name)  # it was inherited
        else:
            setattr(graph_cls, name, original)
    _originals.clear()
    _capturing = None


def _no_untrack(_obj: Any) -> None:
    pass


#: Keeps a replay record and its span context out of the cyclic collector while they
#: wait for the worker: ``_hotpath.untrack``, set by ``native`` when it binds the C
#: hot path (this module does not import it).
_untrack: Callable[[Any], None] = _no_untrack


def _run_hook(hook: Callable[[Any, CallRecord | None], Any], child: CallRecord | None) -> Any:
    """A replay hook's Pending, or None; one that fails is reported and the others go on."""
    try:
        return hook(None, child)
    except Exception as exc:  # noqa: BLE001
        health.report("graph_errors", "a CUDA graph replay hook failed", exc)
        return None


def emit_replay(runtime: Any, capture: Capture, index: int, start_ns: int, end_ns: int,
                timing: Any, skipped: int = 0, groups_s: list[float] | None = None) -> bool:
    """Submit the replay span and one child per captured call; ``timing``: the replay's
    packed GPU event pair (``Timer.end_handle``, resolved by the encoder in C) or a
    Pending; ``skipped``: replays of this graph not traced since the last traced one;
    ``groups_s``, when given: its first item is set to the seconds the statistics
    groups took to enqueue their copies (``auto``'s queue waits).  Returns whether it
    did (not under a parent, or a root sampler, that says no)."""
    current = trace_api.get_current_span().get_span_context()
    parent = current if current.is_valid else None
    if parent is not None and not parent.trace_flags & 1:
        return False
    trace_id = parent.trace_id if parent is not None else (getrandbits(128) or 1)
    if parent is None and not runtime.sample_root(trace_id, "cuda_graph.replay"):
        return False
    replay_id = getrandbits(64) or 1
    attrs = {"flashinfer.cuda_graph.id": capture.graph_id, "flashinfer.cuda_graph.replay": index,
             "flashinfer.cuda_graph.replays_skipped": skipped}
    dropped = health.dropped()
    if dropped != capture.dropped_seen:
        # Nothing dropped silently: the next replay span says what was lost meanwhile
        # (fewer: the counts started again, in a forked child).
        if dropped > capture.dropped_seen:
            attrs["flashinfer.cuda_graph.dropped_before"] = dropped - capture.dropped_seen
        capture.dropped_seen = dropped
    replay_context = trace_api.SpanContext(
        trace_id, replay_id, False, trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
    )
    protos, hook_lists = capture.template()
    record = ReplayRecord(trace_id, replay_id, parent, start_ns, end_ns, attrs,
                          replay_context, index, protos, None)
    # Acyclic: nothing it reaches refers back to it (the prototypes, pendings and
    # groups are shared or the capture's), so reference counting frees it.
    _untrack(record)
    _untrack(replay_context)
    # Groups first: their copies follow the replay on its stream, like the hooks'.
    if capture.groups:
        g0 = perf_counter()
        whole, grouped = capture.group_pendings()
        if groups_s is not None:
            groups_s[0] = perf_counter() - g0
    else:
        whole = grouped = None
    timed = timing is not None
    if type(timing) is int:  # the event pair, packed (the common case: no lookup)
        record.gpu = timing
    elif timing is not None:
        stamped = getattr(timing, "replay_time", None)
        if stamped is not None:  # a group's pending carries the time (or why there is none)
            timing = stamped(whole)
        if timing is not None:
            record.add_pending(timing)
    if timed and not capture.gates:
        # Where the worker leaves its GPU time (``_replay_gpu_s``), which ``auto`` earns
        # by.  Not for a gated graph: its traced replays run the statistics launches
        # its untraced ones skip (+78% on a 32-layer decode step), and earning by that
        # time spent 1.8x the budget (H200); wall time is what it earns by then.
        capture.timed = attrs
    # Hooks run here, on the replaying thread: their copies must follow the replay on
    # its stream (no stream object: the current one, where the replay ran).
    record.group = whole
    if capture.hooks_need_child:
        # Level 10's hooks name each child's span: the children are made now.
        record.child_pending = grouped
        for child, hooks in zip(record.expand(), hook_lists, strict=True):
            for hook in hooks:
                pending = _run_hook(hook, child)
                if pending is not None:
                    child.add_pending(pending)
            runtime.pipeline.submit(child)
    elif capture.any_hooks:
        # One record; the worker (the encoder, in C) makes the children.
        for i, hooks in enumerate(hook_lists):
            for hook in hooks:
                pending = _run_hook(hook, None)
                if pending is not None:
                    if grouped is None:
                        grouped = [None] * len(protos)
                    grouped[i] = [pending] if grouped[i] is None else [*grouped[i], pending]
        record.child_pending = grouped
    else:
        record.child_pending = grouped  # no hooks: one record, as above
    runtime.pipeline.submit(record)
    return True
