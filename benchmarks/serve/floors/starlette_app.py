"""The plain Starlette floor of POST /embed: the multipart body parsed, each file read, a small JSON answer.

    uvicorn benchmarks.serve.floors.starlette_app:app --workers 2 --no-access-log

No model, no BentoML: what the same upload costs in the bare web framework on these cores, so /embed's
figures can be read as a share of it (benchmarks/serve/hot_path.py runs it in the same session).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def embed(request: Request) -> JSONResponse:
    async with request.form(max_files=64) as form:
        sizes = [len(await value.read()) for value in form.getlist("images") if isinstance(value, UploadFile)]
    return JSONResponse({"images": len(sizes), "bytes": sum(sizes)})


app = Starlette(routes=[Route("/embed", embed, methods=["POST"])])
