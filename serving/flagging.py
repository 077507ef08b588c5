"""The position-only flag of older bundles. numpy only.

`calibrate`/`score` are the first flag: the distance from the new point to its k-th nearest reference
point over a threshold set so that `target_rate` of held-out reference points exceed it (10 % of the
reference points are held out; each one's k-th neighbour among the other 90 % is measured). Bundles
exported before the combined flag (serving/detector.py) carry this calibration, or none (then it is
computed from the reference map when the bundle is opened), and keep using it. The neighbour search
itself is serving/neighbours.py (a k-d tree over the map).
"""

from __future__ import annotations

import numpy as np

from serving.calibration import DEFAULT_K, DEFAULT_TARGET_RATE, PositionCalibration
from serving.neighbours import build_map_index

HOLDOUT = 0.1


def calibrate(
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
    """(score, out_of_distribution flag) from each point's k-th neighbour distance; flag = score > 1."""
    scores = kth_distance / float(calibration.threshold)
    return scores, scores > 1.0


def score(points: np.ndarray, reference: np.ndarray, calibration: PositionCalibration) -> tuple[np.ndarray, np.ndarray]:
    """(score, out_of_distribution flag) for each point; flag = score > 1."""
    return score_from_kth_distance(build_map_index(reference).kth_distance(points, calibration.k), calibration)
