"""Prometheus metrics about the data, beside BentoML's request metrics on the same /metrics page.

BentoML runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set before the service
module is imported), so these must be plain Counters, Histograms and Gauges: prometheus_client's Info
does not work in that mode, hence the bundle "info" is a gauge fixed at 1 whose labels carry the facts.
Label values are bounded: flag kinds, the bundle's class names, a few decode-error reasons.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from tsimcne_core.flag import Flag

if TYPE_CHECKING:
    from tsimcne_core.placing import PlacedImage

IMAGES_EMBEDDED = Counter("tsimcne_images_embedded", "Images placed on the map")
IMAGES_FLAGGED = Counter("tsimcne_images_flagged", "Images flagged, by kind", ["kind"])
FLAG_SCORE = Histogram(
    "tsimcne_flag_score",
    "Out-of-distribution score of placed images (above 1 is flagged)",
    buckets=(0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2.0, 4.0, 8.0, float("inf")),
)
DUPLICATES = Counter("tsimcne_duplicates", "Images that look the same as another image of their request")
LANDED_IN_REGION = Counter(
    "tsimcne_images_by_region", "Images by the majority label of their map neighbours", ["label"]
)
MODEL_SECONDS = Histogram(
    "tsimcne_model_seconds",
    "onnxruntime time per model run (one batch)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, float("inf")),
)
BATCH_IMAGES = Histogram(
    "tsimcne_batch_images",
    "Images per model run (adaptive batching across concurrent requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, float("inf")),
)
DECODE_ERRORS = Counter("tsimcne_decode_errors", "Uploaded files that could not be used, by reason", ["reason"])
REJECTED_REQUESTS = Counter("tsimcne_rejected_requests", "Requests refused before embedding, by reason", ["reason"])
DECODING_REQUESTS = Gauge(
    "tsimcne_decoding_requests",
    "Requests decoding their images now (summed over workers)",
    multiprocess_mode="livesum",
)
# POST /embed is answered in front of BentoML's request middlewares (serving/embed_route.py), so it keeps its
# own request count and latency; BentoML's bentoml_service_request_* cover the other routes.
EMBED_REQUESTS = Counter("tsimcne_embed_requests", "POST /embed requests answered, by HTTP status", ["status"])
EMBED_SECONDS = Histogram(
    "tsimcne_embed_request_seconds",
    "Time from a POST /embed request's arrival to its answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf")),
)
BUNDLE_INFO = Gauge(
    "tsimcne_bundle_info",
    "The bundle being served (value 1; the labels carry name, bundle.json sha256 and the provider)",
    ["bundle", "sha256", "provider"],
    multiprocess_mode="max",
)


JOURNAL_ROWS = Counter("tsimcne_journal_rows", "Placed images written to the journal")
JOURNAL_WRITE_SECONDS = Histogram(
    "tsimcne_journal_write_seconds",
    "Seconds a model batch took to be kept by the journal (its spool append; PostgreSQL without one: a transaction)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOURNAL_FAILURES = Counter("tsimcne_journal_failures", "Model batches whose journal write failed (answered 503)")
# Drift, from the journal's daily counts (serving/journal_upkeep.py): the same numbers in every worker and
# replica, so the most recent value is the value. NaN where a source has no images today.
DRIFT_IMAGES = Gauge(
    "tsimcne_drift_images", "Images placed today (UTC) by source, from the journal", ["source"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
DRIFT_FLAGGED_SHARE = Gauge(
    "tsimcne_drift_flagged_share", "Share of today's images flagged, by source", ["source"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
DRIFT_MEDIAN_DISTANCE = Gauge(
    "tsimcne_drift_median_nearest_distance",
    "Median map distance of today's images to their nearest reference image, by source",
    ["source"],
    multiprocess_mode="mostrecent",
)
FLAG_TARGET_RATE = Gauge(
    "tsimcne_flag_target_rate",
    "The false-flag rate the bundle's flag was calibrated for (what a flagged share is compared with)",
    multiprocess_mode="mostrecent",
)


def set_drift(source: str, images: int, flagged_share: float | None, median_distance: float | None) -> None:
    DRIFT_IMAGES.labels(source=source).set(images)
    DRIFT_FLAGGED_SHARE.labels(source=source).set(math.nan if flagged_share is None else flagged_share)
    DRIFT_MEDIAN_DISTANCE.labels(source=source).set(math.nan if median_distance is None else median_distance)


def record_batch(placed: Sequence[PlacedImage], model_seconds: float) -> None:
    """One model run's metrics, counted together: a few writes a batch instead of several an image."""
    MODEL_SECONDS.observe(model_seconds)
    BATCH_IMAGES.observe(len(placed))
    IMAGES_EMBEDDED.inc(len(placed))
    duplicates = sum(image.duplicate_of is not None for image in placed)
    if duplicates:
        DUPLICATES.inc(duplicates)
    for kind, count in Tally(image.flag for image in placed if image.flag != Flag.IN_DISTRIBUTION).items():
        IMAGES_FLAGGED.labels(kind=kind).inc(count)
    for label, count in Tally(image.majority_label or "none" for image in placed).items():
        LANDED_IN_REGION.labels(label=label).inc(count)
    for image in placed:
        FLAG_SCORE.observe(image.score)


DECODE_REASONS = ("undecodable", "too_large", "empty")
REJECT_REASONS = (
    "empty", "wrong_field", "not_a_file", "content_type", "malformed", "too_many_images", "too_large", "bad_image",
    "too_many_pixels", "over_budget", "unauthorised", "not_ready", "body_timeout", "metadata", "journal",
)  # fmt: skip
EMBED_STATUSES = ("200", "400", "401", "405", "408", "413", "415", "422", "500", "503")


def initialise(class_names: list[str], target_rate: float | None) -> None:
    """Create every known label set at 0, so series exist (and rate() works) before the first event; the
    drift gauges start with source "none" at no images (the journal's upkeep fills them when it is on)."""
    FLAG_TARGET_RATE.set(math.nan if target_rate is None else target_rate)
    set_drift("none", 0, None, None)
    for kind in (Flag.OUT_OF_DISTRIBUTION.value, Flag.ARTEFACT.value):
        IMAGES_FLAGGED.labels(kind=kind)
    for label in [*class_names, "none"]:
        LANDED_IN_REGION.labels(label=label)
    for reason in DECODE_REASONS:
        DECODE_ERRORS.labels(reason=reason)
    for reason in REJECT_REASONS:
        REJECTED_REQUESTS.labels(reason=reason)
    for status in EMBED_STATUSES:
        EMBED_REQUESTS.labels(status=status)
