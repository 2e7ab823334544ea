"""Reading requests' environment once in a while instead of on every OTLP/HTTP request.

A ``requests.Session`` that trusts the environment (the default, and the SDK's
OTLP/HTTP exporter's) reads it again for every request: ``HTTP(S)_PROXY``, ``NO_PROXY``
matched against the URL, ``REQUESTS_CA_BUNDLE``, two passes over ``os.environ`` each
time.  That was about a fifth of each of our requests' CPU (200 of 1,100 us on the CPU
box, an empty request to a local receiver), 0.4 to 0.8 us of the sender's CPU a span at
level 1, on a thread that holds the GIL the engine needs.  The sender's requests all go
to one endpoint, so the answer is kept per set of arguments and read again after
``REFRESH_S``: a change to the environment still takes effect, a few seconds later.

Only the session's ``merge_environment_settings`` is stood in for, on the session
object itself, and ``release`` puts the session's own back when the last sender using
it closes.  Anything unexpected (not a requests session, an argument that cannot be a
key) goes to the session's own method.
"""

from __future__ import annotations

import time
from typing import Any

#: How long a reading of the environment is used before it is read again (seconds).
REFRESH_S = 10.0


class CachedEnvironment:
    """Stands in for ``session.merge_environment_settings``: the same result, the
    environment read at most every ``REFRESH_S`` per set of arguments."""

    def __init__(self, session: Any) -> None:
        self.session = session
        #: The session's own method (bound), called for every reading.
        self.original = session.merge_environment_settings
        self.users = 0
        self._cache: dict[Any, tuple[float, dict[str, Any]]] = {}

    def _key(self, url: str, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        """The arguments and the session settings the result depends on, or None when
        one of them cannot be a key."""
        session = self.session
        try:
            key = (url, tuple(sorted((proxies or {}).items())), stream, verify, cert,
                   session.trust_env, tuple(sorted((session.proxies or {}).items())),
                   session.stream, session.verify, session.cert)
            hash(key)
        except Exception:  # noqa: BLE001 - an odd setting: read it each time
            return None
        return key

    def __call__(self, url: str, proxies: Any, stream: Any, verify: Any,
                 cert: Any) -> dict[str, Any]:
        key = self._key(url, proxies, stream, verify, cert)
        if key is None:
            return self.original(url, proxies, stream, verify, cert)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is None or now - hit[0] >= REFRESH_S:
            if len(self._cache) > 64:  # one endpoint in practice: never grows for long
                self._cache.clear()
            hit = (now, self.original(url, proxies, stream, verify, cert))
            self._cache[key] = hit
        settings = dict(hit[1])
        if isinstance(settings.get("proxies"), dict):
            settings["proxies"] = dict(settings["proxies"])  # the caller's to change
        return settings


def session_of(exporter: Any) -> Any:
    """The requests session an SDK OTLP/HTTP exporter sends with, or None (its
    transport's in newer SDKs, the exporter's own in older ones)."""
    client = getattr(exporter, "_client", None)
    transport = getattr(client, "_transport", None)
    session = getattr(transport, "_session", None) or getattr(exporter, "_session", None)
    try:
        import requests
    except ImportError:  # pragma: no cover - the exporter itself needs it
        return None
    return session if isinstance(session, requests.Session) else None


def hold(exporter: Any) -> CachedEnvironment | None:
    """Have ``exporter``'s session read its environment through a ``CachedEnvironment``
    (the one already there, if another sender put it), or None if it has none."""
    session = session_of(exporter)
    if session is None:
        return None
    cached = session.__dict__.get("merge_environment_settings")
    if not isinstance(cached, CachedEnvironment):
        cached = CachedEnvironment(session)
        session.merge_environment_settings = cached
    cached.users += 1
    return cached


def release(cached: CachedEnvironment | None) -> None:
    """One sender less: the last one puts the session's own method back."""
    if cached is None:
        return
    cached.users -= 1
    session = cached.session
    if cached.users <= 0 and session.__dict__.get("merge_environment_settings") is cached:
        del session.merge_environment_settings
