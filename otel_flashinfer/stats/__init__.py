"""Level 5: tensor statistics on the GPU without a host sync (kernel in csrc/).

``StatsRecorder`` (caller thread, ``recorder``) plans (``planning``) and launches into
pinned slots (``ring``); ``Pending`` objects (``pending``) resolve in the background
pipeline; ``GraphStatsSlot`` carries a captured launch to each replay.
Torch is imported only when these names are used, so ``decode`` stays pure.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GraphStatsSlot", "PagedSpec", "StatsRecorder"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import recorder

        return getattr(recorder, name)
    raise AttributeError(name)
