"""The BentoML service: places uploaded images on a bundle's map.

    bentoml serve serving.service:MapService --arg bundle=models/demo      (or TSIMCNE_BUNDLE=models/demo)
    bentoml serve serving.service:MapService --arg model_tag=demo:latest   (a bundle in BentoML's model store)

Routes: POST /embed (multipart field `images`, one or many files), GET /map, GET /info, /metrics,
/healthz /livez /readyz, /docs.json (OpenAPI), /docs (API page); the map page at / with reference
thumbnails at /thumbnail?index={index} (serving/webpage.py). Settings: serving/settings.py. The bundle is opened and
verified once per worker, with onnxruntime on CUDA when there is a GPU (or when `provider=cuda`
demands it: then the service refuses to start without one) and on the CPU otherwise; /readyz answers
200 only after that and one warm-up run. Bad input is answered 4xx with {"error": ...} naming the file,
field or limit; the worker stays up.

Importing this module does nothing but define things: the settings are read, the bundle checked and the
service class made when `MapService` is first asked for (`bentoml serve` does that at start-up, in its
own process and in each worker), so tests and tools import it freely.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import bentoml
import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import Field
from starlette.responses import JSONResponse

from serving import metrics
from serving.api_models import EmbeddedImage, EmbedResponse, InfoResponse, Limits
from serving.batching import MicroBatcher
from serving.bundle import MANIFEST, REFERENCE_FILE, BundleError, open_bundle, sha256_file
from serving.calibration import public_calibration
from serving.decoding import DeadlineExceeded, RequestTooLarge, UploadDecoder
from serving.embedder import BundleEmbedder
from serving.errors import json_error
from serving.guards import BearerTokenAuth, BodySizeLimit, UploadGuard
from serving.map_format import ReferenceMap
from serving.map_route import map_router
from serving.preprocess import stack_fitted
from serving.public import public_evaluation
from serving.settings import ServiceSettings, SettingsError, load_settings
from serving.store import bundle_path_from_store
from serving.uploads import UploadedFile
from serving.versions import installed_versions
from serving.webpage import Thumbnails, page_router, validation_error

logger = logging.getLogger("bentoml.tsimcne")
UPLOAD_FIELD = "images"


def _prepare_environment() -> None:
    """numpy's BLAS threads busy-wait after each matrix product and take the cores from the event loop and
    onnxruntime: one BLAS thread per worker served 40 % more requests in a load test (benchmarks/README.md).
    Set at start-up in `bentoml serve` itself, before it starts its workers, so they inherit it; an
    explicit OPENBLAS_NUM_THREADS in the environment wins."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _settings() -> ServiceSettings:
    """The settings from `--arg` and TSIMCNE_* variables; a bad or missing one stops `bentoml serve`
    with one line (this runs at start-up, as the program's entry point)."""
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


def _error(
    ctx: bentoml.Context,
    status: int,
    message: str,
    detail: list[dict] | None = None,
    reason: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A 4xx (or 503) JSON answer counted by `reason`; BentoML takes the status from the context of an API."""
    if reason is not None:
        metrics.REJECTED_REQUESTS.labels(reason=reason).inc()
    ctx.response.status_code = status
    return json_error(status, message, detail, headers)


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


def build_service(settings: ServiceSettings):
    """The BentoML service for `settings`: its class (workers, the stored bundle it packages) and its
    middlewares depend on them, so it is made here, at start-up, not when the module is imported."""

    @bentoml.asgi_app(web, path="/")
    @bentoml.service(
        name="tsimcne",
        workers=settings.workers,
        traffic={"timeout": 120},
    )
    class MapService:
        """Place microscopy images on a t-SimCNE map and flag those that land away from the collection."""

        if settings.model_tag is not None:
            # Declared on the class so that `bentoml build` packages the bundle into the Bento.
            stored_bundle = bentoml.models.BentoModel(settings.model_tag)

        def __init__(self) -> None:
            self.ready = False
            try:
                self._open_bundle()
            except BundleError as exc:
                logger.error("cannot serve: %s", exc)
                _stop_server()
                raise
            self.ready = True

        def _open_bundle(self) -> None:
            folder = _bundle_folder(settings)
            self.embedder = BundleEmbedder(
                folder,
                provider=settings.provider,
                neighbours=settings.neighbours,
                threads=settings.threads,
                spin=settings.spin,
            )
            manifest = self.embedder.manifest
            self.bundle_sha256 = sha256_file(folder / MANIFEST)
            logger.info(
                "serving bundle %s (%s, sha256 %s) with onnxruntime %s",
                manifest.name,
                folder,
                self.bundle_sha256[:12],
                self.embedder.provider,
            )
            # Where the feature index came from (the bundle's file, memory-mapped, or rebuilt) and its device.
            logger.info("neighbour index: %s", json.dumps(self.embedder.neighbour_index))
            metrics.BUNDLE_INFO.labels(manifest.name, self.bundle_sha256, self.embedder.provider).set(1)
            metrics.initialise(manifest.class_names)
            self.batcher = MicroBatcher(self._run_model, max_images=settings.max_batch_images)
            self.decoder = UploadDecoder(
                manifest.preprocessing,
                max_pixels=settings.max_pixels,
                max_request_pixels=settings.max_request_pixels,
                concurrency=settings.decode_concurrency,
                on_active=metrics.DECODING_REQUESTS.set,
            )
            reference = self.embedder.reference
            self.reference_map = ReferenceMap(
                manifest.name, manifest.class_names, reference.coords, reference.label_indices, reference.ids
            )
            self.reference_map.prepare()  # the page's binary /map, made once per worker before /readyz says yes
            self.thumbnails = Thumbnails(folder / REFERENCE_FILE)
            self.info = self._info()
            # Warm-up: the first onnxruntime run allocates; do it before /readyz says yes.
            prep = manifest.preprocessing
            self.embedder.run_model(np.zeros((1, 3, prep.height, prep.width), dtype=np.float32))

        def __is_ready__(self) -> bool:
            return self.ready

        def _run_model(self, batch: np.ndarray) -> np.ndarray:
            with metrics.MODEL_SECONDS.time():
                outputs = self.embedder.infer(batch)
            metrics.BATCH_IMAGES.observe(len(batch))
            return outputs

        def _info(self) -> InfoResponse:
            manifest = self.embedder.manifest
            service_versions = installed_versions(
                ("tsimcne-map", "bentoml", "onnxruntime", "onnxruntime-gpu", "numpy", "faiss-cpu", "faiss-gpu-cu12")
            )
            return InfoResponse(
                bundle=manifest.name,
                bundle_sha256=self.bundle_sha256,
                created=manifest.created,
                classes=manifest.class_names,
                artefact_labels=manifest.artefact_labels,
                reference_images=len(self.embedder.reference),
                image_size=(manifest.preprocessing.height, manifest.preprocessing.width),
                provider=self.embedder.provider,
                neighbours=self.embedder.k,
                neighbour_index=self.embedder.neighbour_index,
                calibration=public_calibration(self.embedder.calibration),
                evaluation=public_evaluation(manifest.evaluation),
                partial=manifest.partial,
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

        @bentoml.api(route="/embed")
        async def embed(
            self,
            images: list[UploadedFile] = Field(  # noqa: B008 - pydantic field declaration, evaluated once
                default_factory=list, description="image files (PNG, JPEG, TIFF incl. 16-bit, grayscale, RGBA)"
            ),
            ctx: bentoml.Context = None,  # type: ignore[assignment]  # BentoML fills it in
        ) -> EmbedResponse:
            """Place images on the map: position, flag and score, nearest reference images, majority label.

            Errors are JSON `{"error": "...", "detail": [{"file", "error"}]}`: 400 empty request, wrong
            multipart field, text instead of a file, malformed body; 401 missing or wrong bearer token (when
            the service has one); 413 body over max_upload_mb, more than max_images files, or images holding
            more than max_request_pixels pixels together; 415 not multipart/form-data; 422 a file that is
            not a usable image or is over max_pixels (`detail` names each such file); 503 when the request's
            time budget (request_budget_s) ran out before it was placed.
            """
            # Wrong fields, text values, malformed bodies and too many files were already answered by UploadGuard.
            if not images:
                return _error(
                    ctx,
                    400,
                    f"empty request: send one or more image files in the multipart field '{UPLOAD_FIELD}'",
                    reason="empty",
                )
            deadline = time.monotonic() + settings.request_budget_s
            try:
                decoded = await self.decoder.decode(images, deadline)
            except RequestTooLarge as exc:
                return _error(ctx, 413, str(exc), reason="too_many_pixels")
            except DeadlineExceeded as exc:
                return _over_budget(ctx, settings, str(exc))
            if decoded.problems:
                for problem in decoded.problems:
                    metrics.DECODE_ERRORS.labels(reason=problem["reason"]).inc()
                problems = [{"file": p["file"], "error": p["error"]} for p in decoded.problems]
                listed = ", ".join(p["file"] for p in problems)
                message = f"{len(problems)} of {len(images)} uploads are not usable images: {listed}"
                return _error(ctx, 422, message, problems, reason="bad_image")
            batch = await asyncio.to_thread(stack_fitted, decoded.images, self.embedder.manifest.preprocessing)
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    outputs = await self.batcher.run(batch)
            except TimeoutError:
                return _over_budget(ctx, settings, "the time budget ran out while the images waited for the model")
            placements = await asyncio.to_thread(self.embedder.placements, outputs, batch)
            metrics.record_placements(
                [p.flag for p in placements],
                [p.score for p in placements],
                [p.majority_label for p in placements],
                duplicates=sum(p.duplicate_of is not None for p in placements),
            )
            return EmbedResponse(
                bundle=self.embedder.manifest.name,
                bundle_sha256=self.bundle_sha256,
                images=[
                    EmbeddedImage.from_placement(
                        file.name,
                        placement,
                        images[placement.duplicate_of].name if placement.duplicate_of is not None else None,
                    )
                    for file, placement in zip(images, placements, strict=True)
                ],
            )

    # Outermost first: an unauthenticated request is refused before its body is read.
    MapService.add_asgi_middleware(BearerTokenAuth, token=settings.api_token)
    MapService.add_asgi_middleware(
        BodySizeLimit,
        max_bytes=settings.max_upload_bytes,
        on_reject=metrics.REJECTED_REQUESTS.labels(reason="too_large").inc,
    )
    MapService.add_asgi_middleware(
        UploadGuard,
        path="/embed",
        field=UPLOAD_FIELD,
        max_files=settings.max_images,
        on_reject=lambda reason: metrics.REJECTED_REQUESTS.labels(reason=reason).inc(),
    )
    return MapService


def _over_budget(ctx: bentoml.Context, settings: ServiceSettings, what: str) -> JSONResponse:
    message = (
        f"request not completed within its time budget of {settings.request_budget_s:g} s (setting "
        f"request_budget_s): {what}; retry later, or send fewer or smaller images"
    )
    return _error(ctx, 503, message, reason="over_budget", headers={"Retry-After": "5"})


def __getattr__(name: str):
    """`serving.service:MapService`, made on first access (module-level __getattr__, PEP 562): what
    `bentoml serve` and `bentoml build` ask for at start-up. Settings problems and a missing or damaged
    bundle stop `bentoml serve` there with one line and exit code 1."""
    if name != "MapService":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _prepare_environment()
    settings = _settings()
    _check_bundle_before_start(settings)
    service = build_service(settings)
    globals()["MapService"] = service  # later look-ups (and BentoML's own search of the module) find it
    return service
