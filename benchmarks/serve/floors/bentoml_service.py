"""The BentoML floor of POST /embed: a BentoML 1.4 service with /embed's upload type answering a constant.

    TSIMCNE_FLOOR=default|tuned TSIMCNE_FLOOR_WORKERS=N bentoml serve benchmarks.serve.floors.bentoml_service:Floor

`default`: BentoML's own per-request extras as they come (request metrics, OpenTelemetry, access log);
`tuned`: access log off, tracing excluded for the route, request metrics off (so also no /metrics): the least
that BentoML's API decorator costs. What /embed costs above this is ours.
"""

from __future__ import annotations

import os

import bentoml
from pydantic import Field

from serving.uploads import UploadedFile

TUNED = os.environ.get("TSIMCNE_FLOOR", "default") == "tuned"
EXTRAS = (
    {"metrics": {"enabled": False}, "logging": {"access": {"enabled": False}}, "tracing": {"excluded_urls": ["/embed"]}}
    if TUNED
    else {}
)


@bentoml.service(name="floor", workers=int(os.environ.get("TSIMCNE_FLOOR_WORKERS", "1")), **EXTRAS)
class Floor:
    @bentoml.api(route="/embed")
    async def embed(self, images: list[UploadedFile] = Field(default_factory=list)) -> dict:  # noqa: B008
        return {"images": len(images), "bytes": sum(len(image.data) for image in images)}
