"""The map page (GET /), its two assets, reference thumbnails and BentoML's API page moved to /docs.

The page is plain HTML, CSS and JavaScript written for this project (serving/web/); it loads nothing
from outside the service, so it works on a lab network with no internet. Page and assets hold no
data and stay open when the service has a bearer token; the page asks for the token and sends it with
every data request (GET /info, /map, /thumbnail, the journal's routes, POST /embed), which stay protected.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from starlette.responses import JSONResponse, Response

from serving.http_errors import json_error

WEB = resources.files("serving") / "web"
SCRIPT = "text/javascript; charset=utf-8"
ASSETS = {
    "map.js": SCRIPT,
    "map-data.js": SCRIPT,
    "map-render.js": SCRIPT,
    "map-journal.js": SCRIPT,
    "map-cards.js": SCRIPT,
    "map.css": "text/css; charset=utf-8",
}
# The page and its assets, which carry no data: part of serving/guards.py OPEN_PATHS.
PAGE_PATHS = frozenset({"/", *(f"/ui/{name}" for name in ASSETS)})


def _asset(name: str) -> bytes:
    return (WEB / name).read_bytes()


class Thumbnails:
    """The reference images' thumbnails (reference.npz), read on first use and served as PNG.

    Loaded lazily: a 100,000-image bundle holds ~300 MB of 32 px thumbnails, which a worker that never
    serves the page should not pay for.
    """

    def __init__(self, reference_file: Path) -> None:
        self.reference_file = reference_file
        self._images: np.ndarray | None = None
        self._lock = threading.Lock()

    def _load(self) -> np.ndarray:
        with self._lock:
            if self._images is None:
                with np.load(self.reference_file, allow_pickle=False) as reference:
                    if "thumbnails" in reference.files:
                        self._images = reference["thumbnails"]
                    else:
                        self._images = np.zeros((0, 1, 1, 3), dtype=np.uint8)
            return self._images

    def count(self) -> int:
        return len(self._load())

    def png(self, index: int) -> bytes | None:
        images = self._load()
        if not 0 <= index < len(images):
            return None
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(buffer, format="PNG")
        return buffer.getvalue()


def _not_found(message: str) -> JSONResponse:
    return json_error(404, message)


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter errors in the service's error shape: {"error": "...naming the parameter..."}."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    parts = [f"{' '.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors]
    return json_error(422, "; ".join(parts) or "invalid request")


def page_router(thumbnails: Callable[[], Thumbnails]) -> APIRouter:
    """Routes of the page; `thumbnails` reaches the running service's bundle."""
    router = APIRouter()
    no_cache = {"Cache-Control": "no-cache"}

    @router.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=no_cache)

    @router.get("/ui/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in ASSETS:
            return _not_found(f"/ui/{name}: no such page asset")
        return Response(_asset(name), media_type=ASSETS[name], headers=no_cache)

    @router.get(
        "/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such reference image"}},
    )
    def thumbnail(index: int) -> Response:
        """The thumbnail (at most 32 px) of reference image `index`, its position in GET /map's arrays.

        A query parameter, not a path segment: BentoML labels its request metrics with the path, and a
        page hovering over 100,000 points would otherwise add a metric series per image.
        """
        store = thumbnails()
        data = store.png(index)
        if data is None:
            count = store.count()
            if count == 0:
                return _not_found(f"thumbnail {index}: this bundle has no thumbnails")
            return _not_found(f"thumbnail {index}: the reference map has images 0 to {count - 1}")
        # The page adds the bundle's checksum to the URL (&v=...), so a new bundle is fetched anew.
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})

    @router.get("/docs", include_in_schema=False)
    def api_docs() -> Response:
        """BentoML's own API page, which the map page replaces at /."""
        import _bentoml_impl.server as bentoml_server

        page = Path(bentoml_server.__file__).parent / "main-openapi.html"
        if not page.is_file():
            return _not_found("this BentoML version has no API page; the OpenAPI spec is at /docs.json")
        return Response(page.read_bytes(), media_type="text/html; charset=utf-8")

    return router
