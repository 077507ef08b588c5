"""The BentoML service: places uploaded images on a bundle's map.

    bentoml serve serving.service:MapService --arg bundle=models/demo      (or TSIMCNE_BUNDLE=models/demo)
    bentoml serve serving.service:MapService --arg model_tag=demo:latest   (a bundle in BentoML's model store)

Routes: POST /embed (multipart field `images`, one or many files, or one image as the body; answered in
front of BentoML's own request path by serving/embed_route.py), GET /map, GET /info, /metrics,
/healthz /livez /readyz, /docs.json (OpenAPI), /docs (API page); the map page at / with reference
thumbnails at /thumbnail?index={index} (serving/webpage.py). Settings: serving/settings.py. The bundle is opened and
verified once per worker, with onnxruntime on CUDA when there is a GPU (or when `provider=cuda`
demands it: then the service refuses to start without one) and on the CPU otherwise; /readyz answers
200 only after that and one warm-up run. Bad input is answered 4xx with {"error": ...} naming the file,
field or limit; the worker stays up.

`MapService` is defined at module level, as BentoML's examples write it, and importing this module does
nothing else: the settings are read, the bundle checked and the workers, guards and tracing configured when
the server starts (`MapServiceDefinition.inject_config`, which `bentoml serve` and `bentoml build` call, and
each worker), and the bundle opened in each worker's `MapService()`. Tests and tools import it freely; the
/embed body is `EmbedHandler` (serving/embed_route.py), a plain class they can drive in-process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import Field
from starlette.responses import Response

from serving import metrics
from serving.api_models import EmbedResponse, InfoResponse, Limits
from serving.embed_route import ROUTE as EMBED_ROUTE
from serving.embed_route import EmbedHandler, EmbedRoute
from serving.guards import BearerTokenAuth, BodySizeLimit
from serving.journal_routes import journal_router
from serving.journal_upkeep import JournalUpkeep
from serving.map_route import map_router
from serving.map_wire import MapOnTheWire
from serving.model_store import bundle_path_from_store
from serving.settings import ServiceSettings, SettingsError, load_settings, worker_plan
from serving.uploads import UploadedFile
from serving.webpage import Thumbnails, page_router, validation_error
from tsimcne_core.bundle_format import MANIFEST, REFERENCE_FILE, BundleError, open_bundle, sha256_file
from tsimcne_core.calibration import public_calibration
from tsimcne_core.journal import JournalError, open_journal
from tsimcne_core.neighbours import set_faiss_threads
from tsimcne_core.placing import Placer
from tsimcne_core.public import public_evaluation, public_folds
from tsimcne_core.versions import installed_versions

logger = logging.getLogger("bentoml.tsimcne")
REQUEST_TIMEOUT_S = 120  # BentoML's request timeout; the reverse proxies in deploy/ wait as long


def _prepare_environment(threads: int) -> None:
    """Thread pools that busy-wait must not take the cores from the event loops and onnxruntime: numpy's
    BLAS threads spin after each matrix product (one BLAS thread per worker served 40 % more requests in a
    load test, benchmarks/README.md), and FAISS's OpenMP threads spin after each search; OpenMP's count is
    per thread, so an `omp_set_num_threads` in the worker's main thread does not reach its model thread,
    which searches (with two OpenMP threads in each of two workers, the 1,000,000-image bundle served a
    quarter of the requests). Set at start-up in `bentoml serve` itself, before it starts its workers, so they
    inherit it; explicit OPENBLAS_NUM_THREADS / OMP_NUM_THREADS in the environment win."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@functools.cache
def service_settings() -> ServiceSettings:
    """The settings from `--arg` and TSIMCNE_* variables, read once per process when the server starts; a bad
    or missing one stops `bentoml serve` with one line (this runs at start-up, as the program's entry point)."""
    try:
        settings = load_settings(vars(bentoml.use_arguments()))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    if settings.bundle is None and settings.model_tag is None:
        sys.exit(
            "error: no bundle to serve: pass --arg bundle=models/NAME (or set TSIMCNE_BUNDLE), "
            "or --arg model_tag=NAME:latest for a bundle registered in BentoML's model store"
        )
    return settings


def _bundle_folder(settings: ServiceSettings) -> Path:
    """The bundle folder named by the settings, checked to exist; BundleError otherwise."""
    if settings.model_tag is not None:
        return bundle_path_from_store(settings.model_tag)
    folder = Path(settings.bundle or "")
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder (from the 'bundle' setting)")
    return folder


def _check_bundle_before_start(settings: ServiceSettings) -> None:
    """In the `bentoml serve` process itself: a missing or damaged bundle stops it with one line, exit 1.

    (Workers verify the bundle again when they open it; this makes the common mistakes fail fast.)
    """
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        return
    try:
        open_bundle(_bundle_folder(settings))
    except BundleError as exc:
        sys.exit(f"error: {exc}")


def _stop_server() -> None:
    """Make `bentoml serve` exit when a worker cannot start, instead of idling forever never ready.

    BentoML's process manager leaves a worker that failed at startup dead and keeps the server running,
    so an orchestrator would see a live process that never becomes ready; stopping the whole server makes
    the failure visible (the container exits, the unit fails) with the reason in the log.
    """
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        os.kill(os.getppid(), signal.SIGTERM)


web = FastAPI(title="tsimcne map", openapi_url=None, docs_url=None, redoc_url=None)
web.add_exception_handler(RequestValidationError, validation_error)


web.include_router(map_router(reference_map=lambda: bentoml.get_current_service().reference_map))


@web.get("/info", response_model=InfoResponse)
def info() -> InfoResponse:
    """The bundle being served, the provider onnxruntime got, the flag calibration, limits and versions."""
    return bentoml.get_current_service().info


web.include_router(page_router(thumbnails=lambda: bentoml.get_current_service().thumbnails))
web.include_router(
    journal_router(
        journal=lambda: getattr(bentoml.get_current_service(), "journal", None),
        class_names=lambda: bentoml.get_current_service().placer.manifest.class_names,
        reference_labels=lambda: bentoml.get_current_service().reference_labels,
    )
)


class MapServiceDefinition(bentoml.Service):
    """BentoML's service object for MapService, configured from the settings when the server starts.

    BentoML calls `inject_config` in `bentoml serve` (before it starts workers), in `bentoml build` and in
    each worker (from `to_asgi`): the settings are read there, the first time, and give the workers, the
    access log, tracing, the guards' middlewares and the stored bundle `bentoml build` packages. `to_asgi`
    (what each worker serves) puts POST /embed in front of BentoML's app (serving/embed_route.py), so the
    hot route skips BentoML's middlewares and every other route is BentoML's own, unchanged."""

    def inject_config(self) -> None:
        if not getattr(self, "_configured", False):
            self._configure(service_settings())
            object.__setattr__(self, "_configured", True)
        super().inject_config()

    def _configure(self, settings: ServiceSettings) -> None:
        plan = worker_plan(settings)
        _prepare_environment(plan.threads)
        _check_bundle_before_start(settings)
        self.config.update(
            workers=plan.workers,
            logging={"access": {"enabled": settings.access_log}},
            tracing=_tracing(settings),
        )
        if settings.model_tag is not None:  # `bentoml build` packages the stored bundle into the Bento
            self.models.append(bentoml.models.BentoModel(settings.model_tag))
        # Outermost first: an unauthenticated request is refused before its body is read.
        self.add_asgi_middleware(BearerTokenAuth, token=settings.api_token)
        self.add_asgi_middleware(
            BodySizeLimit,
            max_bytes=settings.max_upload_bytes,
            on_reject=metrics.REJECTED_REQUESTS.labels(reason="too_large").inc,
        )

    def to_asgi(self, is_main: bool = True):
        app = super().to_asgi(is_main)
        settings = service_settings()
        route = EmbedRoute(
            app,
            _current_handler,
            token=settings.api_token,
            log_requests=settings.access_log,
            keepalive_requests=settings.keepalive_requests,
        )
        if settings.tracing_sample_rate is not None:
            from bentoml._internal.configuration.containers import BentoMLContainer
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            # BentoML's tracing middleware never sees /embed (it is answered in front of it): trace it alike.
            route.serve_embed = OpenTelemetryMiddleware(
                route.serve_embed, tracer_provider=BentoMLContainer.tracer_provider.get()
            )
        return route


def _label_mix(class_names: list[str], label_indices: np.ndarray) -> dict[str, float]:
    """The share of each label among the reference images ('none' for unlabelled ones): /drift's baseline."""
    counts = np.bincount(np.where(label_indices < 0, len(class_names), label_indices), minlength=len(class_names) + 1)
    total = max(int(counts.sum()), 1)
    return {name: int(n) / total for name, n in zip([*class_names, "none"], counts.tolist(), strict=True) if n}


def _current_handler() -> EmbedHandler | None:
    """The worker's /embed handler, once its service instance has opened the bundle."""
    try:
        return bentoml.get_current_service().embed_handler
    except (BentoMLException, AttributeError):
        return None


def _tracing(settings: ServiceSettings) -> dict:
    """BentoML's tracing config: off for every route unless a sample rate is set."""
    if settings.tracing_sample_rate is None:
        return {"excluded_urls": [".*"]}  # no route traced: OpenTelemetry's middleware skips at once
    return {"sample_rate": settings.tracing_sample_rate}


@bentoml.asgi_app(web, path="/")
@bentoml.service(name="tsimcne", traffic={"timeout": REQUEST_TIMEOUT_S}, service_class=MapServiceDefinition)
class MapService:
    """Place microscopy images on a t-SimCNE map and flag those that land away from the collection."""

    def __init__(self) -> None:
        self.ready = False
        self.settings = service_settings()  # read when the worker starts, once per process
        self.plan = worker_plan(self.settings)
        try:
            self._open_bundle()
        except (BundleError, JournalError) as exc:
            logger.error("cannot serve: %s", exc)
            _stop_server()
            raise
        self.ready = True

    def _open_bundle(self) -> None:
        settings, plan = self.settings, self.plan
        folder = _bundle_folder(settings)
        set_faiss_threads(plan.threads)
        placer = Placer(
            folder, provider=settings.provider, neighbours=settings.neighbours, threads=plan.threads,
            spin=settings.spin,
        )  # fmt: skip
        manifest = placer.manifest
        self.placer = placer
        self.bundle_sha256 = sha256_file(folder / MANIFEST)
        logger.info(
            "serving bundle %s (%s, sha256 %s) with onnxruntime %s; %s",
            manifest.name, folder, self.bundle_sha256[:12], placer.provider, plan.describe(),
        )  # fmt: skip
        # Where the feature index came from (the bundle's file, memory-mapped, or rebuilt) and its device.
        logger.info("neighbour index: %s", json.dumps(placer.neighbour_index))
        metrics.BUNDLE_INFO.labels(manifest.name, self.bundle_sha256, placer.provider).set(1)
        metrics.initialise(manifest.class_names, placer.calibration.target_false_flag_rate)
        reference = placer.reference
        self.reference_map = MapOnTheWire(
            manifest.name, manifest.class_names, reference.coords, reference.label_indices, reference.ids
        )
        self.reference_map.prepare()  # the page's binary /map, made once per worker before /readyz says yes
        self.thumbnails = Thumbnails(folder / REFERENCE_FILE)
        self.reference_labels = _label_mix(manifest.class_names, reference.label_indices)
        self.info = self._info()
        # Warm-up: the first onnxruntime run allocates, the indexes page in; before /readyz says yes.
        placer.warm_up()
        # The journal (when set): opened, and its schema migrated, before /readyz says yes.
        self.journal = (
            open_journal(settings.journal, settings.journal_sync, settings.journal_spool) if settings.journal else None
        )
        self.journal_upkeep = None
        if self.journal is not None:
            spool = f"; batches spooled in {self.journal.spool_folder}" if self.journal.spools else ""
            logger.info("journal: %s (schema version %d%s)", self.journal.describe(), self.journal.version(), spool)
            from bentoml._internal.context import server_context

            prunes = server_context.worker_index in (None, 1)  # one worker of each replica prunes
            self.journal_upkeep = JournalUpkeep(
                self.journal, settings.drift_refresh_s, settings.journal_retention_days, prunes
            )
        self.embed_handler = EmbedHandler(placer, self.bundle_sha256, settings, self.journal)

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    async def shut_down(self) -> None:
        """A worker stopping (SIGTERM: a rollout, a scale-down): the model's queue and the journal's writer
        finish what they hold, then the journal takes in what this worker spooled, so that a replica scaled
        away leaves nothing waiting in its spool folder (PostgreSQL's journal_spool is the replica's own)."""
        handler = getattr(self, "embed_handler", None)
        if handler is not None:
            await handler.close()
        if getattr(self, "journal_upkeep", None) is not None:
            await asyncio.to_thread(self.journal_upkeep.close)
        if getattr(self, "journal", None) is not None:
            await asyncio.to_thread(self.journal.close)

    def _info(self) -> InfoResponse:
        settings, manifest = self.settings, self.placer.manifest
        service_versions = installed_versions(
            ("tsimcne-map", "bentoml", "onnxruntime", "onnxruntime-gpu", "numpy", "faiss-cpu", "faiss-gpu-cu12")
        )
        return InfoResponse(
            bundle=manifest.name,
            bundle_sha256=self.bundle_sha256,
            created=manifest.created,
            classes=manifest.class_names,
            artefact_labels=manifest.artefact_labels,
            reference_images=len(self.placer.reference),
            image_size=(manifest.preprocessing.height, manifest.preprocessing.width),
            provider=self.placer.provider,
            neighbours=self.placer.k,
            neighbour_index=self.placer.neighbour_index,
            calibration=public_calibration(self.placer.calibration),
            evaluation=public_evaluation(manifest.evaluation),
            partial=manifest.partial,
            folds=public_folds(manifest.training),
            limits=Limits(
                max_images=settings.max_images,
                max_upload_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_pixels,
                max_request_pixels=settings.max_request_pixels,
                request_budget_s=settings.request_budget_s,
            ),
            auth_required=settings.api_token is not None,
            versions={"bundle": manifest.versions, "service": service_versions},
        )

    @bentoml.api(route=EMBED_ROUTE)
    async def embed(
        self,
        images: list[UploadedFile] = Field(  # noqa: B008 - pydantic field declaration, evaluated once
            default_factory=list, description="image files (PNG, JPEG, TIFF incl. 16-bit, grayscale, RGBA)"
        ),
    ) -> EmbedResponse:
        """Place images on the map: position, flag and score, nearest reference images, majority label.

        Send the files as multipart/form-data in the field `images` (one or many), or one image as the
        whole body with `Content-Type: image/png` (`image/jpeg`, `image/tiff`, `image/gif`, `image/bmp`,
        `image/webp` or `application/octet-stream`) and its name in `?filename=`.
        Errors are JSON `{"error": "...", "detail": [{"file", "error"}]}`: 400 empty request, wrong
        multipart field, text instead of a file, malformed body; 401 missing or wrong bearer token (when
        the service has one); 405 not a POST; 408 the body did not arrive within body_timeout_s; 413 body
        over max_upload_mb, more than max_images files, or images holding more than max_request_pixels
        pixels together; 415 neither multipart/form-data nor an image type; 422 a file that is not a
        usable image or is over max_pixels (`detail` names each such file); 503 when the request's time
        budget (request_budget_s) ran out before it was placed.
        """
        # Over HTTP, POST /embed never gets here: serving/embed_route.py answers it in front of BentoML.
        # This method declares the route's schema (OpenAPI, BentoML's clients) and serves in-process calls
        # with the same handler.
        answer = await self.embed_handler.answer_files(images)
        return Response(answer.body, answer.status, answer.headers, media_type="application/json")
