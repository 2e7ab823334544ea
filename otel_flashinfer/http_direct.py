"""OTLP/HTTP requests through the SDK's urllib3 transport, when the exporter's requests
session would send them the same way.

The SDK's OTLP/HTTP exporter sends through a ``requests.Session``.  For every request
requests prepares it (a ``~/.netrc`` lookup, cookie, hook and header merges through
runtime ``typing.Protocol`` checks), reads the environment, and builds a ``Response``
with its cookies: on the CPU box 330 us of the sender's CPU for a 512-span request,
against 180 us through the SDK's other transport (``Urllib3HTTPTransport``, urllib3's
pool alone), which the same client drives with the same retry, backoff, compression,
headers and timeout.  The sender's thread holds the GIL the engine needs for all of it.

So the sender sends through a copy of the exporter's client over that transport, but
only while requests would add nothing to the request: a plain ``requests.Session``
(its default adapters with their default pool settings, no auth, hooks, cookies or
params) with no proxy, no netrc entry and no user in the URL of the endpoint.  A
response that sets a cookie puts it in the session's jar and sends the next requests
back through the session, which then sends it back as requests always would.  The
session's headers, its CA bundle (the environment's, or certifi's where requests would
use certifi's) and its client certificate are carried over.  ``direct_settings`` says
why not otherwise; the sender asks again every ``REFRESH_S``, so a proxy or netrc entry
set later takes effect.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from . import http_environment
from .otlp_response import PartialWatch

#: How often (seconds) the sender asks again whether the session still adds nothing.
REFRESH_S = 10.0


@dataclass(frozen=True)
class Direct:
    """What a request through urllib3 needs from the session: the headers requests
    would send (the session's, then the client's) and its TLS settings."""

    headers: dict[str, str]
    verify: bool | str
    cert: str | tuple[str, str] | None


def _default_adapter(adapter: Any) -> bool:
    """An adapter as requests makes it: its class, no retries, no proxy pools, and a
    pool manager with a fresh adapter's settings (an ``ssl_context``, a pinned
    fingerprint or socket options given to ``init_poolmanager`` would be lost)."""
    import urllib3
    from requests.adapters import HTTPAdapter

    if type(adapter) is not HTTPAdapter:
        return False
    retries = adapter.max_retries
    manager = getattr(adapter, "poolmanager", None)
    return (retries.total == 0 and not adapter.proxy_manager
            and type(manager) is urllib3.PoolManager
            and manager.connection_pool_kw == _fresh_pool_kw())


def _fresh_pool_kw() -> dict[str, Any]:
    from requests.adapters import HTTPAdapter

    global _FRESH_POOL_KW
    if _FRESH_POOL_KW is None:
        _FRESH_POOL_KW = dict(HTTPAdapter().poolmanager.connection_pool_kw)
    return _FRESH_POOL_KW


_FRESH_POOL_KW: dict[str, Any] | None = None


def direct_settings(session: Any, url: str,
                    client_headers: dict[str, str]) -> tuple[Direct | None, str]:
    """(settings, "direct") when ``session`` would send a POST to ``url`` exactly as
    urllib3's pool does with these settings, else (None, the reason).  Reads the
    environment through the session itself, as requests does for every request."""
    try:
        import requests
        import requests.utils
    except ImportError:  # pragma: no cover - the exporter itself needs it
        return None, "no_requests"
    if type(session) is not requests.Session:
        return None, "session_type"
    if session.auth is not None:
        return None, "auth"
    if any(session.hooks.get(name) for name in session.hooks):
        return None, "hooks"
    if len(session.cookies):
        return None, "cookies"
    if session.params:
        return None, "params"
    if session.proxies:
        return None, "proxies"
    if set(session.adapters) != {"https://", "http://"} or not all(
            _default_adapter(a) for a in session.adapters.values()):
        return None, "adapters"
    if requests.utils.get_auth_from_url(url) != ("", ""):
        return None, "url_auth"  # requests sends the URL's user and password as basic auth
    if session.trust_env:
        env = session.merge_environment_settings(url, {}, None, None, None)
        if env.get("proxies"):
            return None, "proxies"
        if requests.utils.get_netrc_auth(url) is not None:
            return None, "netrc"
        verify, cert = env.get("verify"), env.get("cert")
    else:
        verify, cert = session.verify, session.cert
    if verify is None or verify is True:
        verify = requests.utils.extract_zipped_paths(requests.utils.DEFAULT_CA_BUNDLE_PATH)
    if url.lower().startswith("https") and verify is not False and not os.path.isfile(verify):
        return None, "ca_path"  # a folder, or missing: requests' own handling and error
    headers = requests.structures.CaseInsensitiveDict(session.headers)
    headers.update(client_headers)
    merged = {k: v for k, v in headers.items() if v is not None}
    return Direct(merged, verify, cert), "direct"


class CookieWatch:
    """The urllib3 transport, watching responses for cookies: requests would keep a
    ``Set-Cookie`` in the session's jar and send it back (a load balancer's stickiness),
    so one that comes goes into that jar and ``on_cookie`` sends the next requests back
    through the session (whose jar now holds it: ``direct_settings`` says "cookies")."""

    def __init__(self, inner: Any, session: Any, on_cookie: Any) -> None:
        self.inner, self.session, self.on_cookie = inner, session, on_cookie

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        result = self.inner.request(method, url, **kwargs)
        response = getattr(result, "response", None)
        if response is not None and response.headers.get("Set-Cookie") is not None:
            try:
                import requests

                sent = requests.Request(method, url, headers=kwargs.get("headers")).prepare()
                requests.cookies.extract_cookies_to_jar(self.session.cookies, sent, response)
            finally:
                self.on_cookie()
        return result

    def is_connection_error(self, exception: Exception | None) -> bool:
        return self.inner.is_connection_error(exception)

    def close(self) -> None:
        self.inner.close()


def direct_client(client: Any, settings: Direct, session: Any = None,
                  on_cookie: Any = None) -> Any:
    """A copy of the SDK's OTLP/HTTP client (retry, backoff, compression, timeout)
    over the SDK's urllib3 transport, or None when this SDK has none; with ``session``,
    a response's cookies go into its jar and ``on_cookie`` is called (``CookieWatch``)."""
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return None
    twin = copy.copy(client)  # shares the exporter's shutdown event: its backoff ends too
    transport: Any = PartialWatch(Urllib3HTTPTransport(verify=settings.verify,
                                                        cert=settings.cert))
    if session is not None:
        transport = CookieWatch(transport, session, on_cookie or (lambda: None))
    twin._transport = transport  # noqa: SLF001
    twin._headers = dict(settings.headers)  # noqa: SLF001
    return twin


def requests_session(exporter: Any) -> Any:
    """The session of an exporter whose client sends over the SDK's requests transport,
    else None (a transport the application chose is left to do its own sending)."""
    transport = getattr(getattr(exporter, "_client", None), "_transport", None)
    if type(transport).__name__ != "RequestsHTTPTransport":
        return None
    return http_environment.session_of(exporter)
