"""ASGI middlewares that stand in front of BentoML's routes: optional bearer-token auth and the body-size limit.

Both answer with the same JSON error shape as the API ({"error": "..."}) and never let an oversized
or unauthenticated request reach the multipart parser. The body limit reads the request into memory
up to the limit and answers 413 as soon as it is passed (a missing or lying Content-Length changes
nothing), so a client cannot make the service spool gigabytes to disk.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.http_errors import send_json_error
from serving.upload_body import BodyTooLarge, ClientGone, body_chunks
from serving.webpage import PAGE_PATHS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
# Everything readable without the bearer token: health checks, and the page with its assets (no data).
OPEN_PATHS = HEALTH_PATHS | PAGE_PATHS


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def token_problem(scope: Scope, token: bytes | None) -> str | None:
    """Why a request is not authorised (a missing or wrong bearer token), or None when it is (or no token
    is configured)."""
    if token is None:
        return None
    given = _header(scope, b"authorization") or ""
    scheme, _, credentials = given.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token):
        return None
    reason = "missing" if not given else "wrong"
    return f"authentication required: {reason} 'Authorization: Bearer <token>' header"


class BearerTokenAuth:
    """Requests need `Authorization: Bearer <token>` when a token is configured; health checks stay open.
    (POST /embed, answered in front of this middleware, checks the token with the same `token_problem`.)"""

    def __init__(self, app: ASGIApp, token: str | None = None, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        problem = token_problem(scope, self.token)
        if problem is not None:
            await send_json_error(send, 401, problem, {"WWW-Authenticate": 'Bearer realm="tsimcne"'})
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for request bodies over `max_bytes`; the body is then handed on from memory."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def _reject(self, send: Send, size: str) -> None:
        if self.on_reject is not None:
            self.on_reject()
        limit_mib = self.max_bytes / (1024 * 1024)
        await send_json_error(
            send, 413, f"request body {size} exceeds the limit of {self.max_bytes:,} bytes ({limit_mib:g} MiB)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, f"of {int(declared):,} bytes")
            return
        try:
            body = b"".join([chunk async for chunk in body_chunks(receive, self.max_bytes)])
        except BodyTooLarge:
            await self._reject(send, f"of more than {self.max_bytes:,} bytes")
            return
        except ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
