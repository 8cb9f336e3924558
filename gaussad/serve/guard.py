"""Around every HTTP request: the API key check, security headers and the request metrics.

A plain ASGI middleware (no per-request task or body copy, unlike Starlette's `BaseHTTPMiddleware`). With
API keys, every route but liveness and readiness (`/v2/health/*`, which orchestrators probe without
credentials) needs `Authorization: Bearer KEY`, compared in constant time against every accepted key.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gaussad.serve.metrics import ServiceMetrics

OPEN_PREFIX = "/v2/health/"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def authorized(header: str | None, keys: tuple[bytes, ...]) -> bool:
    """Whether an Authorization header carries one of `keys` as a bearer token (constant time per key)."""
    scheme, _, token = (header or "").partition(" ")
    offered = token.strip().encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(offered, key) for key in keys]  # every key compared, no early exit
    return scheme.lower() == "bearer" and any(matches)


class Guard:
    """ASGI middleware: authentication, security headers, request counts and latencies by route."""

    def __init__(self, app: ASGIApp, keys: tuple[bytes, ...], metrics: ServiceMetrics) -> None:
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["started"] = started
        status = 500

        async def send_guarded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            guarded = self.keys and not scope["path"].startswith(OPEN_PREFIX)
            if guarded and not authorized(Headers(scope=scope).get("authorization"), self.keys):
                await _unauthorized(send_guarded)
                return
            await self.app(scope, receive, send_guarded)
        finally:
            route: Any = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


async def _unauthorized(send: Send) -> None:
    body = json.dumps({"error": "missing or wrong API key: send Authorization: Bearer KEY"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
