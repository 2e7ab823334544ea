"""Whether a CUDA graph draws random numbers, seen from one replay through torch.

torch's replay begins with a prologue that hands a graph drawing random numbers its
next Philox seed and offset; a launch of the graph that skips torch's replay (the copy
of ``stats.lean_graph``) would draw the same numbers every time.  Which generators a
graph draws from depends on the torch: one with ``CUDAGraph.register_generator_state``
registers the capture device's default generator with every capture and others through
that method (``graphs.patch`` notes them); a later one registers, from C++, any
generator a capture uses, and only the prologue's own work shows it.  A generator a C++
extension registered behind the older API is not seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


class RngWatch:
    """Whether a replay through torch drew random numbers.

    A torch that registers generators with a graph through
    ``CUDAGraph.register_generator_state`` (``ops=False``): the graph's generators are
    known, and a replay that drew advances one's offset.  A torch that registers any
    generator a capture uses from C++ (no such method: the private ones are not known
    here): a replay that drew runs torch's prologue, which fills the capture's seed and
    offset tensors (``fill_``, through the dispatcher) before the launch; with
    nothing drawn it runs no operator at all.  So the replay runs under a dispatch mode
    that counts operators, beside the default generator's offset."""

    def __init__(self, generators: Iterable[Any], ops: bool = False) -> None:
        self._generators = tuple(generators)
        self._ops = ops

    def run(self, replay: Callable[[], Any]) -> tuple[Any, bool | None]:
        """(replay's result, True: nothing drawn; False: drawn; None: not known)."""
        before = _offsets(self._generators)
        counted = 0
        if self._ops:
            counter = _op_counter()
            if counter is None:
                return replay(), None
            with counter:
                result = replay()
            counted = counter.ops
        else:
            result = replay()
        after = _offsets(self._generators)
        if before is None or after is None:
            return result, None
        return result, after == before and counted == 0


def _offsets(generators: Sequence[Any]) -> tuple[int, ...] | None:
    try:
        return tuple(int(g.get_offset()) for g in generators)
    except Exception:  # noqa: BLE001 - an offset we cannot read proves nothing
        return None


def _op_counter() -> Any:
    """A dispatch mode counting the operators run under it, or None without one."""
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except Exception:  # noqa: BLE001
        return None

    class _Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    return _Count()
