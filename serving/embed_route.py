"""POST /embed: the hot route, answered in front of BentoML's per-request machinery.

Measured on 2 cores (benchmarks/README.md, "/embed against its floors"), BentoML's request path costs several
times what the upload itself does: its request-metrics, tracing, timeout and context middlewares, routing,
the API's multipart parsing into pydantic and the answer's validation and serialisation. So the service's
ASGI app is wrapped (serving/service.py `MapServiceDefinition.to_asgi`, through the `service_class` hook of
`@bentoml.service`) by `EmbedRoute`, which answers POST /embed itself and hands every other request to
BentoML's app unchanged. What a request costs here, each thing done once:
- the bearer token checked from the headers (serving/guards.py);
- the body read once as it streams, limits enforced on the way, multipart parsed once, each image's header
  read once as its part completes (serving/upload_body.py);
- decoding + fitting + stacking in one step on a decoding thread (serving/upload_decoding.py);
- the model run, the placement of the whole batch and each request's answer serialised (orjson, from the
  typed records, no re-validation) in the worker's one model thread (serving/batching.py,
  tsimcne_core/placing.py), shared by every request of a batch;
- with a journal, the batch's rows kept before any of its requests is answered: appended to the spool in
  the model thread (SQLite, and PostgreSQL with journal_spool: tsimcne_core/journal_spool.py) or committed
  by the worker's journal thread, several batches a transaction (PostgreSQL without one:
  serving/journal_writer.py);
- request metrics: a count and a latency per request, the placement metrics once per model run.
The same answers (`EmbedHandler.answer`) serve the API method BentoML declares for /embed (its OpenAPI
schema, in-process calls), so both paths place and refuse alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import orjson

from serving import metrics
from serving.batching import MicroBatcher
from serving.guards import token_problem
from serving.http_errors import error_body
from serving.journal_writer import JournalWriter, keep_rows
from serving.settings import ServiceSettings
from serving.upload_body import BodyLimits, ClientGone, Refusal, Upload, read_uploads
from serving.upload_decoding import DeadlineExceeded, RequestTooLarge, UploadDecoder, check_request_pixels
from tsimcne_core.journal import JournalError, SqlJournal
from tsimcne_core.journal import now as journal_now
from tsimcne_core.journal_input import ClientMetadata, MetadataError
from tsimcne_core.placing import Placer

ROUTE = "/embed"
NO_METADATA = ClientMetadata()  # what a request sent without any (frozen: shared by all of them)
UPLOAD_FIELD = "images"
# A request whose images declare at most this many pixels together is decoded on the event loop: a thread hop
# costs more than decoding a few small images (measured: benchmarks/README.md, "/embed against its floors").
INLINE_DECODE_PIXELS = 65_536
access_log = logging.getLogger("bentoml.access")
logger = logging.getLogger("bentoml.tsimcne")


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class _Job:
    batch: np.ndarray
    names: list[str]
    pixels: np.ndarray | None = None  # the batch as uint8 (N, H, W, 3): the images the journal keeps
    request: _RequestRecord | None = None  # what the journal keeps of the request (None: no journal)
    kept: asyncio.Future | None = None  # settled once the journal has committed the request's rows
    handed: bool = False  # its rows handed to the journal's writer (or the job given up): it joins no more


@dataclass(slots=True)
class _RequestRecord:
    request_id: str
    metadata: ClientMetadata
    digests: list[str]  # sha256 of each uploaded file's bytes
    originals: list[bytes] | None  # the files themselves, when the journal keeps them (journal_originals)


class EmbedHandler:
    """Everything /embed does after the body is read: limits, decoding, the batched placement, the answer.
    One per worker, made when the service opens its bundle."""

    def __init__(
        self, placer: Placer, bundle_sha256: str, settings: ServiceSettings, journal: SqlJournal | None = None
    ) -> None:
        self.placer = placer
        self.settings = settings
        self.bundle_sha256 = bundle_sha256
        self.journal = journal
        # A spooling journal (SQLite; PostgreSQL with journal_spool): each batch appended to the spool in the
        # model thread (one write call; the upkeep thread takes it into the database once a second). PostgreSQL
        # without one: its commit is a round trip and a server's fsync away, which would hold the model every
        # batch: a writer thread, several batches a transaction (benchmarks/README.md, section 16).
        # PostgreSQL: requests queued for the model whose rows the writer has not been handed yet; while there
        # are any, the writer waits a little for them to share its transaction (serving/journal_writer.py)
        self._joining = 0
        self._joining_lock = threading.Lock()
        gathers = journal is not None and not journal.spools
        self.writer = JournalWriter(journal, lambda: self._joining) if gathers else None
        prep = placer.manifest.preprocessing
        self.decoder = UploadDecoder(
            prep,
            max_pixels=settings.max_pixels,
            concurrency=settings.decode_concurrency,
            inline_pixels=INLINE_DECODE_PIXELS,
            on_active=metrics.DECODING_REQUESTS.set,
        )
        self.batcher: MicroBatcher[_Job, bytes] = MicroBatcher(self._place, max_images=settings.max_batch_images)
        self.limits = BodyLimits(
            settings.max_upload_bytes, settings.max_images, settings.max_pixels, UPLOAD_FIELD, ROUTE
        )
        head = orjson.dumps({"bundle": placer.manifest.name, "bundle_sha256": bundle_sha256})
        self._head = head[:-1] + b',"images":'  # every answer starts the same way

    async def answer(
        self, uploads: Sequence[Upload], metadata: ClientMetadata | None = None, request_id: str | None = None
    ) -> Answer:
        """The answer to a request whose uploads have been read (each header opened); with a journal, its
        rows are committed before the answer is given."""
        try:
            return await self._answer(uploads, metadata, request_id)
        except Refusal as refusal:
            return refused(refusal)

    async def answer_files(self, files: Sequence[Any]) -> Answer:
        """The same for uploads that arrived some other way (objects with `.name` and `.data`)."""
        if not files:
            return refused(self.limits.empty())
        if len(files) > self.limits.max_files:
            return refused(self.limits.too_many())
        uploads = [Upload(file.name, file.data) for file in files]
        for upload in uploads:
            upload.open(self.settings.max_pixels)
        return await self.answer(uploads)

    async def _answer(
        self, uploads: Sequence[Upload], metadata: ClientMetadata | None, request_id: str | None
    ) -> Answer:
        settings = self.settings
        try:
            check_request_pixels(uploads, settings.max_request_pixels)
        except RequestTooLarge as exc:
            raise Refusal(413, "too_many_pixels", str(exc)) from None
        if self.journal is not None and settings.journal_originals:
            _check_original_sizes(uploads, settings.journal_original_max_mb)
        deadline = time.monotonic() + settings.request_budget_s
        try:
            decoded = await self.decoder.decode(uploads, deadline)
        except DeadlineExceeded as exc:
            raise _over_budget(settings, str(exc)) from None
        if decoded.batch is None:
            for problem in decoded.problems:
                metrics.DECODE_ERRORS.labels(reason=problem["reason"]).inc()
            problems = [{"file": p["file"], "error": p["error"]} for p in decoded.problems]
            listed = ", ".join(p["file"] for p in problems)
            message = f"{len(problems)} of {len(uploads)} uploads are not usable images: {listed}"
            raise Refusal(422, "bad_image", message, problems)
        job = _Job(decoded.batch, [upload.name for upload in uploads], decoded.pixels)
        if self.journal is not None:
            request_id = request_id or uuid.uuid4().hex
            digests = [hashlib.sha256(upload.data).hexdigest() for upload in uploads]
            originals = [bytes(upload.data) for upload in uploads] if settings.journal_originals else None
            job.request = _RequestRecord(request_id, metadata or NO_METADATA, digests, originals)
            if self.writer is not None:
                job.kept = asyncio.get_running_loop().create_future()
                with self._joining_lock:
                    self._joining += 1
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                body = await self.batcher.run(job, len(job.names))
                if job.kept is not None:  # answered once the journal has committed the request's rows
                    await job.kept
        except TimeoutError:
            raise _over_budget(settings, "the time budget ran out while the images waited for the model") from None
        except JournalError as exc:
            message = f"{exc}; the images were not kept, so none is answered as placed: retry later"
            raise Refusal(503, "journal", message, headers={"Retry-After": "5"}) from None
        finally:
            if job.kept is not None:
                self._handed([job])  # a job that never reached the model (budget, client gone) joins no more
        return Answer(200, body, {"X-Request-ID": job.request.request_id} if job.request else None)

    def _place(self, jobs: Sequence[_Job]) -> list[bytes]:
        """In the model thread: one model run and placement for all `jobs`, then each job's answer; with a
        journal, the batch's rows kept here (the spool: JournalError fails the whole batch, none answered as
        placed) or handed to the writer thread (each job's `kept` settles once they are committed)."""
        batch = jobs[0].batch if len(jobs) == 1 else np.concatenate([job.batch for job in jobs])
        names = jobs[0].names if len(jobs) == 1 else [name for job in jobs for name in job.names]
        timings: dict[str, float] = {}
        placed = self.placer.place(batch, names, calls=[len(job.names) for job in jobs], timings=timings)
        metrics.record_batch(placed, timings["model"])
        answers, start = [], 0
        for job in jobs:
            stop = start + len(job.names)
            answers.append(self._head + orjson.dumps(placed[start:stop]) + b"}")
            start = stop
        if self.journal is not None and self.writer is None:  # kept here (spooled) before any job is answered
            keep_rows(self.journal, journal_values(jobs, placed, self.bundle_sha256))
        elif self.writer is not None:  # built and committed in the journal's thread, several batches a transaction
            self._handed(jobs)  # before the writer sees them: it waits only for requests still on their way
            self.writer.submit(lambda: journal_values(jobs, placed, self.bundle_sha256), [job.kept for job in jobs])
        return answers

    def _handed(self, jobs: Sequence[_Job]) -> None:
        """These jobs no longer join a journal transaction (handed to the writer, or given up): counted once."""
        with self._joining_lock:
            for job in jobs:
                if not job.handed:
                    job.handed = True
                    self._joining -= 1

    async def close(self) -> None:
        await self.batcher.close()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)


def journal_values(jobs: Sequence[_Job], placed: Sequence[Any], bundle_sha256: str) -> list[tuple]:
    """The journal's rows of a placed batch, as column values (tsimcne_core.journal.ROW_COLUMNS): each record
    with its request, metadata, file digest and the image at model size (the decoder's uint8 pixels). Built
    straight into tuples with orjson (the records are dataclasses): JournalRow objects and json cost 3x more."""
    time_now = journal_now()
    records = iter(placed)
    values = []
    for job in jobs:
        request, pixels = job.request, job.pixels  # every job has both with a journal
        metadata = request.metadata
        tags = orjson.dumps(metadata.tags).decode() if metadata.tags else "[]"
        originals = request.originals or [None] * len(request.digests)
        height, width = int(pixels.shape[1]), int(pixels.shape[2])
        for image, digest, original in zip(pixels, request.digests, originals, strict=True):
            record = next(records)
            neighbours = record.neighbours
            values.append((
                time_now, request.request_id, bundle_sha256, record.filename, digest, record.x, record.y, record.flag,
                record.score, orjson.dumps(record.evidence).decode(), record.majority_label, record.majority_share,
                orjson.dumps(neighbours).decode(), record.duplicate_of, metadata.source, metadata.sample_id, tags,
                neighbours[0].distance if neighbours else None, image.tobytes(), height, width, original,
            ))  # fmt: skip
    return values


def _check_original_sizes(uploads: Sequence[Upload], max_mb: float) -> None:
    """413 naming the file when the journal is to keep originals and one is over its own size limit."""
    limit = int(max_mb * 1024 * 1024)
    for upload in uploads:
        if len(upload.data) > limit:
            message = (
                f"{upload.name}: {len(upload.data) / 1024 / 1024:.1f} MiB; the journal keeps uploaded files up to "
                f"{max_mb:g} MiB (setting journal_original_max_mb)"
            )
            raise Refusal(413, "too_large", message)


def refused(refusal: Refusal) -> Answer:
    """A Refusal as the answer the client gets, counted by its reason."""
    metrics.REJECTED_REQUESTS.labels(reason=refusal.reason).inc()
    return Answer(refusal.status, orjson.dumps(error_body(refusal.message, refusal.detail)), refusal.headers)


def _over_budget(settings: ServiceSettings, what: str) -> Refusal:
    message = (
        f"request not completed within its time budget of {settings.request_budget_s:g} s (setting "
        f"request_budget_s): {what}; retry later, or send fewer or smaller images"
    )
    return Refusal(503, "over_budget", message, headers={"Retry-After": "5"})


class EmbedRoute:
    """ASGI: POST /embed answered here (`handler()` gives the worker's EmbedHandler once it has one), every
    other request passed to `app` (BentoML's)."""

    def __init__(
        self,
        app: Any,
        handler: Callable[[], EmbedHandler | None],
        token: str | None = None,
        log_requests: bool = False,
        keepalive_requests: int = 0,
    ) -> None:
        self.app = app
        self.handler = handler
        self.token = token.encode() if token else None
        self.log_requests = log_requests
        # The workers share one listening socket and a kept-alive connection stays with the worker that
        # accepted it: 16 connections opened at once were seen all on one of two workers, which then served
        # three quarters of what two do. Asking a client to reconnect every ~N answers (at random, no state
        # per connection) lets the worker with time to accept take it over.
        self.reconnect_chance = 1.0 / keepalive_requests if keepalive_requests else 0.0
        self.serve_embed: Any = self._serve  # what answers /embed (tracing may wrap it: serving/service.py)
        self._counted = {status: metrics.EMBED_REQUESTS.labels(status=status) for status in metrics.EMBED_STATUSES}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == ROUTE:
            await self.serve_embed(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: dict, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        try:
            answer = await self._answer(scope, receive)
        except ClientGone:
            return
        except Exception:  # a fault of ours (not of the request): logged with its traceback, answered in JSON
            logger.exception("POST %s failed", ROUTE)
            message = f"internal error while placing the images (the service log has the details); {ROUTE} is still up"
            answer = Answer(500, orjson.dumps(error_body(message)))
        if self.reconnect_chance and random.random() < self.reconnect_chance:
            answer.headers = {**(answer.headers or {}), "Connection": "close"}
        await _send(send, answer)
        seconds = time.perf_counter() - started
        status = str(answer.status)
        counter = self._counted.get(status) or metrics.EMBED_REQUESTS.labels(status=status)
        counter.inc()
        metrics.EMBED_SECONDS.observe(seconds)
        if self.log_requests:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                "%s:%s (scheme=%s,method=%s,path=%s,type=%s) (status=%d,size=%d) %.3fms",
                client[0], client[1], scope.get("scheme"), scope["method"], ROUTE,
                _header(scope, b"content-type"), answer.status, len(answer.body), seconds * 1000,
            )  # fmt: skip

    async def _answer(self, scope: dict, receive: Any) -> Answer:
        if scope["method"] != "POST":
            return Answer(
                405, orjson.dumps(error_body(f"{ROUTE} takes POST requests (got {scope['method']})")), {"Allow": "POST"}
            )
        problem = token_problem(scope, self.token)
        if problem is not None:
            challenge = {"WWW-Authenticate": 'Bearer realm="tsimcne"'}
            return refused(Refusal(401, "unauthorised", problem, headers=challenge))
        handler = self.handler()
        if handler is None:
            return refused(Refusal(503, "not_ready", "the service is starting: retry in a few seconds"))
        # A client trickling its body must not hold the connection and its buffer for ever (BentoML's traffic
        # timeout bounded this before /embed was answered in front of BentoML).
        metadata = None
        if scope.get("query_string"):  # client metadata for the journal: checked before the body is read
            try:
                metadata = ClientMetadata.parse(parse_qs(scope["query_string"].decode("latin-1")))
            except MetadataError as exc:
                status, reason = (413, "too_large") if exc.too_large else (400, "metadata")
                return refused(Refusal(status, reason, f"query parameter {exc}"))
        seconds = handler.settings.body_timeout_s
        try:
            async with asyncio.timeout(seconds):
                uploads = await read_uploads(scope, receive, handler.limits)
        except Refusal as refusal:
            return refused(refusal)
        except TimeoutError:
            message = f"the request body did not arrive within {seconds:g} s (setting body_timeout_s)"
            return refused(Refusal(408, "body_timeout", message))
        return await handler.answer(uploads, metadata, _request_id(scope))


def _request_id(scope: dict) -> str | None:
    """The client's X-Request-ID when it is a short printable token, so its logs and the journal agree."""
    given = _header(scope, b"x-request-id")
    if given and len(given) <= 128 and given.isprintable() and " " not in given:
        return given
    return None


async def _send(send: Any, answer: Answer) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer.body)).encode())]
    if answer.headers:
        headers += [(key.lower().encode(), value.encode()) for key, value in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""
