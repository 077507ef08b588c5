"""Nearest-neighbour search, in one place: the map's neighbours, the flag's feature and position
distances, at export (calibration) and in serving alike. numpy only.

Everything that searches a reference set goes through a `NeighbourIndex`. Two implementations:
- `ExactIndex` (numpy brute force: one matrix product per chunk of queries, exact, no extra memory
  beyond the reference): the 2-D map, and the features of bundles exported without FAISS;
- `FaissIndex` (faiss-cpu): the network features of bundles exported with it. Exact (a flat index) up to
  `EXACT_LIMIT` reference vectors; above it an inverted-file index (IVF) whose candidates, found from
  8-bit codes in the `nprobe` nearest of `nlist` cells, are re-ranked with exact float32 distances. The
  export measures its recall against exact search and raises `nprobe` until it reaches the target
  (serving/detector.py `plan_feature_index`); the flag is calibrated with the very index it is served with.
`build_index` makes the exact index; `build_faiss_index` the FAISS one from its parameters.

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
    """The exact index (the map's neighbours; the features of bundles exported without FAISS)."""
    return ExactIndex(vectors, dtype=dtype, chunk=chunk)


# Up to this many reference vectors FAISS searches exactly (flat): a 64-image request against 200,000
# 32-D features reads 26 MB, a few milliseconds; above it the IVF index is used.
EXACT_LIMIT = 200_000
FAISS_SEED = 1234  # the IVF's k-means: the same cells at export and in every serving worker


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def ivf_cells(n: int) -> int:
    """Number of IVF cells for n vectors: ~4 sqrt(n) (FAISS's guideline for 10^6-10^7 vectors), at
    least 1 and at most n / 39 (k-means needs ~39 training points per cell)."""
    return int(max(1, min(4 * np.sqrt(n), n // 39)))


class FaissIndex:
    """FAISS search over float32 vectors: `kind` "flat" (exact) or "ivf" (IVF over 8-bit scalar-quantised
    codes, `nlist` cells, `nprobe` searched, the best `refine` x k candidates re-ranked exactly).
    Distances are Euclidean (FAISS gives squared ones; their square roots are returned)."""

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 1,
        refine: int = 4,
        seed: int = FAISS_SEED,
    ) -> None:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"a neighbour index needs a non-empty (n, d) array, got shape {vectors.shape}")
        if kind not in ("flat", "ivf"):
            raise ValueError(f"unknown FAISS index kind {kind!r} (flat or ivf)")
        n, dims = vectors.shape
        self.kind, self.dims, self.refine = kind, dims, refine
        if kind == "flat":
            self.nlist, self._nprobe = None, None
            self.index = faiss.IndexFlatL2(dims)
        else:
            self.nlist = int(nlist or ivf_cells(n))
            quantiser = faiss.IndexFlatL2(dims)
            ivf = faiss.IndexIVFScalarQuantizer(quantiser, dims, self.nlist, faiss.ScalarQuantizer.QT_8bit)
            ivf.cp.seed = seed
            ivf.train(vectors)
            self.index = faiss.IndexRefineFlat(ivf)
            self.index.k_factor = refine
            self._ivf, self._quantiser = ivf, quantiser  # kept alive with the wrapper
            self.nprobe = nprobe
        self.index.add(vectors)

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ValueError("only an IVF index has nprobe")
        self._nprobe = int(min(max(1, value), self.nlist))
        self._ivf.nprobe = self._nprobe

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        squared, indices = self.index.search(queries, k)
        return np.sqrt(np.clip(squared.astype(np.float64), 0.0, None)), indices.astype(np.int64)

    def kth_distance(self, queries: np.ndarray, k: int) -> np.ndarray:
        distances, _ = self.search(queries, k)
        return distances[:, -1]

    def save(self, path: Path) -> None:
        """FAISS's own file format (name it `.faiss` for `load_index`)."""
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> FaissIndex:
        import faiss

        loaded = cls.__new__(cls)
        loaded.index = faiss.read_index(str(path))
        loaded.dims = loaded.index.d
        if isinstance(loaded.index, faiss.IndexRefine):
            loaded.kind, loaded.refine = "ivf", int(loaded.index.k_factor)
            loaded._ivf = faiss.extract_index_ivf(loaded.index.base_index)
            loaded.nlist, loaded._nprobe = int(loaded._ivf.nlist), int(loaded._ivf.nprobe)
        else:
            loaded.kind, loaded.refine, loaded.nlist, loaded._nprobe = "flat", 4, None, None
        return loaded


def build_faiss_index(
    vectors: np.ndarray, kind: str, nlist: int | None = None, nprobe: int = 1, refine: int = 4
) -> FaissIndex:
    return FaissIndex(vectors, kind=kind, nlist=nlist, nprobe=nprobe, refine=refine)


def true_neighbours(exact: NeighbourIndex, queries: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """(M, k) row numbers of each query's k nearest reference rows by exact search (`chunk` queries at a
    time: exact search holds a (chunk, n) distance matrix)."""
    return np.concatenate([exact.search(queries[s : s + chunk], k)[1] for s in range(0, len(queries), chunk)])


def recall_against(index: NeighbourIndex, truth: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> float:
    """Share of each query's true k nearest reference rows (`truth`, from true_neighbours) that `index`
    returns among its k, averaged. The truth is computed once, however many settings are tried."""
    hits = 0
    for start in range(0, len(queries), chunk):
        _, found = index.search(queries[start : start + chunk], k)
        hits += sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth[start : start + chunk], strict=True))
    return hits / truth.size


def recall_at_k(index: NeighbourIndex, exact: NeighbourIndex, queries: np.ndarray, k: int, chunk: int = 64) -> float:
    """recall_against the true neighbours that `exact` finds."""
    return recall_against(index, true_neighbours(exact, queries, k, chunk), queries, k, chunk)


def load_index(path: Path) -> NeighbourIndex:
    """Reopen an index written by `NeighbourIndex.save` (FaissIndex: a `.faiss` file)."""
    if Path(path).suffix == ".faiss":
        return FaissIndex.load(path)
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
