"""The layer every HTTP request passes before any route (RELIABILITY.md S2, S3): a plain ASGI
middleware, so it sees unknown paths and streamed responses too.

1. Host check. A server bound to loopback answers only requests whose Host header names loopback
   (`localhost`, `127.0.0.1`, `[::1]`) or a name given with --allowed-host: a web page on another site
   can make a browser send requests to 127.0.0.1 under its own name (DNS rebinding); those get 403.
2. API key. With a key, every path but the PUBLIC ones needs `Authorization: Bearer KEY`, compared
   with hmac.compare_digest (constant time, case-sensitive); 401 otherwise. The public paths are
   /health and the page's shell (its HTML, script and style), which hold no key and no data: the
   page asks its user for the key and keeps it in memory.
3. Headers on every response: Content-Security-Policy `default-src 'self'` (the page can load and
   fetch nothing from elsewhere, and an injected tag could not either), nosniff, no framing, no
   referrer. No CORS header is ever sent, so other origins' scripts cannot read any answer. A route
   that sets one of these headers itself keeps its own: the /explain pages send theirs (`default-src
   'none'`: no fetch at all, their one inline script and style allowed by hash, data: images).
4. Counting responses by route and status for /metrics.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from llmkit.serve.errors import error_body
from llmkit.serve.metrics import Metrics

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/", "/health", "/static/chat.js", "/static/chat.css"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
SECURITY_HEADERS = [(b"content-security-policy", b"default-src 'self'"), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


class Guard:
    """`allowed_hosts`: the Host names accepted, or None to accept any (a server bound to a public
    address, where the operator's API key and network decide who reaches it)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: frozenset[str] | None,
                 metrics: Metrics, routes: frozenset[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes
        self.key = api_key.encode("utf-8") if api_key else None
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        headers = dict(scope["headers"])  # ASGI header names are lower-case bytes

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                own = message.get("headers", [])
                named = {name.lower() for name, _ in own}
                message["headers"] = [*own, *(h for h in SECURITY_HEADERS if h[0] not in named)]
                self.metrics.responses[(route, message["status"])] += 1
            await send(message)

        if self.allowed_hosts is not None and not host_allowed(headers.get(b"host", b""), self.allowed_hosts):
            await _refuse(send_with_headers, 403, "this server answers only requests addressed to "
                          + ", ".join(sorted(self.allowed_hosts)) + " (see --allowed-host)")
            return
        if self.key is not None and scope["path"] not in PUBLIC_PATHS \
                and not key_matches(headers.get(b"authorization", b""), self.key):
            await _refuse(send_with_headers, 401, "a valid API key is required: send the header "
                          "'Authorization: Bearer KEY'", extra=[(b"www-authenticate", b"Bearer")], code="invalid_api_key")
            return
        await self.app(scope, receive, send_with_headers)


def host_allowed(host: bytes, allowed: frozenset[str]) -> bool:
    """Whether a Host header (`name`, `name:port`, `[v6]` or `[v6]:port`) names an allowed host."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        name = text[:text.find("]") + 1]
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return bool(name) and name in allowed


def key_matches(authorization: bytes, key: bytes) -> bool:
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


async def _refuse(send: Callable, status: int, message: str, *, extra: list[tuple[bytes, bytes]] = (),
                  code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
