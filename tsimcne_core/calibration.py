"""The flag's calibration: one typed model, written by `tsimcne export` into bundle.json and read by serving.

It is part of the bundle schema (tsimcne_core/bundle_format.py SCHEMA_VERSION): a change to these models that old
readers cannot read, or that old bundles do not satisfy, raises the schema version. Schema 1 bundles
carry one of two calibrations, told apart by `method`:

- `CombinedCalibration` ("features+pixels", tsimcne_core/flag_evidence.py): the shipped flag, three measurements
  (network features, pixel statistics, map position) each scaled by its own threshold, and a joint one;
- `PositionCalibration` ("kth-neighbour-distance-2d", tsimcne_core/flag.py): the first flag, the map
  position alone. Bundles exported before any flag have no calibration; serving then computes this one
  from the reference map when it opens the bundle.

numpy-free and torch-free: pydantic only.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tsimcne_core.public import public_source

DEFAULT_K = 15  # the k-th nearest neighbour whose distance the flag measures
DEFAULT_TARGET_RATE = 0.01  # share of clean calibration images flagged


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PositionCalibration(_Frozen):
    """Threshold on the distance to the k-th nearest reference point on the map."""

    method: Literal["kth-neighbour-distance-2d"] = "kth-neighbour-distance-2d"
    k: int = Field(ge=1)
    target_false_flag_rate: float = Field(gt=0, lt=1)
    threshold: float = Field(gt=0)
    holdout_images: int = Field(ge=1, description="reference points held out to set the threshold")
    seed: int = 0


class FeatureIndex(_Frozen):
    """The neighbour index the feature distance is searched with: the same at export (calibration) and in
    serving (tsimcne_core/feature_index.py `feature_index`), with its recall against exact search measured at export."""

    kind: Literal["exact", "faiss-flat", "faiss-ivf"] = Field(
        description="exact: numpy brute force; faiss-flat: FAISS, exact; faiss-ivf: FAISS IVF, re-ranked exactly"
    )
    nlist: int | None = Field(None, ge=1, description="IVF cells")
    nprobe: int | None = Field(None, ge=1, description="IVF cells searched per query")
    refine: int | None = Field(None, ge=1, description="candidates re-ranked exactly, as a multiple of k")
    reference_size: int = Field(ge=1, description="reference vectors the index held at export")
    recall: float = Field(ge=0, le=1, description="recall@k against exact search on the calibration images")
    recall_k: int = Field(ge=1)
    recall_queries: int = Field(ge=1, description="calibration images the recall was measured on")


class FeatureScale(_Frozen):
    scale: float = Field(gt=0, description="(1 - target) quantile of the k-th feature-neighbour distance")
    # None in bundles exported before FAISS (issue 14): searched exactly with numpy.
    index: FeatureIndex | None = None


class PixelCalibration(_Frozen):
    scale: float = Field(gt=0, description="(1 - target) quantile of the pixel statistics' Mahalanobis distance")
    mean: list[float] = Field(description="mean of the reference images' channel statistics")
    precision: list[list[float]] = Field(description="inverse covariance of those statistics")


class PositionScale(_Frozen):
    k: int = Field(ge=1)
    threshold: float = Field(gt=0, description="(1 - target) quantile of the k-th map-neighbour distance")


class FalseFlagInterval(_Frozen):
    """What the calibration images say of the false-flag rate the flag really has (training/conformal.py): the
    threshold is the score of rank `rank` of `images`; the realised rate on clean images of the same
    collection lies between `low` and `high` with probability `level` and is `expected` on average."""

    level: float = Field(gt=0, lt=1, description="probability of the interval")
    low: float = Field(ge=0, le=1)
    high: float = Field(ge=0, le=1)
    expected: float = Field(ge=0, le=1, description="the mean realised false-flag rate")
    rank: int = Field(ge=1, description="the calibration score, by rank from the lowest, used as the threshold")
    images: int = Field(ge=1)
    images_for_tight: int = Field(ge=1, description="calibration images that put the interval within +-tight")
    tight: float = Field(gt=0, lt=1, description="relative half-width called tight, e.g. 0.25 of the target")

    def describe(self, target: float) -> str:
        """One line for a person: the interval, and what would tighten it."""

        def pct(value: float) -> str:
            return f"{100 * value:.2f} %"

        text = (
            f"the flag's true false-flag rate on clean images lies between {pct(self.low)} and {pct(self.high)} "
            f"({100 * self.level:.0f} % of calibration sets; expected {pct(self.expected)}, target {pct(target)}), "
            f"from {self.images:,} calibration images"
        )
        if self.expected > target * 1.0001:
            text += f"; fewer than {math.ceil(1 / target) - 1:,} images cannot meet the target"
        if self.images < self.images_for_tight:
            text += (
                f"; about {self.images_for_tight:,} images would put it within +-{100 * self.tight:.0f} % of the "
                "target (tsimcne export --calibration-data)"
            )
        return text


class CombinedCalibration(_Frozen):
    """Features, pixels and position, each over its own scale; flagged when the largest, divided by
    `threshold`, exceeds 1 (tsimcne_core/flag_evidence.py)."""

    method: Literal["features+pixels"] = "features+pixels"
    duplicate_distance: float | None = Field(
        None, description="feature distance under which two images of one request are near-duplicates"
    )
    target_false_flag_rate: float = Field(gt=0, lt=1)
    source: str = Field(description="which images set the thresholds (held-out images, or in-sample)")
    images: int = Field(ge=1, description="number of calibration images")
    k: int = Field(ge=1)
    threshold: float = Field(gt=0)
    features: FeatureScale
    pixels: PixelCalibration
    position: PositionScale
    # None in bundles exported before it was reported (issue 27); their threshold was the plain quantile.
    false_flag_rate: FalseFlagInterval | None = Field(
        None, description="the interval of the true false-flag rate the threshold gives (training/conformal.py)"
    )

    def position_only(self) -> PositionCalibration:
        """The position part as a position-only flag: for a bundle whose reference has no usable features."""
        return PositionCalibration(
            k=self.position.k,
            target_false_flag_rate=self.target_false_flag_rate,
            threshold=self.position.threshold,
            holdout_images=self.images,
        )


Calibration = Annotated[CombinedCalibration | PositionCalibration, Field(discriminator="method")]


def public_calibration(calibration: CombinedCalibration | PositionCalibration) -> dict[str, Any]:
    """The calibration as GET /info shows it: without the pixel model's mean vector and precision
    matrix (kept in bundle.json) and with any local path in `source` reduced to its last component."""
    if isinstance(calibration, PositionCalibration):
        return calibration.model_dump(mode="json")
    summary = calibration.model_dump(mode="json", exclude={"pixels": {"mean", "precision"}})
    summary["source"] = public_source(calibration.source)
    return summary
