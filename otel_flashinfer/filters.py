"""Which calls are traced, and which of them store level-10 payloads (pure functions).

The rules are FlashInfer's ``FLASHINFER_DUMP_INCLUDE/EXCLUDE``: comma-separated
fnmatch patterns on the API name (``ClassName.method`` for methods), the include
list first (empty: everything), then the exclude list.

Payload filters (``OTEL_FLASHINFER_BLOB_INCLUDE/_BLOB_EXCLUDE``) add one rule,
because replay needs it: the ``__init__`` and ``plan`` of a class whose ``run``
is kept are kept too, unless an exclude pattern names them.  So
``BLOB_INCLUDE="*Wrapper.run"`` stores what a wrapper's runs need to replay,
as FlashInfer's own dump does.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

#: Methods whose calls run an object prepared by its ``__init__`` and ``plan``.
RUN_METHODS = ("run", "run_return_lse", "forward", "forward_return_lse")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def selected(api_name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Include first (empty = everything), then exclude."""
    include = tuple(include)
    if include and not _matches(api_name, include):
        return False
    return not _matches(api_name, exclude)


def is_chain_method(api_name: str) -> bool:
    """``Class.__init__`` or ``Class.plan*``: a call that prepares an object for its runs."""
    if "." not in api_name:
        return False
    method = api_name.rsplit(".", 1)[1]
    return method == "__init__" or method.startswith("plan")


def blob_selected(api_name: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether a traced call stores its level-10 payload (see the module docstring)."""
    include, exclude = tuple(include), tuple(exclude)
    if _matches(api_name, exclude):
        return False
    if selected(api_name, include, exclude):
        return True
    if not is_chain_method(api_name):
        return False
    cls = api_name.rsplit(".", 1)[0]
    return any(selected(f"{cls}.{m}", include, exclude) for m in RUN_METHODS)


class BlobFilter:
    """``blob_selected`` remembered per API name: the call path does one dict lookup."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]) -> None:
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.everything = not self.include and not self.exclude
        self._known: dict[str, bool] = {}

    def __call__(self, api_name: str) -> bool:
        if self.everything:
            return True
        known = self._known.get(api_name)
        if known is None:
            known = blob_selected(api_name, self.include, self.exclude)
            if len(self._known) < 4096:
                self._known[api_name] = known
        return known
