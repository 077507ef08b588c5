"""Which flag a bundle uses, and applying it to a batch of placed images. numpy only.

- `CombinedFlag`: the shipped flag (serving/detector.py): features, pixels and position. Needs the
  bundle's typed `CombinedCalibration` and the reference images' projected features.
- `PositionFlag`: the map position alone (serving/flagging.py), for bundles exported before the
  combined flag, without a calibration (computed from the map when opened), or whose reference has no
  usable features (exported between the combined flag and the feature projection).

An image is flagged `artefact` when most of its neighbours carry a label the bundle names as an
artefact label, else `out_of_distribution` when its score exceeds 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.calibration import CombinedCalibration, PositionCalibration
from serving.detector import Detector, channel_statistics
from serving.flagging import calibrate, score_from_kth_distance
from serving.reference import ReferenceSet

IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, ARTEFACT = "in_distribution", "out_of_distribution", "artefact"
FLAGS = (IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, ARTEFACT)


@dataclass
class Assessment:
    scores: np.ndarray  # (N,) float64: above 1 is flagged
    evidence: np.ndarray  # (N, len(names)) float64: each measurement over its own threshold
    names: tuple[str, ...]  # what the evidence columns measure
    duplicates: np.ndarray  # (N,) int: another image of the same call (in batch positions) that looks the same, or -1


def call_slices(total: int, calls: Sequence[int] | None) -> list[slice]:
    """The consecutive calls (sizes) a batch of `total` images gathers, as slices; None: one call."""
    if calls is None:
        return [slice(0, total)]
    if sum(calls) != total or any(size < 1 for size in calls):
        raise ValueError(f"calls of sizes {list(calls)} do not make up a batch of {total}")
    ends = np.cumsum(calls).tolist()
    return [slice(end - size, end) for size, end in zip(calls, ends, strict=True)]


class PositionFlag:
    uses_features = False
    index_info = None  # no feature index

    def __init__(self, calibration: PositionCalibration) -> None:
        self.calibration = calibration
        self.k = calibration.k

    def assess(
        self,
        features: np.ndarray | None,
        feature_distance: np.ndarray | None,
        batch: np.ndarray | None,
        kth: np.ndarray,
        calls: Sequence[int] | None = None,
    ) -> Assessment:
        """Scores, evidence and duplicates from the features, their k-th neighbour distance, the model
        input batch and the k-th map-neighbour distance (what the position-only flag ignores is None);
        `calls`: the sizes of the calls the batch gathers (duplicates are looked for within each)."""
        scores, _ = score_from_kth_distance(kth, self.calibration)
        return Assessment(scores, scores[:, None], ("position",), np.full(len(scores), -1))


class CombinedFlag:
    uses_features = True

    def __init__(self, calibration: CombinedCalibration, reference: ReferenceSet, gpu: bool = False) -> None:
        assert reference.features is not None and reference.space is not None
        self.calibration = calibration
        self.detector = Detector(calibration, reference.features, reference.space, reference.feature_index_file, gpu)
        self.index_info = self.detector.index_info
        self.k = calibration.position.k

    def feature_distance(self, features: np.ndarray) -> np.ndarray:
        return self.detector.feature_distance(features)

    def assess(
        self,
        features: np.ndarray | None,
        feature_distance: np.ndarray | None,
        batch: np.ndarray | None,
        kth: np.ndarray,
        calls: Sequence[int] | None = None,
    ) -> Assessment:
        """Scores, evidence and duplicates from the features, their k-th neighbour distance, the model
        input batch and the k-th map-neighbour distance (what the position-only flag ignores is None);
        `calls`: the sizes of the calls the batch gathers (duplicates are looked for within each)."""
        if features is None or feature_distance is None or batch is None:
            raise ValueError("the model input batch and its features are needed for the combined flag")
        found = self.detector.evidence(feature_distance, channel_statistics(batch), kth)
        evidence = np.stack([found.features, found.pixels, found.position], axis=1)
        duplicates = np.full(len(features), -1, dtype=np.int64)
        for call in call_slices(len(features), calls):
            twins = self.detector.duplicates(features[call])
            duplicates[call] = np.where(twins >= 0, twins + call.start, -1)
        return Assessment(found.score, evidence, ("features", "pixels", "position"), duplicates)


def choose_flag(
    calibration: CombinedCalibration | PositionCalibration | None, reference: ReferenceSet, gpu: bool = False
) -> CombinedFlag | PositionFlag:
    """The flag a bundle supports: combined when it has that calibration and the features it needs.
    gpu: the model runs on CUDA, so the feature index may go to the GPU too (serving/detector.py)."""
    if isinstance(calibration, CombinedCalibration):
        if reference.has_features:
            return CombinedFlag(calibration, reference, gpu)
        return PositionFlag(calibration.position_only())
    return PositionFlag(calibration if calibration is not None else calibrate(reference.coords))


def flag_names(artefact: np.ndarray, scores: np.ndarray) -> list[str]:
    """Each image's flag: `artefact` where most of its map neighbours carry an artefact label, else
    `out_of_distribution` where its score is above 1, else `in_distribution`."""
    return [
        ARTEFACT if is_artefact else OUT_OF_DISTRIBUTION if score > 1.0 else IN_DISTRIBUTION
        for is_artefact, score in zip(np.asarray(artefact).tolist(), np.asarray(scores).tolist(), strict=True)
    ]
