"""Whole cost of a traced call: everything it makes the machine do, on every thread,
with a real exporter and the defaults on (DESIGN.md, "Cost: what counts").

Each configuration runs in a process of its own (a global tracer provider, and
FlashInfer's logger level, are fixed per process), in interleaved rounds, with the
same sustained loop of back-to-back calls:

- ``caller us``: wall time of the loop per call (what the engine's thread sees);
- ``cpu us``: the whole process's CPU (user + system, every thread) from the loop's
  start to the end of the flush that hands every span to the exporter, per call;
- ``spans``: spans the exporter really delivered (lines of the file, or spans the
  receiver decoded), which must equal the calls traced.

Added cost is the median over rounds of each configuration minus the bare loop of
the same round.  Exporters: our default OTLP/JSON-lines file, then OTLP/HTTP and
OTLP/gRPC to ``tests/otlp_receiver.py`` (its own process: its CPU is not ours).

GPU (the device): BatchDecode ``run()`` (batch 8, kv 1024, 32/8 heads, d 128, fp16);
peers are an NVTX range per call, torch.profiler (CPU+CUDA, record_shapes) and
FlashInfer's own logger at levels 1/3/5; ours at levels 1/3/5/10.  Then a captured
decode step replayed N times at level 5 with the default exporter, against level 0.
CPU (any host): a traced function with the decode call's arguments at levels 1/3,
against a stock SDK span with the same attributes through BatchSpanProcessor and
the same exporter; and the encoder's level-3 spans per second on one core.

    python benchmarks/bench_whole_cost.py [--calls 3000] [--rounds 3] [--mode auto|gpu|cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ---- the child: one configuration, one process ------------------------------------------


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_workload() -> tuple[Any, Any]:
    """A function with the decode call's arguments, traced like a FlashInfer API."""
    import torch

    q = torch.zeros(8, 32, 128, dtype=torch.float16)
    kv = torch.zeros(512, 2, 16, 8, 128, dtype=torch.float16)

    def run(q: Any, paged_kv_cache: Any, *, out: Any = None, return_lse: bool = False) -> Any:
        return q

    return run, (q, kv)


def _stock_attributes(args: tuple[Any, ...], level: int) -> dict[str, Any]:
    """The attributes our level-``level`` span carries, for the stock SDK span."""
    from otel_flashinfer import describe

    attrs: dict[str, Any] = {"flashinfer.api": "BatchDecodeWithPagedKVCacheWrapper.run",
                             "flashinfer.level": level, "flashinfer.instance.id": "1:2"}
    if level >= 3:
        for name, value in zip(("q", "paged_kv_cache"), args, strict=True):
            attrs.update(describe.attributes(f"flashinfer.arg.{name}", describe.snapshot(value)))
        attrs.update({"flashinfer.arg.out": "None", "flashinfer.arg.return_lse": False})
        attrs.update(describe.result_attributes(describe.snapshot(args[0])))
    return attrs


def _wait_for_kernels(level: int) -> None:
    """Our CUDA extensions (event pool, statistics kernel) build in the background on
    first use; until then level 5 falls back to torch ops (milliseconds a call).  A
    measurement must not time that fallback."""
    from otel_flashinfer import gpu_timing
    from otel_flashinfer.stats import kernel as stats_kernel

    if level >= 3 and not gpu_timing.wait_ready(900):
        raise RuntimeError("the CUDA event pool did not build")
    if level >= 5 and stats_kernel.get(wait=True, timeout=900) is None:
        raise RuntimeError("the statistics kernel did not build")


def _block(fn: Any, args: tuple, calls: int, sync: Any, flush: Any) -> tuple[float, float]:
    """(caller wall, whole CPU) per call of ``calls`` calls of ``fn``, the CPU up to
    the end of ``flush``."""
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    t1 = time.perf_counter()
    sync()
    flush()
    return (t1 - t0) / calls * 1e6, (_cpu_s() - cpu0) / calls * 1e6


def _pairs(plain: Any, traced: Any, args: tuple, calls: int, pairs: int, sync: Any,
           flush: Any) -> list[tuple[float, float]]:
    """Added (caller, whole CPU) per call in ``pairs`` back-to-back pairs of an untraced
    and a traced block in this one process: the same core, memory layout and clocks, so
    the difference is ours, not the host's (separate processes drift by several us)."""
    added = []
    for _ in range(pairs):
        bare = _block(plain, args, calls, sync, lambda: True)
        ours = _block(traced, args, calls, sync, flush)
        added.append((ours[0] - bare[0], ours[1] - bare[1]))
    return added


def _payloads_kept() -> int:
    """Manifests the level-10 recorder has written so far (flushed first)."""
    import otel_flashinfer
    from otel_flashinfer import runtime

    otel_flashinfer.flush(120)
    blobs = getattr(runtime.current(), "blobs", None)
    return int(blobs.counters.get("manifests", 0)) if blobs is not None else 0


def child(config: str, calls: int, warmup: int, pairs: int = 0) -> dict[str, Any]:
    kind, _, level_text = config.partition(":")
    level = int(level_text.split("/")[0] or 0)  # "ours:10/skipped": level 10, a variant
    gpu = os.environ.get("BENCH_MODE") == "gpu"
    out: dict[str, Any] = {"config": config}
    flush: Any = lambda: True  # noqa: E731
    context: Any = None
    if gpu:
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from gpu_decode import make_decode

        if kind == "ours":
            import otel_flashinfer

            otel_flashinfer.instrument(level=level)
            _wait_for_kernels(level)
            flush = lambda: otel_flashinfer.flush(120)  # noqa: E731
        step = make_decode()
        call, args = step.wrapper.run, (step.q, step.kv_cache)
        run_attr = type(step.wrapper).run
        if kind == "ours":  # the same wrapper's method, untraced (one level down)
            plain = run_attr.__wrapped__.__get__(step.wrapper)
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731
        call, args = _cpu_workload()
        if kind == "ours":
            import otel_flashinfer

            otel_flashinfer.instrument(level=level)
            plain = call
            call = otel_flashinfer.traced(call, name="BatchDecodeWithPagedKVCacheWrapper.run")
            flush = lambda: otel_flashinfer.flush(120)  # noqa: E731
        elif kind == "stock":
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            from otel_flashinfer.provider import make_exporter, process_resource

            provider = TracerProvider(resource=process_resource())
            provider.add_span_processor(BatchSpanProcessor(make_exporter(
                os.environ["BENCH_EXPORTER_NAME"], os.environ,
                os.environ.get("OTEL_FLASHINFER_TRACES_FILE", "flashinfer_traces.jsonl"))))
            tracer = provider.get_tracer("stock")
            attrs = _stock_attributes(args, level)
            plain = call

            def call(*a: Any) -> Any:
                with tracer.start_as_current_span(
                        "BatchDecodeWithPagedKVCacheWrapper.run", attributes=attrs):
                    return plain(*a)

            flush = lambda: provider.force_flush(120_000)  # noqa: E731
            trace.set_tracer_provider(provider)
    if kind == "nvtx":
        import torch

        plain_nvtx = call

        def call(*a: Any) -> Any:
            torch.cuda.nvtx.range_push("BatchDecodeWithPagedKVCacheWrapper.run")
            try:
                return plain_nvtx(*a)
            finally:
                torch.cuda.nvtx.range_pop()
    for _ in range(warmup):
        call(*args)
    sync()
    flush()
    time.sleep(0.2)  # background set-up (statistics ring, event pool) settles
    kept0 = _payloads_kept() if kind == "ours" and level >= 10 else 0
    if kind == "profiler":
        import torch

        context = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
            record_shapes=True)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if context is not None:
        context.__enter__()
    for _ in range(calls):
        call(*args)
    t1 = time.perf_counter()
    sync()
    if context is not None:
        context.__exit__(None, None, None)
        context.key_averages()  # the profiler's own processing is part of its cost
    out["flushed"] = bool(flush())
    out["cpu_us"] = (_cpu_s() - cpu0) / calls * 1e6
    out["caller_us"] = (t1 - t0) / calls * 1e6
    if kind == "ours" and level >= 10:  # calls of the timed loop whose payloads were kept
        out["kept_in_loop"] = _payloads_kept() - kept0
    # Every run() call, plus the wrapper's own __init__ and plan on the GPU.
    out["traced"] = calls + warmup + (2 if gpu else 0)
    if kind == "ours" and pairs:
        out["paired"] = _pairs(plain, call, args, calls, pairs, sync, flush)
        out["traced"] += calls * pairs
    if kind == "ours":
        from otel_flashinfer import health, runtime

        out["counters"] = health.counters()
        blobs = getattr(runtime.current(), "blobs", None)
        if blobs is not None:  # level 10: how many calls' payloads were kept
            out["blobs"] = {k: v for k, v in blobs.counters.items()
                            if k == "manifests" or k.startswith("skipped.")}
    return out


def graph_child(level: int, replays: int, branch_share: float = 1.0) -> dict[str, Any]:
    """A captured decode step replayed back to back at ``level`` (default exporter);
    ``branch_share``: ``overlap.BRANCH_SM_SHARE`` for the statistics beside the decode."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from gpu_decode import capture_graph, make_decode

    import otel_flashinfer

    if level:
        otel_flashinfer.instrument(level=level)
        _wait_for_kernels(level)
        from otel_flashinfer.stats import overlap

        overlap.BRANCH_SM_SHARE = branch_share
    step = make_decode(use_cuda_graph=True)
    graph, _ = capture_graph(step.run)
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    otel_flashinfer.flush(60)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    flushed = otel_flashinfer.flush(120)
    wall = (time.perf_counter() - t0) / replays * 1e6
    from otel_flashinfer import health

    return {"config": f"graph:{level}", "wall_us": wall, "flushed": flushed,
            "cpu_us": (_cpu_s() - cpu0) / replays * 1e6, "counters": health.counters()}


# ---- the parent: rounds of children, the receiver, the table -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    def __init__(self) -> None:
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "otlp_receiver.py"), "--http-port",
             str(self.http_port), "--grpc-port", str(self.grpc_port)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def count(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/count"
        with urllib.request.urlopen(url, timeout=10) as response:
            data = json.loads(response.read())
        assert data["errors"] == 0, data
        return data["spans"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _file_spans(path: Path, marker: str | None = None) -> tuple[int, int]:
    """(spans, spans carrying ``marker``) in an OTLP/JSON-lines file."""
    spans = marked = 0
    if not path.exists():
        return 0, 0
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                spans += len(ss["spans"])
                if marker:
                    marked += sum(any(a["key"] == marker for a in s.get("attributes", ()))
                                  for s in ss["spans"])
    return spans, marked


def run_child(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(mode: str, exporter: str, receiver: Receiver | None, extra: dict[str, str]
         ) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "FLASHINFER_LOG"))}
    env.update({"BENCH_MODE": mode, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), env.get("PYTHONPATH", "")])})
    if exporter == "file":
        env["BENCH_EXPORTER_NAME"] = "otlp_file"
    else:
        assert receiver is not None
        proto = "grpc" if exporter == "grpc" else "http/protobuf"
        port = receiver.grpc_port if exporter == "grpc" else receiver.http_port
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                    "OTEL_EXPORTER_OTLP_PROTOCOL": proto, "BENCH_EXPORTER_NAME": "otlp"})
    env.update(extra)
    return env


def measure(configs: list[tuple[str, str, dict[str, str]]], mode: str, rounds: int, calls: int,
            warmup: int, receiver: Receiver, pairs: int = 0
            ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """configs: (config, exporter, extra env).  Returns every round's result."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for config, exporter, extra in configs:
            if config.startswith("ours:10") and round_:
                continue  # payloads of every round would fill the disk for nothing
            with tempfile.TemporaryDirectory(prefix="bench_whole_") as tmp:
                cwd = Path(tmp)
                before = receiver.count() if exporter != "file" else 0
                result = run_child(["--child", config, "--calls", str(calls), "--warmup",
                                    str(warmup), "--pairs", str(pairs)],
                                   _env(mode, exporter, receiver, extra), cwd)
                if config.startswith(("ours", "stock")):
                    if exporter == "file":
                        result["received"] = _file_spans(cwd / "flashinfer_traces.jsonl")[0]
                    else:
                        deadline = time.monotonic() + 30
                        while True:
                            result["received"] = receiver.count() - before
                            if result["received"] >= result["traced"] or \
                                    time.monotonic() > deadline:
                                break
                            time.sleep(0.1)
                results.setdefault((config, exporter), []).append(result)
            print(f"  round {round_ + 1}: {config:12} {exporter:5} caller "
                  f"{result['caller_us']:8.2f} us  cpu {result['cpu_us']:8.2f} us"
                  + (f"  spans {result.get('received')}/{result['traced']}"
                     if "received" in result else "")
                  + (f"  payloads kept {result['blobs']}" if "blobs" in result else ""),
                  flush=True)
    return results


def _added(results: dict, key: tuple[str, str], base_key: tuple[str, str], field: str) -> float:
    rows, base = results[key], results[base_key]
    diffs = [r[field] - b[field] for r, b in zip(rows, base, strict=False)]
    return statistics.median(diffs)


def encoder_rate(seconds: float = 2.0) -> float:
    """Level-3 spans per second the native encoder makes on one core (CPU)."""
    import torch
    from opentelemetry.sdk.trace import TracerProvider

    from otel_flashinfer import describe
    from otel_flashinfer.export import make_encoder
    from otel_flashinfer.pipeline import _EMPTY, CallRecord
    from otel_flashinfer.spans import ArgPlan, Describer

    run, args = _cpu_workload()
    tracer = TracerProvider().get_tracer("otel_flashinfer", "1")
    encoder = make_encoder(tracer, "protobuf", CallRecord, _EMPTY)
    describer = Describer(ArgPlan(run, False))
    base = {"flashinfer.api": "BatchDecodeWithPagedKVCacheWrapper.run", "flashinfer.level": 3}
    data = [describe.snapshot(a) for a in args]
    result = describe.snapshot(torch.zeros(8, 32, 128))
    records = []
    for i in range(512):
        r = CallRecord.for_call("BatchDecodeWithPagedKVCacheWrapper.run", (i + 1) << 64 | 7,
                                i + 1, None, base)
        r.start_ns, r.end_ns, r.instance = 1_700_000_000_000_000_000, 1_700_000_000_000_020_000, 7
        r.describe, r.data, r.result = describer, data, result
        records.append(r)
    n = 0
    c0 = time.thread_time()
    while time.thread_time() - c0 < seconds:
        for r in records:
            encoder.add(r)
        encoder.take()
        n += len(records)
    return n / (time.thread_time() - c0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--graph", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2,
                        help="untraced/traced block pairs inside each of our processes")
    parser.add_argument("--replays", type=int, default=1000,
                        help="the captured decode step's replays per level (0: skip it)")
    parser.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto")
    parser.add_argument("--exporters", default="file,http,grpc")
    parser.add_argument("--levels", default="1,3,5,10")
    parser.add_argument("--no-peers", action="store_true", help="skip NVTX/profiler/FlashInfer")
    parser.add_argument("--branch-share", default="1",
                        help="the captured decode step at level 5: the share of the SMs its "
                             "statistics beside the decode are sized for, several "
                             "comma-separated to run each side by side")
    args = parser.parse_args()
    if str(ROOT) not in sys.path:  # this checkout, as the children get it
        sys.path.insert(0, str(ROOT))
    if args.child:
        print(json.dumps(child(args.child, args.calls, args.warmup, args.pairs)))
        return 0
    if args.graph is not None:
        print(json.dumps(graph_child(args.graph, args.replays, float(args.branch_share))))
        return 0
    mode = args.mode
    if mode == "auto":
        import torch

        mode = "gpu" if torch.cuda.is_available() else "cpu"
    exporters = args.exporters.split(",")
    levels = [int(x) for x in args.levels.split(",")]
    if mode == "cpu":
        levels = [lvl for lvl in levels if lvl <= 3]
    receiver = Receiver()
    try:
        configs: list[tuple[str, str, dict[str, str]]] = [("bare", "file", {})]
        if mode == "gpu" and not args.no_peers:
            configs += [("nvtx", "file", {}), ("profiler", "file", {})]
            for lvl in (1, 3, 5):
                configs.append((f"fi:{lvl}", "file", {"FLASHINFER_LOGLEVEL": str(lvl),
                                                      "FLASHINFER_LOGDEST": "fi.log"}))
        for exporter in exporters:
            for lvl in levels:
                extra = {"OTEL_FLASHINFER_BLOB_MAX_COUNT": "1000000",
                         "OTEL_FLASHINFER_BLOB_MAX_GB": "1000"} if lvl >= 10 else {}
                configs.append((f"ours:{lvl}", exporter, extra))
                if lvl >= 10:  # every payload skipped (budget of one): what a skip costs
                    configs.append((f"ours:{lvl}/skipped", exporter,
                                    {"OTEL_FLASHINFER_BLOB_MAX_COUNT": "1"}))
                if mode == "cpu":
                    configs.append((f"stock:{lvl}", exporter, {}))
        print(f"mode {mode}: {args.rounds} interleaved rounds of {args.calls} calls "
              f"(+{args.warmup} warm-up) per configuration, each in its own process", flush=True)
        results = measure(configs, mode, args.rounds, args.calls, args.warmup, receiver,
                          args.pairs)
    finally:
        receiver.stop()
    base = ("bare", "file")
    bare = results[base]
    print(f"\nbare loop: caller {statistics.median(r['caller_us'] for r in bare):.2f} us/call, "
          f"whole CPU {statistics.median(r['cpu_us'] for r in bare):.2f} us/call")
    print("added over the bare process of the same round; 'paired': over untraced blocks "
          "of the same process (median of every pair, every round)")
    print(f"{'configuration':14} {'exporter':8} {'+caller us':>11} {'+whole CPU us':>14} "
          f"{'paired +caller':>15} {'paired +CPU':>12} {'spans received/traced':>22}")
    for (config, exporter), rows in results.items():
        if (config, exporter) == base:
            continue
        received = (f"{min(r['received'] for r in rows)}/{rows[0]['traced']}"
                    if "received" in rows[0] else "-")
        key = (config, exporter)
        paired = [p for r in rows for p in r.get("paired", ())]
        pc, pw = ((f"{statistics.median(p[0] for p in paired):15.2f}",
                   f"{statistics.median(p[1] for p in paired):12.2f}") if paired
                  else (f"{'-':>15}", f"{'-':>12}"))
        print(f"{config:14} {exporter:8} {_added(results, key, base, 'caller_us'):11.2f} "
              f"{_added(results, key, base, 'cpu_us'):14.2f} {pc} {pw} {received:>22}")
    for (config, exporter), rows in results.items():
        skipped = results.get((config + "/skipped", exporter))
        if not config.startswith("ours:10") or "/" in config or not skipped:
            continue
        kept = rows[0].get("kept_in_loop", 0) / args.calls
        all_, skip = (_added(results, (c, exporter), base, "cpu_us")
                      for c in (config, config + "/skipped"))
        one = (all_ - (1 - kept) * skip) / kept if kept else float("nan")
        print(f"level 10 {exporter:5}: {kept:.0%} of the loop's calls kept their payloads "
              f"(the others skipped, as the writers fell behind); a skipped call costs "
              f"+{skip:.1f} us whole CPU, so a kept call costs +{one:.1f} us (target <= 2,000)")
    if mode == "cpu":
        print("\nwhole CPU per traced call, ours / stock SDK span with the same attributes "
              "(BatchSpanProcessor, same exporter):")
        for exporter in exporters:
            for lvl in levels:
                ours = statistics.median(r["cpu_us"] for r in results[(f"ours:{lvl}", exporter)])
                stock = statistics.median(r["cpu_us"] for r in results[(f"stock:{lvl}", exporter)])
                base_cpu = statistics.median(r["cpu_us"] for r in bare)
                ratio = (ours - base_cpu) / (stock - base_cpu)
                print(f"  level {lvl} {exporter:5}: ours +{ours - base_cpu:.2f} us, stock "
                      f"+{stock - base_cpu:.2f} us, ratio {ratio:.3f} (target <= 0.10)")
        rate = encoder_rate()
        print(f"\nnative encoder, one core: {rate:,.0f} level-3 spans/s (target >= 200,000)")
    if mode == "gpu" and args.replays > 0:
        rows = {}
        shares = args.branch_share.split(",")
        runs = [(0, 0, "1", "1"), (5, 5, "1", shares[0]), ("auto", 5, "auto", shares[0])]
        runs += [(f"share {share}", 5, "1", share) for share in shares[1:]]
        for key, level, every, share in runs:
            with tempfile.TemporaryDirectory(prefix="bench_graph_") as tmp:
                result = run_child(["--graph", str(level), "--replays", str(args.replays),
                                    "--branch-share", share],
                                   _env("gpu", "file", None,
                                        {"OTEL_FLASHINFER_REPLAY_EVERY": every}), Path(tmp))
                spans, dropped = _file_spans(Path(tmp) / "flashinfer_traces.jsonl",
                                             "flashinfer.stats.dropped")
                result["spans"], result["stats_dropped"] = spans, dropped
                rows[key] = result
        print(f"\ncaptured decode step, {args.replays} replays back to back, default exporter: "
              f"level 0 {rows[0]['wall_us']:.1f} us/replay, level 5 {rows[5]['wall_us']:.1f} "
              f"us/replay incl. the flush = {rows[5]['wall_us'] / rows[0]['wall_us']:.2f}x "
              f"(target <= 2x); spans {rows[5]['spans']}, replays whose statistics were "
              f"dropped {rows[5]['stats_dropped']}")
        auto = rows["auto"]
        print(f"the same with OTEL_FLASHINFER_REPLAY_EVERY=auto (budget 1%): "
              f"{auto['wall_us']:.1f} us/replay = {auto['wall_us'] / rows[0]['wall_us']:.3f}x "
              f"level 0; spans {auto['spans']} (replay spans and their children), statistics "
              f"dropped {auto['stats_dropped']}")
        if len(shares) > 1:
            print(f"  (the two above with the statistics branch sized for {shares[0]} of "
                  "the SMs)")
        for share in shares[1:]:
            r = rows[f"share {share}"]
            print(f"level 5, every replay, branch sized for {share} of the SMs: "
                  f"{r['wall_us']:.1f} us/replay = {r['wall_us'] / rows[0]['wall_us']:.2f}x "
                  f"level 0; spans {r['spans']}, statistics dropped {r['stats_dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
