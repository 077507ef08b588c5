"""The flag, in one place: its names, its rule, and the two ways a bundle scores an image. numpy only.

- The rule: an image is `artefact` when most of its map neighbours carry a label the bundle names as an
  artefact label, else `out_of_distribution` when its score is above 1, else `in_distribution`. Every
  score is scaled so that 1 is its calibrated threshold.
- `CombinedFlag`: the shipped score (evidence in tsimcne_core/flag_evidence.py): features, pixels and map
  position, calibrated together at export (training/flag_calibration.py).
- `PositionFlag`: the map position alone, kept only to read bundles exported before the combined flag
  (their calibration, or none: then it is computed from the map when the bundle is opened), or whose
  reference has no usable features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from tsimcne_core.calibration import DEFAULT_K, DEFAULT_TARGET_RATE, CombinedCalibration, PositionCalibration
from tsimcne_core.flag_evidence import Detector, channel_statistics
from tsimcne_core.neighbours import build_map_index
from tsimcne_core.reference import ReferenceSet


class Flag(StrEnum):
    """Where an image landed; the values are what /embed answers, the placement table holds and the metrics
    count."""

    IN_DISTRIBUTION = "in_distribution"
    OUT_OF_DISTRIBUTION = "out_of_distribution"
    ARTEFACT = "artefact"


EVIDENCE = ("features", "pixels", "position")  # the combined flag's measurements, in this order
FLAGGED_ABOVE = 1.0  # every score is its measurement over the calibrated threshold


def is_flagged(scores: np.ndarray) -> np.ndarray:
    """True where a score is beyond its calibrated threshold."""
    return np.asarray(scores) > FLAGGED_ABOVE


def flag_names(artefact: np.ndarray, scores: np.ndarray) -> list[str]:
    """Each image's flag by the rule above, as plain strings (the values of `Flag`)."""
    flagged = is_flagged(scores).tolist()
    return [
        Flag.ARTEFACT.value if is_artefact else Flag.OUT_OF_DISTRIBUTION.value if beyond else Flag.IN_DISTRIBUTION.value
        for is_artefact, beyond in zip(np.asarray(artefact).tolist(), flagged, strict=True)
    ]


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
        """CombinedFlag.assess's interface, scored from `kth` (the map position) alone: the other inputs may be
        None, and no duplicates are looked for."""
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
        return Assessment(found.score, evidence, EVIDENCE, duplicates)


def choose_flag(
    calibration: CombinedCalibration | PositionCalibration | None, reference: ReferenceSet, gpu: bool = False
) -> CombinedFlag | PositionFlag:
    """The flag a bundle supports: combined when it has that calibration and the features it needs.
    gpu: the model runs on CUDA, so the feature index may go to the GPU too (tsimcne_core/flag_evidence.py)."""
    if isinstance(calibration, CombinedCalibration):
        if reference.has_features:
            return CombinedFlag(calibration, reference, gpu)
        return PositionFlag(calibration.position_only())
    return PositionFlag(calibration if calibration is not None else calibrate_position(reference.coords))


HOLDOUT = 0.1


def calibrate_position(
    coords: np.ndarray, k: int = DEFAULT_K, target_rate: float = DEFAULT_TARGET_RATE, seed: int = 0
) -> PositionCalibration:
    """Threshold on the k-th neighbour distance such that `target_rate` of held-out points exceed it."""
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be between 0 and 1, got {target_rate}")
    n = len(coords)
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, round(HOLDOUT * n))
    held, rest = coords[order[:n_held]], coords[order[n_held:]]
    if len(rest) < 1:
        raise ValueError("need at least 2 reference points to calibrate")
    distances = build_map_index(rest).kth_distance(held, k)
    threshold = float(np.quantile(distances, 1 - target_rate))
    return PositionCalibration(
        k=int(min(k, len(rest))),
        target_false_flag_rate=float(target_rate),
        threshold=max(threshold, 1e-12),
        holdout_images=int(n_held),
        seed=int(seed),
    )


def score_from_kth_distance(
    kth_distance: np.ndarray, calibration: PositionCalibration
) -> tuple[np.ndarray, np.ndarray]:
    """(score, flagged) from each point's k-th neighbour distance."""
    scores = kth_distance / float(calibration.threshold)
    return scores, is_flagged(scores)


def position_scores(
    points: np.ndarray, reference: np.ndarray, calibration: PositionCalibration
) -> tuple[np.ndarray, np.ndarray]:
    """(score, flagged) for each point: its k-th nearest reference point's distance on the map."""
    return score_from_kth_distance(build_map_index(reference).kth_distance(points, calibration.k), calibration)
