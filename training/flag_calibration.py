"""Calibrating the flag at export: every scale and threshold the service applies (tsimcne_core/flag.py,
tsimcne_core/flag_evidence.py), measured on calibration images, with the conformal-rank threshold and its
interval (training/conformal.py) and the feature index the distances were measured with."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.conformal import threshold_at_rank
from training.index_building import plan_feature_index
from tsimcne_core.calibration import (
    DEFAULT_K,
    CombinedCalibration,
    FeatureScale,
    PositionScale,
)
from tsimcne_core.flag_evidence import FeatureSpace, PixelModel
from tsimcne_core.neighbours import (
    NeighbourIndex,
    build_map_index,
    nearest_other,
)

logger = logging.getLogger("tsimcne")


def _quantile(values: np.ndarray, target_rate: float) -> float:
    return max(float(np.quantile(values, 1 - target_rate)), 1e-12)


def calibrate_detector_and_index(
    calibration_features: np.ndarray,
    calibration_statistics: np.ndarray,
    calibration_coords: np.ndarray,
    reference_projected: np.ndarray,
    reference_statistics: np.ndarray,
    reference_coords: np.ndarray,
    source: str,
    space: FeatureSpace,
    k: int = DEFAULT_K,
    target_rate: float = 0.01,
    index_exact_limit: int | None = None,
    pixels: PixelModel | None = None,
) -> tuple[CombinedCalibration, NeighbourIndex]:
    """The calibration stored in bundle.json: every scale and threshold the service needs, and the
    feature index (with its recall) that the feature distances were measured with and are served with;
    and that index itself, which export can save instead of building it again.

    The calibration images' features are raw (projected here with `space`); the reference's are already
    projected (`space.project`), as an array or as rows read from a file on demand (export at 10^6).
    pixels: the reference's pixel model when the caller has it but not the statistics it came from (a fold
    pools the old model's moments with the folded images'); `reference_statistics` is then not read."""
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be between 0 and 1, got {target_rate}")
    pixels = pixels if pixels is not None else PixelModel.fit(reference_statistics)
    calibration_projected = space.project(calibration_features)
    index, index_record = plan_feature_index(
        reference_projected, calibration_projected, k, exact_limit=index_exact_limit
    )
    feature_distance = _kth_with_progress(index, calibration_projected, k, "feature distances")
    pixel_distance = pixels.distance(calibration_statistics)
    position_distance = _kth_with_progress(
        build_map_index(reference_coords), np.asarray(calibration_coords), k, "map distances"
    )
    feature_scale, pixel_scale = _quantile(feature_distance, target_rate), _quantile(pixel_distance, target_rate)
    position_scale = _quantile(position_distance, target_rate)
    combined = np.maximum.reduce(
        [feature_distance / feature_scale, pixel_distance / pixel_scale, position_distance / position_scale]
    )
    # Near-duplicates: closer than all but `target_rate` of distinct clean images are to their nearest other.
    # (At most 2,000 calibration images for this: the pairwise matrix grows with the square.)
    sample = np.random.default_rng(0).permutation(len(calibration_features))[:2000]
    _, nearest_distance = nearest_other(space.project(calibration_features[sample]))
    # The joint threshold alone decides how many clean images are flagged: the conformal rank of the
    # calibration scores, so that the target is met in expectation, with the interval of the true rate.
    threshold, interval = threshold_at_rank(combined, target_rate)
    calibration = CombinedCalibration(
        duplicate_distance=float(np.quantile(nearest_distance, target_rate)),
        target_false_flag_rate=float(target_rate),
        source=source,
        images=len(calibration_features),
        k=int(min(k, len(reference_projected))),
        threshold=max(threshold, 1e-12),
        false_flag_rate=interval,
        features=FeatureScale(scale=feature_scale, index=index_record),
        pixels=pixels.calibration(pixel_scale),
        position=PositionScale(k=int(min(k, len(reference_coords))), threshold=position_scale),
    )
    return calibration, index


def calibrate_detector(
    calibration_features: np.ndarray,
    calibration_statistics: np.ndarray,
    calibration_coords: np.ndarray,
    reference_features: np.ndarray,
    reference_statistics: np.ndarray,
    reference_coords: np.ndarray,
    *,
    space: FeatureSpace,
    **kwargs: Any,
) -> CombinedCalibration:
    """calibrate_detector_and_index from raw reference features, without the index (the calibration
    stored in bundle.json)."""
    return calibrate_detector_and_index(
        calibration_features, calibration_statistics, calibration_coords, space.project(reference_features),
        reference_statistics, reference_coords, space=space, **kwargs,
    )[0]  # fmt: skip


def _kth_with_progress(index: NeighbourIndex, queries: np.ndarray, k: int, what: str, step: int = 4096) -> np.ndarray:
    """index.kth_distance over `queries`, `step` at a time with a progress bar (10^5 calibration images
    against 10^6 reference images take minutes)."""
    parts = [
        index.kth_distance(queries[start : start + step], k)
        for start in tqdm(range(0, len(queries), step), desc=f"calibration: {what}", leave=False, disable=None)
    ]
    return np.concatenate(parts) if parts else np.empty(0)
