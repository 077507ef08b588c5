"""GET /map: the reference map as JSON (the default, unchanged for existing clients) or, with
`?format=binary`, as the binary block of serving/map_wire.py; gzip-compressed when the client's
Accept-Encoding allows it (browsers always do).

A query parameter rather than content negotiation on Accept: the form is visible in the URL, in the
OpenAPI spec and in logs, and caches need no `Vary: Accept`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from serving.api_models import MapResponse
from serving.map_wire import MEDIA_TYPE, MapOnTheWire

JSON_TYPE = "application/json"

MAP_DESCRIPTION = """The reference map: every reference (training) image's position, label and id.

`format=json` (default): {"bundle", "class_names", "x", "y", "labels", "ids"} (MapResponse).
`format=binary`: one block of type application/vnd.tsimcne.map: the magic `TSMAPBIN`, uint32 version
(1) and uint32 header length, a JSON header (bundle, class_names, count, bounds, size, sections with
offset and length), then little-endian float32 x, float32 y, uint16 labels (65535 = unlabelled),
uint32 id_offsets (count + 1) and the UTF-8 ids, each section at a multiple of 8 bytes
(serving/map_wire.py; README "GET /map"). Both are gzip-compressed when Accept-Encoding allows it.
"""


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header lists gzip (or *) without q=0; a malformed q-value counts as
    not accepted (the answer is then uncompressed rather than an error)."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            quality = params.strip().lower().replace(" ", "")
            try:
                if not quality.startswith("q=") or float(quality[2:]) > 0:
                    return True
            except ValueError:
                return False
    return False


def map_router(reference_map: Callable[[], MapOnTheWire]) -> APIRouter:
    """The /map route; `reference_map` reaches the running service's map (loaded once per worker)."""
    router = APIRouter()

    @router.get(
        "/map",
        response_class=Response,
        description=MAP_DESCRIPTION,
        responses={
            200: {
                "model": MapResponse,
                "description": "the reference map",
                "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    def reference_map_route(
        request: Request,
        format: Literal["json", "binary"] = Query(
            "json", description="json (default; the MapResponse schema) or binary (application/vnd.tsimcne.map)"
        ),
    ) -> Response:
        """Coordinates, labels and ids of the bundle's reference (training) images."""
        the_map = reference_map()
        gzip = accepts_gzip(request.headers.get("accept-encoding", ""))
        headers = {"Vary": "Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        if format == "binary":
            body = the_map.binary_gzip() if gzip else the_map.binary()
            return Response(body, media_type=MEDIA_TYPE, headers=headers)
        if the_map.json_cacheable():
            body = the_map.json_gzip() if gzip else the_map.json()
            return Response(body, media_type=JSON_TYPE, headers=headers)
        chunks = the_map.json_gzip_chunks() if gzip else the_map.json_chunks()
        return StreamingResponse(chunks, media_type=JSON_TYPE, headers=headers)

    return router
