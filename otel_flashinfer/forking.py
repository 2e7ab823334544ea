"""What an object of ours must redo in a forked child (``os.register_at_fork``).

A fork copies locks that may be held and descriptors and threads that the child does
not own.  The hook holds the object weakly: a retired exporter or recorder must not
live on for the sake of its fork hook, and one that is gone has nothing to redo.
"""

from __future__ import annotations

import os
import weakref
from typing import Any


def redo_in_child(obj: Any, method: str) -> None:
    """Call ``obj.<method>()`` in every forked child while ``obj`` is alive."""
    if not hasattr(os, "register_at_fork"):
        return
    ref = weakref.ref(obj)

    def child() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)()

    os.register_at_fork(after_in_child=child)
