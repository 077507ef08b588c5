"""The service's error answers, in one shape (`{"error": ..., "detail": [...]}`, api_models.ErrorResponse)
wherever they are made: BentoML's /embed, the FastAPI routes of the page, /map and /info, and the ASGI
guards that answer before either sees the request."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serving.api_models import ErrorResponse

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def error_body(message: str, detail: list[dict] | None = None) -> dict[str, Any]:
    return ErrorResponse(error=message, detail=detail).model_dump(exclude_none=True)


def json_error(status: int, message: str, detail: list[dict] | None = None, headers: dict[str, str] | None = None):
    """A starlette JSONResponse (for BentoML and FastAPI routes)."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(message, detail), status_code=status, headers=headers)


async def send_json_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """The same answer sent by an ASGI middleware that stands in front of the routes."""
    body = json.dumps(error_body(message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
