"""ASGI middlewares that stand in front of every route: optional bearer-token auth and the body-size limit.

Both answer with the same JSON error shape as the API ({"error": "..."}) and never let an oversized
or unauthenticated request reach the multipart parser. The body limit reads the request into memory
up to the limit and answers 413 as soon as it is passed (a missing or lying Content-Length changes
nothing), so a client cannot make the service spool gigabytes to disk.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.errors import send_json_error
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


class BearerTokenAuth:
    """Requests need `Authorization: Bearer <token>` when a token is configured; health checks stay open."""

    def __init__(self, app: ASGIApp, token: str | None = None, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization") or ""
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token):
            reason = "missing" if not given else "wrong"
            await send_json_error(
                send,
                401,
                f"authentication required: {reason} 'Authorization: Bearer <token>' header",
                {"WWW-Authenticate": 'Bearer realm="tsimcne"'},
            )
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
            body = await _read_body(receive, limit=self.max_bytes)
        except _BodyTooLarge:
            await self._reject(send, f"of more than {self.max_bytes:,} bytes")
            return
        if body is not None:
            await self.app(scope, _replay(body, receive), send)


class _BodyTooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The whole request body, or None when the client disconnected; _BodyTooLarge as soon as more than
    `limit` bytes have arrived (nothing beyond the limit is kept)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


_BOUNDARY = re.compile(rb'boundary="?([^";,]+)"?', re.IGNORECASE)


def count_parts(body: bytes, content_type: str) -> int | None:
    """How many parts a multipart body has, by counting its delimiter lines; None without a boundary.

    (A well-formed body has one delimiter per part plus the closing one; the boundary cannot occur
    in a part's content, or the parser would split the part there too.)"""
    found = _BOUNDARY.search(content_type.encode("latin-1"))
    if found is None:
        return None
    delimiter = b"--" + found.group(1).strip()
    opening = 1 if body.startswith(delimiter) else 0
    return max(opening + body.count(b"\r\n" + delimiter) - 1, 0)


class UploadGuard:
    """Checks an upload route's body before BentoML parses it: multipart, files only, in one field, not too many.

    BentoML answers a wrong field name, a plain-text value or a malformed body with HTTP 500 (it tries
    to JSON-decode unknown parts, or to download a text value as a URL); here they get a 4xx naming the
    problem. The body is parsed with the same parser BentoML uses, so what passes here parses there.
    Parts are counted before parsing, so every count over `max_files` is 413 (the parser's own file
    limit would answer 400 past it).
    """

    def __init__(
        self,
        app: ASGIApp,
        path: str,
        field: str,
        max_files: int,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app, self.path, self.field, self.max_files, self.on_reject = app, path, field, max_files, on_reject

    async def _reject(self, send: Send, status: int, reason: str, message: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)
        await send_json_error(send, status, message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        body = await _read_body(receive)
        if body is None:
            return
        content_type = (_header(scope, b"content-type") or "").strip()
        example = f"e.g. `curl -F {self.field}=@cell.png {self.path}`"
        if not body.strip():
            message = f"empty request: send one or more image files in the multipart field '{self.field}'; {example}"
            await self._reject(send, 400, "empty", message)
            return
        if not content_type.lower().startswith("multipart/form-data"):
            await self._reject(
                send,
                415,
                "content_type",
                f"send images as multipart/form-data in the field '{self.field}' "
                f"(got content type {content_type or 'none'!r}); {example}",
            )
            return
        too_many = (
            f"more than {self.max_files} images in one request (the limit, setting max_images); "
            "send them in several requests"
        )
        parts = count_parts(body, content_type)
        if parts is not None and parts > self.max_files:
            await self._reject(send, 413, "too_many_images", too_many)
            return
        request = Request(scope, _replay(body, receive))
        try:
            form = await request.form(max_files=self.max_files + 1, max_fields=100)
        except Exception as exc:  # starlette raises HTTPException or MultiPartException for bad bodies
            detail = getattr(exc, "detail", None) or str(exc) or exc.__class__.__name__
            if "too many files" in str(detail).lower():  # parts the count above did not see
                await self._reject(send, 413, "too_many_images", too_many)
                return
            await self._reject(send, 400, "malformed", f"malformed multipart/form-data body: {detail}")
            return
        try:
            count = 0
            for key, value in form.multi_items():
                if key != self.field:
                    await self._reject(
                        send,
                        400,
                        "wrong_field",
                        f"unexpected multipart field {key!r}: images go in the field '{self.field}'; {example}",
                    )
                    return
                if not isinstance(value, UploadFile):
                    await self._reject(
                        send,
                        400,
                        "not_a_file",
                        f"the field '{self.field}' must carry files, not text values; {example}",
                    )
                    return
                count += 1
            if count > self.max_files:
                await self._reject(send, 413, "too_many_images", too_many)
                return
        finally:
            await form.close()
        await self.app(scope, _replay(body, receive), send)
