"""Reading the journal over HTTP: GET /placements (filters, cursor pages, JSON, CSV or Parquet), one placement,
the image it was placed from at model size, the uploaded file (when kept), reviews and /drift. Behind the
bearer token like every route but health (serving/guards.py).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from serving.http_errors import json_error
from tsimcne_core.flag import Flag
from tsimcne_core.journal import (
    MAX_PAGE,
    READ_COLUMNS,
    CursorGone,
    JournalError,
    PlacementFilter,
    SqlJournal,
    flat_values,
)
from tsimcne_core.journal_input import MAX_NOTE, MAX_TEXT, MetadataError, utc_time

JOURNAL_OFF = "the journal is off: start the service with journal=sqlite:///PATH (or postgresql://...)"


class ReviewRequest(BaseModel):
    """A person's verdict on a placed image."""

    model_config = ConfigDict(extra="forbid")
    verdict: str = Field(min_length=1, max_length=MAX_TEXT, description="fine, artefact, or one of the map's labels")
    reviewer: str | None = Field(None, max_length=MAX_TEXT)
    note: str | None = Field(None, max_length=MAX_NOTE)


def journal_router(
    journal: Callable[[], SqlJournal | None],
    class_names: Callable[[], list[str]],
    reference_labels: Callable[[], dict[str, float]],
) -> APIRouter:
    """Routes over the running worker's journal (`journal()`: None when the setting is unset); `class_names`
    are the labels a review may give, `reference_labels` the reference map's label mix (for /drift)."""
    router = APIRouter()

    @router.get("/placements")
    def placements(
        since: str | None = Query(None, description="from this time on (ISO 8601, UTC)"),
        until: str | None = Query(None, description="before this time (ISO 8601, UTC)"),
        flag: Flag | None = Query(None),  # noqa: B008
        label: str | None = Query(None, description="majority label among the neighbours"),
        source: str | None = Query(
            None, description="the client's source (instrument or pipeline); empty: images sent without one"
        ),
        review: str | None = Query(None, description="review state: unreviewed, fine, artefact or a label"),
        flagged: bool | None = Query(None, description="true: flagged images only (either kind); false: unflagged"),
        after: int | None = Query(None, ge=0, description="the cursor: the `next` of the previous page"),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        format: Literal["json", "csv", "parquet"] = Query("json"),
    ) -> Response:
        """Placed images, oldest first, a page at a time (`next` is the cursor of the following page)."""
        try:
            since, until = utc_time("since", since), utc_time("until", until)
        except MetadataError as exc:
            return json_error(400, str(exc))
        where = PlacementFilter(since, until, flag.value if flag else None, label, source, review, flagged)
        rows = _use(journal, lambda store: store.placements(where, after, limit))
        if isinstance(rows, Response):
            return rows
        following = rows[-1]["id"] if len(rows) == limit else None
        if format == "csv":
            return Response(_csv(rows), media_type="text/csv; charset=utf-8", headers=_cursor(following))
        if format == "parquet":
            return Response(_parquet(rows), media_type="application/vnd.apache.parquet", headers=_cursor(following))
        return JSONResponse({"placements": rows, "next": following}, headers=_cursor(following))

    @router.get("/placements/{row_id}")
    def placement(row_id: int) -> Response:
        row = _use(journal, lambda store: store.placement(row_id))
        return _found(row, f"/placements/{row_id}")

    @router.get("/placements/{row_id}/image")
    def image(row_id: int) -> Response:
        """The image as the model saw it (model size, PNG)."""
        pixels = _use(journal, lambda store: store.image(row_id))
        if isinstance(pixels, Response) or pixels is None:
            return _found(pixels, f"/placements/{row_id}/image")
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, format="PNG")
        return Response(png.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=86400, immutable"})

    @router.get("/placements/{row_id}/original")
    def original(row_id: int) -> Response:
        """The uploaded file itself, as it came (kept when the service runs with journal_originals=true)."""
        kept = _use(journal, lambda store: store.original(row_id))
        if isinstance(kept, Response):
            return kept
        if kept is None:
            message = f"/placements/{row_id}/original: no such placement, or its file was not kept (journal_originals)"
            return json_error(404, message)
        name, data = kept
        disposition = f"attachment; filename*=UTF-8''{quote(name)}"
        return Response(data, media_type="application/octet-stream", headers={"Content-Disposition": disposition})

    @router.post("/placements/{row_id}/review")
    def review(row_id: int, verdict: ReviewRequest) -> Response:
        """Record a verdict: `fine` (a clean image; it may be folded into the map), `artefact`, or a label."""
        allowed = ["fine", "artefact", *class_names()]
        if journal() is not None and verdict.verdict not in allowed:
            return json_error(400, f"verdict: {verdict.verdict!r} is not one of {', '.join(allowed)}")
        row = _use(journal, lambda store: store.review(row_id, verdict.verdict, verdict.reviewer, verdict.note))
        return _found(row, f"/placements/{row_id}")

    @router.get("/drift")
    def drift(
        since: str | None = Query(None, description="from this time on (ISO 8601, UTC)"),
        until: str | None = Query(None, description="before this time (ISO 8601, UTC)"),
    ) -> Response:
        """Per day and source: images, the flagged share, the label mix (beside the reference map's) and the
        median distance to the nearest reference image."""
        try:
            first, last = utc_time("since", since), utc_time("until", until)
        except MetadataError as exc:
            return json_error(400, str(exc))
        days = _use(journal, lambda store: store.drift(first, last))
        if isinstance(days, Response):
            return days
        return JSONResponse({"reference_labels": reference_labels(), "days": days})

    return router


def _use(journal: Callable[[], SqlJournal | None], read: Callable[[SqlJournal], Any]) -> Any:
    """`read(journal)`, or the error answer: 404 saying how to turn the journal on, 400 for a cursor whose row was
    pruned, 503 naming the journal when it fails."""
    store = journal()
    if store is None:
        return json_error(404, JOURNAL_OFF)
    try:
        return read(store)
    except CursorGone as exc:
        return json_error(400, str(exc))
    except JournalError as exc:
        return json_error(503, str(exc), headers={"Retry-After": "5"})


def _found(row: Any, path: str) -> Response:
    """A placement row as JSON, an error answer as it is, or 404 for a missing one."""
    if isinstance(row, Response):
        return row
    return JSONResponse(row) if row is not None else json_error(404, f"{path}: no such placement")


def _cursor(following: int | None) -> dict[str, str]:
    return {"X-Next-Cursor": str(following)} if following is not None else {}


def _parquet(rows: list[dict]) -> bytes:
    """A page as Parquet: one column per field, the JSON ones (evidence, neighbours, tags) as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [flat_values(row) for row in rows]
    columns = {name: [values[i] for values in flat] for i, name in enumerate(READ_COLUMNS)}
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out)
    return out.getvalue()


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(READ_COLUMNS)
    writer.writerows(flat_values(row) for row in rows)
    return out.getvalue()
