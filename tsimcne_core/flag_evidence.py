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

The score is the largest of the three, divided by that maximum's value on the calibration image of the
conformal rank (training/conformal.py), so a score above 1 is flagged and new clean images are flagged at
`target_rate` in expectation; the bundle records the interval the true rate lies in, which depends on the
number of calibration images (0.39-1.82 % for 1 % with 500). Calibration images are ideally held-out
images the network never saw (`tsimcne export --calibration-data`); without them 10 % of the training
images are left out of the reference instead (in-sample: the network has seen them; the bundle records
which was used). Near-duplicates within one
request are those closer in features than all but `target_rate` of distinct clean images. numpy, scipy's
k-d tree for the map positions, and faiss-cpu for the feature index where it is installed
(`plan_feature_index`; export saves it in the bundle and serving memory-maps it, `open_feature_index`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsimcne_core.calibration import (
    CombinedCalibration,
    PixelCalibration,
)
from tsimcne_core.feature_index import open_feature_index
from tsimcne_core.neighbours import (
    nearest_other,
    unit_rows,
)

METHOD = "features+pixels"
logger = logging.getLogger("tsimcne")


def channel_statistics(batch: np.ndarray) -> np.ndarray:
    """(N, 27) per-channel image statistics of model inputs (N, 3, H, W): mean and spread (exposure,
    stain, contrast), 1st and 99th percentile (dark debris, glare), and the means of the central half
    and of the four border strips (a cell cut by the crop or off-centre, black borders)."""
    n, c, h, w = batch.shape
    low, high = percentiles(batch.reshape(n, c, -1), (1, 99))
    flat = batch.reshape(n, c, -1).astype(np.float64)
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


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, qs, axis=-1) with its default linear interpolation, the same arithmetic in float64,
    from one sort of the last axis in the values' own type (a cast to float64 keeps their order): for the rows of
    a few hundred pixel values the flag takes per image, 10x faster than np.percentile or np.partition."""
    size = values.shape[-1]
    ordered = np.sort(values, axis=-1)
    out = []
    for q in qs:
        position = (size - 1) * q / 100.0
        low = int(np.floor(position))
        high = min(low + 1, size - 1)
        a, b = ordered[..., low].astype(np.float64), ordered[..., high].astype(np.float64)
        t, difference = position - low, b - a
        out.append(b - difference * (1 - t) if t >= 0.5 else a + difference * t)  # numpy's _lerp
    return np.stack(out)


@dataclass
class PixelModel:
    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, statistics: np.ndarray) -> PixelModel:
        covariance = np.cov(statistics, rowvar=False) + 1e-9 * np.eye(statistics.shape[1])
        return cls(statistics.mean(0, dtype=np.float64), np.linalg.pinv(covariance))  # float64 from float32 too

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


@dataclass
class Evidence:
    score: np.ndarray  # the flag's score: above 1 is out of distribution
    features: np.ndarray  # each component over its own calibrated threshold (above 1: beyond it alone)
    pixels: np.ndarray
    position: np.ndarray


class Detector:
    """Applies a bundle's calibration to new images."""

    def __init__(
        self,
        calibration: CombinedCalibration,
        reference_projected: np.ndarray,
        space: FeatureSpace,
        index_file: Path | None = None,
        gpu: bool = False,
    ) -> None:
        """reference_projected: the reference images' features already in `space` (as the bundle keeps them).
        index_file: the bundle's saved feature index, if it has one; gpu: the model runs on CUDA
        (`open_feature_index`)."""
        self.space = space
        self.calibration = calibration
        self.k = calibration.k
        self.index, self.index_info = open_feature_index(
            reference_projected, calibration.features.index, index_file, gpu
        )
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
