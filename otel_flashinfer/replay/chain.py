"""Which ``__init__`` and ``plan`` a recorded call of an object needs (pure functions).

A wrapper's ``run`` replays only on an object rebuilt the way it was: through the
``__init__`` that made it and the ``plan`` in force when it ran.  Those are the
latest ``__init__`` of its instance recorded before it, and the latest ``plan*``
between that ``__init__`` and the call.  ``id(self)`` can be reused once an object
is freed, so "latest before" is also what tells two objects at one address apart.
"""

from __future__ import annotations

from collections.abc import Iterable


def method_of(qualname: str) -> str:
    """The method part of ``Class.method`` ('' for a plain function)."""
    return qualname.rsplit(".", 1)[1] if "." in qualname else ""


def is_init(method: str) -> bool:
    return method == "__init__"


def is_plan(method: str) -> bool:
    return method.startswith("plan")


def needs(method: str) -> tuple[bool, bool]:
    """(needs an __init__, needs a plan) for a call of ``method`` on an object."""
    if is_init(method):
        return False, False
    if is_plan(method):
        return True, False
    return True, True


def in_force(entries: Iterable[dict], start_ns: int) -> tuple[dict | None, dict | None]:
    """(the __init__, the plan) in force at ``start_ns`` among an instance's chain
    entries (dicts with ``start_ns`` and ``method``)."""
    ordered = sorted((e for e in entries if e["start_ns"] < start_ns),
                     key=lambda e: e["start_ns"])
    init = None
    for e in ordered:
        if is_init(e["method"]):
            init = e
    if init is None:
        return None, None
    plan = None
    for e in ordered:
        if e["start_ns"] > init["start_ns"] and is_plan(e["method"]):
            plan = e
    return init, plan
