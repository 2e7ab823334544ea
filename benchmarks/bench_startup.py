"""Interpreter start-up with the installed hook (``otel_flashinfer_autostart.pth``) and
without it, tracing off: what env-only activation costs every Python process.

Each run starts ``python -c pass`` from a clean environment (no ``OTEL_*``) many
times, interleaving three cases so drift hits them alike:

- ``bare``: the same user site folder, without the hook,
- ``hook, off``: the repository's ``.pth`` in a user site folder, level unset,
- ``hook, level 1``: the same with ``OTEL_FLASHINFER_LEVEL=1`` (for reference: this
  imports the package and the OTel SDK, sets a provider and instruments; torch
  is imported only when the application imports it, or from level 3 on, where GPU
  timing needs it at once).

It prints the median wall time per start and the ratios to ``bare``; the
``hook, off`` ratio is the one that must stay at ~1.00.  If the hook is also
installed in this interpreter's site-packages (``pip install .``), ``bare`` runs
it too, and reads the same as ``hook, off``.

    python benchmarks/bench_startup.py [--runs 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PTH = REPO / "otel_flashinfer_autostart.pth"


def _env(userbase: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUSERBASE"] = userbase
    env["PYTHONPATH"] = str(REPO)
    env["OTEL_FLASHINFER_JOURNAL_DIR"] = ""
    env.update(extra)
    return env


def _start_s(env: dict[str, str], cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, cwd=cwd, check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = os.path.join(tmp, "bare")
        hooked = os.path.join(tmp, "hooked")
        for base in (bare, hooked):
            Path(sysconfig.get_path("purelib", f"{os.name}_user",
                                    vars={"userbase": base})).mkdir(parents=True)
        site_dir = Path(sysconfig.get_path("purelib", f"{os.name}_user",
                                           vars={"userbase": hooked}))
        shutil.copy(PTH, site_dir / PTH.name)
        cases = {"bare": _env(bare), "hook, off": _env(hooked),
                 "hook, level 1": _env(hooked, OTEL_FLASHINFER_LEVEL="1",
                                       OTEL_TRACES_EXPORTER="none")}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for env in cases.values():
            _start_s(env, tmp)  # warm the file cache and bytecode
        for _ in range(ns.runs):
            for name, env in cases.items():
                times[name].append(_start_s(env, tmp))
    base = statistics.median(times["bare"])
    print(f"python -c pass, median of {ns.runs} starts each ({sys.version.split()[0]})")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"  {name:<14} {med * 1e3:8.2f} ms   ratio {med / base:5.2f}x")


if __name__ == "__main__":
    main()
