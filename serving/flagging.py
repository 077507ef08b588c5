"""Nearest-neighbour distances for the flags, and the position-only flag of older bundles.

The shipped flag (serving/detector.py) is built from these helpers: k-th nearest-neighbour distances
on the map and among unit-length feature vectors. `calibrate`/`score` are the first, position-only
flag: the distance from the new point to its k-th nearest reference point over a threshold set so
that `target_rate` of held-out reference points exceed it (10 % of the reference points are held out;
each one's k-th neighbour among the other 90 % is measured). Bundles exported before the combined flag
carry this calibration and keep using it. numpy only.
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 15
DEFAULT_TARGET_RATE = 0.01
HOLDOUT = 0.1


def pairwise_distances(
    points: np.ndarray, reference: np.ndarray, reference_sq: np.ndarray | None = None, dtype: type = np.float64
) -> np.ndarray:
    """Euclidean distances (n_points, n_reference), without an (n, m, d) temporary.

    reference_sq: the reference points' squared norms (in `dtype`), when the caller keeps them: a service
    placing a few images on a large map would otherwise spend most of this function recomputing them.
    dtype: float64 by default; float32 halves the memory read for large feature references.
    """
    points, reference = points.astype(dtype), reference.astype(dtype, copy=False)
    if reference_sq is None:
        reference_sq = (reference**2).sum(1)
    squared = (points**2).sum(1)[:, None] + reference_sq[None, :] - 2.0 * points @ reference.T
    return np.sqrt(np.clip(squared, 0.0, None, out=squared), out=squared)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero. Euclidean distance between unit
    vectors is a monotone function of their cosine distance."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def kth_smallest(distances: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest value (1-based) of each row."""
    k = min(k, distances.shape[1])
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def kth_neighbour_distance(
    points: np.ndarray,
    reference: np.ndarray,
    k: int,
    chunk: int = 1024,
    reference_sq: np.ndarray | None = None,
    dtype: type = np.float64,
) -> np.ndarray:
    """Euclidean distance from each point to its k-th nearest reference point (1-based k), as float64.

    A caller that queries the same reference often passes it already in `dtype` with its squared norms,
    so that neither is recomputed per query (for 17,000 x 512 features that would be 70 MB per call)."""
    reference = reference.astype(dtype, copy=False)
    if reference_sq is None:
        reference_sq = (reference**2).sum(1)
    out = np.empty(len(points))
    for start in range(0, len(points), chunk):
        block = pairwise_distances(points[start : start + chunk], reference, reference_sq, dtype)
        out[start : start + chunk] = kth_smallest(block, k)
    return out


def nearest_other(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the index of and distance to the nearest other row of the same set."""
    distances = pairwise_distances(vectors, vectors) + np.eye(len(vectors)) * 1e9
    index = distances.argmin(1)
    return index, distances[np.arange(len(vectors)), index]


def calibrate(
    coords: np.ndarray, k: int = DEFAULT_K, target_rate: float = DEFAULT_TARGET_RATE, seed: int = 0
) -> dict[str, float | int | str]:
    """Threshold on the k-th neighbour distance such that `target_rate` of held-out points exceed it."""
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be between 0 and 1, got {target_rate}")
    n = len(coords)
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, round(HOLDOUT * n))
    held, rest = coords[order[:n_held]], coords[order[n_held:]]
    if len(rest) < 1:
        raise ValueError("need at least 2 reference points to calibrate")
    distances = kth_neighbour_distance(held, rest, k)
    threshold = float(np.quantile(distances, 1 - target_rate))
    return {
        "method": "kth-neighbour-distance-2d",
        "k": int(min(k, len(rest))),
        "target_false_flag_rate": float(target_rate),
        "threshold": max(threshold, 1e-12),
        "holdout_images": int(n_held),
        "seed": int(seed),
    }


def score_from_kth_distance(kth_distance: np.ndarray, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    """(score, out_of_distribution flag) from each point's k-th neighbour distance; flag = score > 1."""
    scores = kth_distance / float(calibration["threshold"])
    return scores, scores > 1.0


def score_from_distances(distances: np.ndarray, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    """(score, out_of_distribution flag) from a (points, reference) distance matrix; flag = score > 1."""
    return score_from_kth_distance(kth_smallest(distances, int(calibration["k"])), calibration)


def score(points: np.ndarray, reference: np.ndarray, calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    """(score, out_of_distribution flag) for each point; flag = score > 1."""
    return score_from_distances(pairwise_distances(points, reference), calibration)
