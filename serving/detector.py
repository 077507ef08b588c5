"""The shipped out-of-distribution flag: evidence from the network's features, from the pixels and from
the map position, calibrated together to one false-flag rate.

Why not the 2-D position alone (measured in benchmarks/flagging): t-SimCNE is trained to give the same
output for augmented views of a cell, and the augmentations include colour jitter, grayscale, crops and
(microscopy preset) rotations. The map is therefore deliberately blind to exposure and stain changes
and hardly moves for borders or debris; on a PBC map the position alone separates such images from
clean cells barely better than chance. It does move for blur. Three measurements, each scaled by its
own (1 - target) quantile on calibration images:

- features: the distance from the image's backbone features (unit length, on their first 128 principal
  components) to its k-th nearest reference image (the network's view before the 2-D head);
- pixels: the Mahalanobis distance of per-channel image statistics of the model input (mean, spread,
  percentiles, centre and border means) from those of the reference images: exposure, stain, borders,
  bubbles, debris, cells cut by the crop, which the network was taught to ignore;
- position: the distance to the k-th nearest reference point on the map (what a person sees).

The score is the largest of the three, divided by the (1 - target) quantile of that maximum on the
calibration images, so a score above 1 is flagged and exactly `target_rate` of the calibration images
are. Calibration images are ideally held-out images the network never saw (`tsimcne export
--calibration-data`); without them 10 % of the training images are left out of the reference instead
(in-sample: the network has seen them; the bundle records which was used). Near-duplicates within one
request are those closer in features than all but `target_rate` of distinct clean images. numpy, and
faiss-cpu for the feature index where it is installed (`plan_feature_index`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from serving.calibration import (
    DEFAULT_K,
    CombinedCalibration,
    FeatureIndex,
    FeatureScale,
    PixelCalibration,
    PositionScale,
)
from serving.neighbours import (
    EXACT_LIMIT,
    NeighbourIndex,
    build_faiss_index,
    build_index,
    faiss_available,
    nearest_other,
    recall_against,
    recall_at_k,
    true_neighbours,
    unit_rows,
)

METHOD = "features+pixels"
RECALL_TARGET = 0.99  # recall@k against exact search that an approximate feature index must reach
logger = logging.getLogger("tsimcne")


def channel_statistics(batch: np.ndarray) -> np.ndarray:
    """(N, 27) per-channel image statistics of model inputs (N, 3, H, W): mean and spread (exposure,
    stain, contrast), 1st and 99th percentile (dark debris, glare), and the means of the central half
    and of the four border strips (a cell cut by the crop or off-centre, black borders)."""
    n, c, h, w = batch.shape
    flat = batch.reshape(n, c, -1).astype(np.float64)
    low, high = np.percentile(flat, [1, 99], axis=2)
    bh, bw = max(1, h // 6), max(1, w // 6)
    regions = [
        batch[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4],
        batch[:, :, :bh, :],
        batch[:, :, h - bh :, :],
        batch[:, :, :, :bw],
        batch[:, :, :, w - bw :],
    ]
    region_means = [region.reshape(n, c, -1).astype(np.float64).mean(2) for region in regions]
    return np.concatenate([flat.mean(2), flat.std(2), low, high, *region_means], axis=1)


@dataclass
class PixelModel:
    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, statistics: np.ndarray) -> PixelModel:
        covariance = np.cov(statistics, rowvar=False) + 1e-9 * np.eye(statistics.shape[1])
        return cls(statistics.mean(0), np.linalg.pinv(covariance))

    def distance(self, statistics: np.ndarray) -> np.ndarray:
        centred = statistics - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def calibration(self, scale: float) -> PixelCalibration:
        return PixelCalibration(scale=scale, mean=self.mean.tolist(), precision=self.precision.tolist())

    @classmethod
    def from_calibration(cls, values: PixelCalibration) -> PixelModel:
        return cls(np.asarray(values.mean, dtype=np.float64), np.asarray(values.precision, dtype=np.float64))


@dataclass
class FeatureSpace:
    """Unit-length backbone features projected on their first principal components (128 by default).

    Distances between projected vectors follow the unit features' distances closely, and the nearest-
    neighbour search costs 4x less for 512-D features: the flag's largest cost under load."""

    mean: np.ndarray  # (F,) float32
    components: np.ndarray  # (d, F) float32

    @classmethod
    def fit(cls, features: np.ndarray, dims: int = 128, sample: int = 20_000, seed: int = 0) -> FeatureSpace:
        unit = unit_rows(features)
        rows = unit[np.random.default_rng(seed).permutation(len(unit))[:sample]]
        mean = rows.mean(0)
        _, _, components = np.linalg.svd(rows - mean, full_matrices=False)
        return cls(mean.astype(np.float32), components[: min(dims, components.shape[0])].astype(np.float32))

    def project(self, features: np.ndarray) -> np.ndarray:
        return ((unit_rows(features) - self.mean) @ self.components.T).astype(np.float32)


def feature_index(reference_projected: np.ndarray, record: FeatureIndex | None) -> NeighbourIndex:
    """The index over the reference features that `record` (bundle.json) describes, as export built it.

    float32; exact numpy search one matrix product per chunk of 256 queries: the reference (17,000 x 128
    for PBC) is read once per batch instead of once per image, which is what makes the flag cheap under
    load. A FAISS index in a bundle opened where faiss-cpu is missing is searched exactly instead (the
    same neighbours, or better than IVF's), with a warning."""
    vectors = np.asarray(reference_projected, dtype=np.float32)
    if record is None or record.kind == "exact":
        return build_index(vectors, dtype=np.float32, chunk=256)
    if not faiss_available():
        logger.warning("the bundle's %s feature index needs faiss-cpu (not installed): searching exactly", record.kind)
        return build_index(vectors, dtype=np.float32, chunk=256)
    if record.kind == "faiss-flat":
        return build_faiss_index(vectors, "flat")
    return build_faiss_index(vectors, "ivf", nlist=record.nlist, nprobe=record.nprobe or 1, refine=record.refine or 4)


def plan_feature_index(
    reference_projected: np.ndarray,
    queries: np.ndarray,
    k: int,
    exact_limit: int = EXACT_LIMIT,
    target_recall: float = RECALL_TARGET,
    sample: int = 1000,
) -> tuple[NeighbourIndex, FeatureIndex]:
    """The feature index export calibrates with and serving will rebuild, and its record for bundle.json.

    With faiss-cpu: exact (flat) up to `exact_limit` reference vectors, else IVF, whose nprobe is doubled
    from 8 until its recall@k against exact search on (up to `sample` of) `queries` reaches `target_recall`
    (or every cell is searched). Without faiss-cpu: exact numpy search."""
    vectors = np.asarray(reference_projected, dtype=np.float32)
    exact = build_index(vectors, dtype=np.float32, chunk=256)
    k = int(min(k, len(vectors)))
    picked = np.random.default_rng(0).permutation(len(queries))[:sample]
    probe = np.asarray(queries, dtype=np.float32)[np.sort(picked)]
    fields = {"reference_size": len(vectors), "recall_k": k, "recall_queries": len(probe)}
    if not faiss_available():
        return exact, FeatureIndex(kind="exact", recall=1.0, **fields)
    if len(vectors) <= exact_limit:
        index = build_faiss_index(vectors, "flat")
        return index, FeatureIndex(kind="faiss-flat", recall=recall_at_k(index, exact, probe, k), **fields)
    index = build_faiss_index(vectors, "ivf", nprobe=8)
    truth = true_neighbours(exact, probe, k)  # once: the exact search is the costly part of each try
    while True:
        recall = recall_against(index, truth, probe, k)
        if recall >= target_recall or index.nprobe >= index.nlist:
            break
        index.nprobe = index.nprobe * 2
    record = FeatureIndex(
        kind="faiss-ivf", nlist=index.nlist, nprobe=index.nprobe, refine=index.refine, recall=recall, **fields
    )
    return index, record


def _quantile(values: np.ndarray, target_rate: float) -> float:
    return max(float(np.quantile(values, 1 - target_rate)), 1e-12)


def calibrate_detector(
    calibration_features: np.ndarray,
    calibration_statistics: np.ndarray,
    calibration_coords: np.ndarray,
    reference_features: np.ndarray,
    reference_statistics: np.ndarray,
    reference_coords: np.ndarray,
    source: str,
    space: FeatureSpace,
    k: int = DEFAULT_K,
    target_rate: float = 0.01,
    index_exact_limit: int = EXACT_LIMIT,
) -> CombinedCalibration:
    """The calibration stored in bundle.json: every scale and threshold the service needs, and the
    feature index (with its recall) that the feature distances were measured with and are served with."""
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be between 0 and 1, got {target_rate}")
    pixels = PixelModel.fit(reference_statistics)
    calibration_projected = space.project(calibration_features)
    index, index_record = plan_feature_index(
        space.project(reference_features), calibration_projected, k, exact_limit=index_exact_limit
    )
    feature_distance = index.kth_distance(calibration_projected, k)
    pixel_distance = pixels.distance(calibration_statistics)
    position_distance = build_index(reference_coords).kth_distance(calibration_coords, k)
    feature_scale, pixel_scale = _quantile(feature_distance, target_rate), _quantile(pixel_distance, target_rate)
    position_scale = _quantile(position_distance, target_rate)
    combined = np.maximum.reduce(
        [feature_distance / feature_scale, pixel_distance / pixel_scale, position_distance / position_scale]
    )
    # Near-duplicates: closer than all but `target_rate` of distinct clean images are to their nearest other.
    # (At most 2,000 calibration images for this: the pairwise matrix grows with the square.)
    sample = np.random.default_rng(0).permutation(len(calibration_features))[:2000]
    _, nearest_distance = nearest_other(space.project(calibration_features[sample]))
    return CombinedCalibration(
        duplicate_distance=float(np.quantile(nearest_distance, target_rate)),
        target_false_flag_rate=float(target_rate),
        source=source,
        images=len(calibration_features),
        k=int(min(k, len(reference_features))),
        threshold=_quantile(combined, target_rate),
        features=FeatureScale(scale=feature_scale, index=index_record),
        pixels=pixels.calibration(pixel_scale),
        position=PositionScale(k=int(min(k, len(reference_coords))), threshold=position_scale),
    )


@dataclass
class Evidence:
    score: np.ndarray  # the flag's score: above 1 is out of distribution
    features: np.ndarray  # each component over its own calibrated threshold (above 1: beyond it alone)
    pixels: np.ndarray
    position: np.ndarray


class Detector:
    """Applies a bundle's calibration to new images."""

    def __init__(self, calibration: CombinedCalibration, reference_projected: np.ndarray, space: FeatureSpace) -> None:
        """reference_projected: the reference images' features already in `space` (as reference.npz keeps them)."""
        self.space = space
        self.calibration = calibration
        self.k = calibration.k
        # float32 and one matrix product per chunk of 256: the reference (17,000 x 128 for PBC) is read
        # once per batch instead of once per image, which is what makes the flag cheap under load.
        self.index = feature_index(reference_projected, calibration.features.index)
        self.pixels = PixelModel.from_calibration(calibration.pixels)
        self.feature_scale = calibration.features.scale
        self.pixel_scale = calibration.pixels.scale
        self.threshold = calibration.threshold
        self.position_threshold = calibration.position.threshold

    def feature_distance(self, features: np.ndarray) -> np.ndarray:
        """Distance from each image's projected features to its k-th nearest reference image."""
        return self.index.kth_distance(self.space.project(features), self.k)

    def evidence(self, feature_distance: np.ndarray, statistics: np.ndarray, position_kth: np.ndarray) -> Evidence:
        """The score and its parts from the three raw measurements (see `feature_distance`)."""
        feature_z = feature_distance / self.feature_scale
        pixel_z = self.pixels.distance(statistics) / self.pixel_scale
        position_z = position_kth / self.position_threshold
        return Evidence(
            score=np.maximum.reduce([feature_z, pixel_z, position_z]) / self.threshold,
            features=feature_z,
            pixels=pixel_z,
            position=position_z,
        )

    def duplicates(self, features: np.ndarray) -> np.ndarray:
        """For each image, the index of another image of the same batch that looks the same (closer in
        features than nearly all distinct clean images are to each other), or -1."""
        limit = self.calibration.duplicate_distance
        if len(features) < 2 or limit is None:
            return np.full(len(features), -1)
        nearest, distance = nearest_other(self.space.project(features))
        return np.where(distance < limit, nearest, -1)
