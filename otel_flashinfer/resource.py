"""Resource attributes that say which process, rank and GPU a span came from.

Serving engines run one worker process per GPU; without these, spans from eight
workers of one trace are indistinguishable.  Pure: a function of the environment
mapping and the pid, so it is tested without processes or GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: (environment variable, resource attribute); torchrun, vLLM, SGLang and most
#: launchers set these in every worker.
_RANK_VARS = (
    ("RANK", "flashinfer.rank"),
    ("LOCAL_RANK", "flashinfer.local_rank"),
    ("WORLD_SIZE", "flashinfer.world_size"),
    ("LOCAL_WORLD_SIZE", "flashinfer.local_world_size"),
)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def cuda_device(environ: Mapping[str, str]) -> str | None:
    """The physical GPU this process most likely uses, as CUDA_VISIBLE_DEVICES names it.

    One visible device: that one.  Several and LOCAL_RANK set: the LOCAL_RANK-th
    (the usual one-GPU-per-rank placement).  No CUDA_VISIBLE_DEVICES: LOCAL_RANK
    itself is the physical index.  Otherwise unknown.
    """
    local_rank = _int(environ.get("LOCAL_RANK"))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if len(devices) == 1:
            return devices[0]
        if local_rank is not None and 0 <= local_rank < len(devices):
            return devices[local_rank]
        return None
    if local_rank is not None and local_rank >= 0:
        return str(local_rank)
    return None


def process_resource_attributes(environ: Mapping[str, str] | None = None,
                                pid: int | None = None) -> dict[str, Any]:
    """``process.pid`` and, where the environment says, rank, world size and GPU."""
    env = os.environ if environ is None else environ
    attrs: dict[str, Any] = {"process.pid": os.getpid() if pid is None else pid}
    for var, key in _RANK_VARS:
        value = _int(env.get(var))
        if value is not None:
            attrs[key] = value
    device = cuda_device(env)
    if device is not None:
        attrs["flashinfer.cuda.device"] = device
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        attrs["flashinfer.cuda.visible_devices"] = visible
    return attrs
