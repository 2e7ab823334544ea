"""Started by ``otel-flashinfer run``: instrument this Python process at startup.

``run`` puts this folder first on PYTHONPATH, so Python imports this file as
``sitecustomize`` in every process that inherits the environment.  Another
``sitecustomize`` further down sys.path (a virtualenv's, a distro's) still runs
first, as it would have without us.  Nothing here may stop the program.
"""

import importlib.util
import os
import sys


def _chain_previous() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("sitecustomize", paths)
        if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
            return
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        sys.stderr.write(f"otel-flashinfer: the previous sitecustomize failed: {exc}\n")


def _start() -> None:
    level = os.environ.get("OTEL_FLASHINFER_LEVEL", "").strip()
    if not level or level == "0":
        return
    try:
        from otel_flashinfer.launcher import bootstrap_child
    except Exception as exc:  # noqa: BLE001
        sys.stderr.write(f"otel-flashinfer: cannot load the bootstrap: {exc}\n")
        return
    bootstrap_child()


_chain_previous()
_start()
