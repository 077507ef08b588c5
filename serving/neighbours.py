"""Nearest-neighbour search, in one place: the map's neighbours, the flag's feature and position
distances, at export (calibration) and in serving alike. numpy only.

Everything that searches a reference set goes through `build_index(vectors)`, which returns a
`NeighbourIndex`; today that is `ExactIndex` (brute force: one matrix product per chunk of queries,
exact, no extra memory beyond the reference). An approximate index for very large collections (FAISS)
is another class implementing the same four methods, chosen in `build_index`: a change to this module
only.

Distances are Euclidean. `search` returns each query's k nearest reference rows, nearest first;
`kth_distance` only the k-th smallest distance (1-based), which the flag needs and which an exact
search gets from one partial sort without ordering the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class NeighbourIndex(Protocol):
    """A searchable reference set of vectors (n, d)."""

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances (q, k), indices (q, k)) of each query's k nearest reference rows, nearest first."""
        ...

    def kth_distance(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(q,) distance from each query to its k-th nearest reference row (1-based k), float64."""
        ...

    def save(self, path: Path) -> None:
        """Write the index to `path` (a file), so that `load` reopens it without rebuilding."""
        ...


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


def kth_smallest(distances: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest value (1-based) of each row."""
    k = min(k, distances.shape[1])
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def nearest_other(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the index of and distance to the nearest other row of the same (small) set: the
    near-duplicates within one request, and the duplicate threshold's calibration sample (<= 2,000)."""
    distances = pairwise_distances(vectors, vectors) + np.eye(len(vectors)) * 1e9
    index = distances.argmin(1)
    return index, distances[np.arange(len(vectors)), index]


class ExactIndex:
    """Brute-force exact search. `dtype`: float64 (the map: 2-D, exact to the last digit) or float32
    (features: half the memory read per query batch, which is what bounds the flag's cost under load).
    The reference's squared norms are computed once, not per query."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray, dtype: type = np.float64, chunk: int = 1024) -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"a neighbour index needs a non-empty (n, d) array, got shape {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=dtype)
        self.dtype = dtype
        self.chunk = chunk
        self._squared = (self.vectors**2).sum(1)

    def __len__(self) -> int:
        return len(self.vectors)

    def _distances(self, queries: np.ndarray) -> np.ndarray:
        return pairwise_distances(np.asarray(queries), self.vectors, self._squared, self.dtype)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # One partial sort, then only the k candidates are ordered.
        k = min(k, len(self))
        distances = self._distances(queries)
        candidates = np.argpartition(distances, k - 1, axis=1)[:, :k]
        candidate_distances = np.take_along_axis(distances, candidates, axis=1)
        order = candidate_distances.argsort(axis=1)
        return np.take_along_axis(candidate_distances, order, axis=1), np.take_along_axis(candidates, order, axis=1)

    def kth_distance(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.asarray(queries)
        out = np.empty(len(queries))
        for start in range(0, len(queries), self.chunk):
            out[start : start + self.chunk] = kth_smallest(self._distances(queries[start : start + self.chunk]), k)
        return out

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, self.vectors, allow_pickle=False)

    @classmethod
    def load(cls, path: Path, chunk: int = 1024) -> ExactIndex:
        vectors = np.load(path, allow_pickle=False)
        return cls(vectors, dtype=vectors.dtype.type, chunk=chunk)


def build_index(vectors: np.ndarray, dtype: type = np.float64, chunk: int = 1024) -> NeighbourIndex:
    """The index every search uses (calibration at export, placement in serving): exact today."""
    return ExactIndex(vectors, dtype=dtype, chunk=chunk)


def load_index(path: Path) -> NeighbourIndex:
    """Reopen an index written by `NeighbourIndex.save`."""
    return ExactIndex.load(path)


def kth_neighbour_distance(
    points: np.ndarray, reference: np.ndarray, k: int, chunk: int = 1024, dtype: type = np.float64
) -> np.ndarray:
    """Distance from each point to its k-th nearest reference point (1-based k): a one-off search
    (a caller that searches the same reference again keeps the index from `build_index` instead)."""
    return build_index(reference, dtype=dtype, chunk=chunk).kth_distance(points, k)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero. Euclidean distance between unit
    vectors is a monotone function of their cosine distance."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
