"""Nearest-neighbour search, in one place: the map's neighbours, the flag's feature and position
distances, at export (calibration) and in serving alike.

Everything that searches a reference set goes through a `NeighbourIndex`. Three implementations:
- `TreeIndex` (scipy's k-d tree): the 2-D map (positions, the flag's position distance): exact, and
  O(log n) per query instead of a pass over every reference point;
- `ExactIndex` (numpy brute force: one matrix product per block of queries, exact): the features of
  bundles exported without FAISS or served where faiss is not installed;
- `FaissIndex` (faiss-cpu): the network features of bundles exported with it. Exact (a flat index) while the
  reference vectors take at most `EXACT_LIMIT_BYTES` (`exact_limit`: ~51,000 x 128-D); above it an
  inverted-file index (IVF) whose candidates, found from 8-bit codes in the `nprobe` nearest of `nlist`
  cells, are re-ranked with exact float32 distances. The
  export measures its recall against exact search and raises `nprobe` until it reaches the target
  (training/index_building.py `plan_feature_index`); the flag is calibrated with the very index it is served with.
  Export writes the index into the bundle; serving memory-maps it (`FaissIndex.load`), so that the
  workers of one machine share one copy in the page cache, and moves it to a GPU where there is one
  (`FaissIndex.to_gpu`).

Every exact distance computation works on blocks of queries sized by a byte budget (`rows_within`:
`DISTANCE_BUDGET` bytes of distances at a time), never on a fixed number of rows: against 10^6
reference points a block of 1,024 float64 rows would be 8 GB.

Distances are Euclidean. `search` returns each query's k nearest reference rows, nearest first;
`kth_distance` only the k-th smallest distance (1-based), which the flag needs and which an exact
search gets from one partial sort without ordering the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger("tsimcne")

# Bytes of distances one block of queries may hold against the whole reference (float64: 32 MiB is
# 4,194 rows against 1,000 reference points, 4 rows against 1,000,000). Temporaries of the same size
# (the matrix product, the partial sort) come on top, so the peak is a small multiple of it.
DISTANCE_BUDGET = 32 * 2**20


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


def rows_within(budget: int, columns: int, itemsize: int) -> int:
    """How many rows of `columns` values of `itemsize` bytes fit in `budget` bytes (at least 1)."""
    return max(1, int(budget) // max(1, columns * itemsize))


def blocks(count: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of at most `rows` covering range(count)."""
    for start in range(0, count, rows):
        yield slice(start, min(start + rows, count))


def squared_distances(
    points: np.ndarray,
    reference: np.ndarray,
    reference_sq: np.ndarray | None = None,
    dtype: type = np.float64,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """Squared Euclidean distances (n_points, n_reference) without an (n, m, d) temporary, clipped at 0:
    one matrix product and two in-place updates of its result. The whole matrix at once: callers with a
    large reference go through an index, which calls this per block of queries.

    reference_sq: the reference points' squared norms (in `dtype`), when the caller keeps them: a service
    placing a few images on a large map would otherwise spend most of this function recomputing them.
    dtype: float64 by default; float32 halves the memory read for large feature references.
    columns: the reference as (d, n) in `dtype`, when the caller keeps such a copy (a faster product).
    """
    points, reference = points.astype(dtype, copy=False), reference.astype(dtype, copy=False)
    if reference_sq is None:
        reference_sq = np.einsum("ij,ij->i", reference, reference)
    squared = points @ (reference.T if columns is None else columns)
    squared *= -2.0
    squared += reference_sq[None, :]
    squared += np.einsum("ij,ij->i", points, points)[:, None]
    return np.clip(squared, 0.0, None, out=squared)


def pairwise_distances(
    points: np.ndarray, reference: np.ndarray, reference_sq: np.ndarray | None = None, dtype: type = np.float64
) -> np.ndarray:
    """Euclidean distances (n_points, n_reference): `squared_distances`' square roots."""
    squared = squared_distances(points, reference, reference_sq, dtype)
    return np.sqrt(squared, out=squared)


def kth_smallest(distances: np.ndarray, k: int) -> np.ndarray:
    """The k-th smallest value (1-based) of each row."""
    k = min(k, distances.shape[1])
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def nearest_other(vectors: np.ndarray, budget: int = DISTANCE_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the index of and distance to the nearest other row of the same set: the
    near-duplicates within one request, and the duplicate threshold's calibration sample (<= 2,000).
    Blocks of rows within `budget` bytes of distances."""
    vectors = np.asarray(vectors, dtype=np.float64)
    squared = (vectors**2).sum(1)
    index, distance = np.empty(len(vectors), dtype=np.int64), np.empty(len(vectors))
    for rows in blocks(len(vectors), rows_within(budget, len(vectors), 8)):
        block = pairwise_distances(vectors[rows], vectors, squared)
        block[np.arange(block.shape[0]), np.arange(rows.start, rows.stop)] = np.inf  # not itself
        index[rows] = block.argmin(1)
        distance[rows] = block[np.arange(block.shape[0]), index[rows]]
    return index, distance


class ExactIndex:
    """Brute-force exact search. `dtype`: float64 (exact to the last digit) or float32 (features: half the
    memory read per query block, which is what bounds the flag's cost under load). The reference's squared
    norms are computed once, not per query. Queries are searched in blocks whose (rows, n) distance
    matrix stays within `budget` bytes. A float32 reference that is already contiguous float32 (a
    memory-mapped .npy) is used in place, not copied."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray, dtype: type = np.float64, budget: int = DISTANCE_BUDGET) -> None:
        if not isinstance(vectors, np.ndarray):
            vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"a neighbour index needs a non-empty (n, d) array, got shape {vectors.shape}")
        self.vectors = vectors if vectors.dtype == dtype and vectors.flags.c_contiguous else vectors.astype(dtype)
        self.dtype = dtype
        self.budget = budget
        self._squared_norms = np.einsum("ij,ij->i", self.vectors, self.vectors)
        # The matrix product of a few queries with the reference runs ~1.8x faster on a (d, n) copy than on
        # the (n, d) rows (OpenBLAS, 8 x 128 queries against 17,092 rows: 0.70 vs 1.31 ms): kept for
        # references up to EXACT_LIMIT_BYTES (what a flat index holds), the rows used as they are above.
        small = self.vectors.nbytes <= EXACT_LIMIT_BYTES
        self._columns = np.ascontiguousarray(self.vectors.T) if small else self.vectors.T

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def rows(self) -> int:
        """Queries per block."""
        return rows_within(self.budget, len(self), np.dtype(self.dtype).itemsize)

    def _squared(self, queries: np.ndarray) -> np.ndarray:
        return squared_distances(queries, self.vectors, self._squared_norms, self.dtype, self._columns)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Per block: one partial sort of the squared distances, then only the k candidates are ordered and
        # rooted.
        queries = np.asarray(queries)
        k = min(k, len(self))
        found = np.empty((len(queries), k), dtype=np.float64), np.empty((len(queries), k), dtype=np.int64)
        for rows in blocks(len(queries), self.rows):
            squared = self._squared(queries[rows])
            candidates = np.argpartition(squared, k - 1, axis=1)[:, :k]
            candidate_squared = np.take_along_axis(squared, candidates, axis=1)
            order = candidate_squared.argsort(axis=1, kind="stable")
            found[0][rows] = np.sqrt(np.take_along_axis(candidate_squared, order, axis=1))
            found[1][rows] = np.take_along_axis(candidates, order, axis=1)
        return found

    def kth_distance(self, queries: np.ndarray, k: int) -> np.ndarray:
        # The query's own squared norm shifts a whole row alike: the partial sort runs without it, and it is
        # added (and the result clipped at 0) on the k-th values only, two passes over the matrix fewer.
        queries = np.asarray(queries, dtype=self.dtype)
        out = np.empty(len(queries))
        for rows in blocks(len(queries), self.rows):
            block = queries[rows]
            shifted = block @ self._columns
            shifted *= -2.0
            shifted += self._squared_norms[None, :]
            kth = kth_smallest(shifted, k).astype(np.float64) + np.einsum("ij,ij->i", block, block)
            out[rows] = np.sqrt(np.clip(kth, 0.0, None))
        return out

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, self.vectors, allow_pickle=False)

    @classmethod
    def load(cls, path: Path, budget: int = DISTANCE_BUDGET) -> ExactIndex:
        vectors = np.load(path, allow_pickle=False, mmap_mode="r")
        return cls(vectors, dtype=vectors.dtype.type, budget=budget)


class TreeIndex:
    """Exact search in a low-dimensional space (the 2-D map) with scipy's k-d tree: O(log n) per query
    where brute force reads every reference point. float64, as the map's distances always were."""

    kind = "kd-tree"

    def __init__(self, vectors: np.ndarray) -> None:
        from scipy.spatial import cKDTree

        vectors = np.asarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"a neighbour index needs a non-empty (n, d) array, got shape {vectors.shape}")
        self.vectors = vectors
        self.tree = cKDTree(vectors, copy_data=False, balanced_tree=False)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self))
        distances, indices = self.tree.query(np.asarray(queries, dtype=np.float64), k=[*range(1, k + 1)])
        return distances.astype(np.float64), indices.astype(np.int64)

    def kth_distance(self, queries: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(self))
        distances, _ = self.tree.query(np.asarray(queries, dtype=np.float64), k=[k])
        return distances[:, 0].astype(np.float64)

    def save(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, self.vectors, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> TreeIndex:
        return cls(np.load(path, allow_pickle=False))


def build_index(vectors: np.ndarray, dtype: type = np.float64, budget: int = DISTANCE_BUDGET) -> NeighbourIndex:
    """The exact brute-force index (the features of bundles exported without FAISS)."""
    return ExactIndex(vectors, dtype=dtype, budget=budget)


def build_map_index(coords: np.ndarray) -> NeighbourIndex:
    """The index over map positions (2-D, or 1-D/3-D maps): a k-d tree."""
    return TreeIndex(coords)


# FAISS searches exactly (flat) while the reference vectors take at most this many bytes; above it the IVF
# index is used. A flat search reads every vector for every query: at 25 MB (~51,000 x 128-D float32) one
# query costs ~5-10 ms on one core, while 200,000 x 128-D took 45 ms a query (benchmarks/README.md
# section 12), too slow against a p99 < 100 ms target for one image.
EXACT_LIMIT_BYTES = 25 * 2**20


def exact_limit(dimensions: int) -> int:
    """The most reference vectors of `dimensions` float32 values searched exactly (EXACT_LIMIT_BYTES)."""
    return max(1, EXACT_LIMIT_BYTES // (4 * max(1, int(dimensions))))


FAISS_SEED = 1234  # the IVF's k-means: the same cells at export and in every serving worker
ADD_BLOCK = 65_536  # vectors added to a FAISS index at a time (a progress bar step)
TRAIN_POINTS_PER_CELL = 64  # k-means training vectors per IVF cell (`_training_sample`)
GPU_MAX_K = 2048  # FAISS GPU indexes select at most this many neighbours, and probe at most this many cells


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def set_faiss_threads(threads: int) -> None:
    """FAISS's OpenMP threads for searches in this process (a service worker: its share of the cores; FAISS
    would otherwise start one per core in every worker, and OpenMP threads wait busily)."""
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(max(1, threads))


def faiss_gpus() -> int:
    """CUDA devices FAISS can use: 0 with faiss-cpu (no GPU support compiled in) or without a device."""
    try:
        import faiss
    except ImportError:
        return 0
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a GPU build without a usable driver
        return 0


def ivf_cells(n: int) -> int:
    """Number of IVF cells for n vectors: ~4 sqrt(n) (FAISS's guideline for 10^6-10^7 vectors), at
    least 1 and at most n / 39 (k-means needs ~39 training points per cell)."""
    return int(max(1, min(4 * np.sqrt(n), n // 39)))


def as_rows(vectors: object) -> np.ndarray:
    """`vectors` as something with a shape that gives rows when sliced: an array, or rows read from a file
    on demand (training/chunks.py FileRows), which stay on disk until an index is built from them;
    anything else (lists) as a float32 array."""
    return vectors if hasattr(vectors, "shape") else np.asarray(vectors, dtype=np.float32)


def _training_sample(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """The vectors k-means trains the IVF cells on: all of them up to TRAIN_POINTS_PER_CELL per cell, else
    a seeded sample of that many (read in ascending row order). FAISS would sample up to 256 per cell
    itself, but only from the whole array in memory; 64 per cell is inside its advice (39-256) and makes
    training on 10^6 vectors 4x cheaper."""
    count = min(len(vectors), TRAIN_POINTS_PER_CELL * nlist)
    if count == len(vectors):
        return np.ascontiguousarray(vectors[:], dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=count, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _add_in_blocks(index, vectors: np.ndarray, what: str) -> None:
    """index.add, ADD_BLOCK vectors at a time, with a progress bar (1,000,000 IVF codes take minutes)."""
    steps = list(blocks(len(vectors), ADD_BLOCK))
    for rows in tqdm(steps, desc=f"adding to the {what} index", unit="block", leave=False, disable=None):
        index.add(np.ascontiguousarray(vectors[rows], dtype=np.float32))


class FaissIndex:
    """FAISS search over float32 vectors: `kind` "flat" (exact) or "ivf" (IVF over 8-bit scalar-quantised
    codes, `nlist` cells, `nprobe` searched, the best `refine` x k candidates re-ranked exactly).
    Distances are Euclidean (FAISS gives squared ones; their square roots are returned).
    `device` is "cpu", or "gpu" after `to_gpu`; `memory_mapped` tells whether `load` mapped the file."""

    device = "cpu"
    memory_mapped = False

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

        vectors = as_rows(vectors)  # export builds over 10^6 rows on disk without holding them twice
        if len(vectors.shape) != 2 or len(vectors) == 0:
            raise ValueError(f"a neighbour index needs a non-empty (n, d) array, got shape {vectors.shape}")
        if kind not in ("flat", "ivf"):
            raise ValueError(f"unknown FAISS index kind {kind!r} (flat or ivf)")
        n, dims = vectors.shape
        self.kind, self.dims, self.refine = kind, dims, refine
        if kind == "flat":
            self.nlist, self._nprobe, self._ivf = None, None, None
            self.index = faiss.IndexFlatL2(dims)
        else:
            self.nlist = int(nlist or ivf_cells(n))
            quantiser = faiss.IndexFlatL2(dims)
            ivf = faiss.IndexIVFScalarQuantizer(quantiser, dims, self.nlist, faiss.ScalarQuantizer.QT_8bit)
            ivf.cp.seed = seed
            # k-means on a seeded sample of TRAIN_POINTS_PER_CELL per cell: the same cells from the same
            # vectors, in export and in a serving worker rebuilding an older bundle.
            logger.info(
                "training the IVF index: %d cells on %d of %d vectors",
                self.nlist, min(n, TRAIN_POINTS_PER_CELL * self.nlist), n,
            )  # fmt: skip
            ivf.train(_training_sample(vectors, self.nlist, seed))
            self.index = faiss.IndexRefineFlat(ivf)
            self.index.k_factor = refine
            self._ivf, self._quantiser = ivf, quantiser  # kept alive with the wrapper
            self.nprobe = nprobe
        _add_in_blocks(self.index, vectors, kind)

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

    def exact(self) -> FaissIndex:
        """Exact search over the same vectors without another copy of them: the index itself when flat,
        the float32 vectors an IVF index re-ranks with otherwise (the truth its recall is measured against)."""
        import faiss

        if self.kind == "flat":
            return self
        if self.device != "cpu":
            raise ValueError("take the exact view before moving the index to the GPU")
        view = FaissIndex.__new__(FaissIndex)
        view.index = faiss.downcast_index(self.index.refine_index)
        view.kind, view.dims, view.refine, view.nlist, view._nprobe, view._ivf = "flat", self.dims, 4, None, None, None
        view._owner = self  # the IVF wrapper owns the vectors
        return view

    def save(self, path: Path) -> None:
        """FAISS's own file format (name it `.faiss` for `load_index`). Only a CPU index is saved."""
        import faiss

        if self.device != "cpu":
            raise ValueError("save the index before moving it to the GPU")
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, mmap: bool = True) -> FaissIndex:
        """Reopen a saved index. mmap=True maps the file instead of reading it into this process:
        faiss's IO_FLAG_MMAP_IFC maps every vector and code array of the flat and IVF-with-refinement
        indexes used here (the older IO_FLAG_MMAP maps only IVF lists, and IO_FLAG_READ_ONLY alone maps
        nothing; measured with faiss-cpu 1.15.1, benchmarks/README.md section 12), so the serving workers
        of one machine share one copy in the page cache. The mapped index is read-only: nothing may be
        added to it. A faiss without the flag reads the file into memory."""
        import faiss

        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if mmap else 0
        loaded = cls.__new__(cls)
        loaded.index = faiss.read_index(str(path), flags)
        loaded.memory_mapped = bool(flags)
        loaded.dims = loaded.index.d
        if isinstance(loaded.index, faiss.IndexRefine):
            loaded.kind, loaded.refine = "ivf", int(loaded.index.k_factor)
            loaded._ivf = faiss.extract_index_ivf(loaded.index.base_index)
            loaded.nlist, loaded._nprobe = int(loaded._ivf.nlist), int(loaded._ivf.nprobe)
        elif isinstance(loaded.index, faiss.IndexFlat):
            loaded.kind, loaded.refine, loaded.nlist, loaded._nprobe, loaded._ivf = "flat", 4, None, None, None
        else:
            raise ValueError(f"{path}: a FAISS {type(loaded.index).__name__}, not a flat or IVF-with-refinement index")
        return loaded

    def to_gpu(self, device: int = 0) -> None:
        """Move the search to CUDA device `device` (faiss with GPU support: faiss-gpu-cu12). Flat: a
        GpuIndexFlatL2. IVF: FAISS cannot clone its re-ranking wrapper to the GPU, so the IVF part goes to
        the GPU (where the candidates are found) and the exact re-ranking of refine x k candidates per
        query stays on the CPU over the (memory-mapped) vectors. Raises when it cannot (no GPU build or
        device, a GPU that the wheel was not built for, an nprobe above the GPU's limit)."""
        import faiss

        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("this faiss has no GPU support (faiss-cpu)")
        if self.kind == "ivf" and (self._nprobe or 1) > GPU_MAX_K:
            raise RuntimeError(f"nprobe {self._nprobe} is above the GPU limit of {GPU_MAX_K}")
        resources = faiss.StandardGpuResources()
        if self.kind == "flat":
            moved = faiss.index_cpu_to_gpu(resources, device, self.index)
            self._cpu_parts = (self.index,)
        else:
            gpu_ivf = faiss.index_cpu_to_gpu(resources, device, self.index.base_index)
            gpu_ivf.nprobe = self._nprobe
            refine = faiss.downcast_index(self.index.refine_index)
            moved = faiss.IndexRefine(gpu_ivf, refine)
            moved.k_factor = self.refine
            self._cpu_parts = (self.index, gpu_ivf, refine)  # the wrapper does not own them
            self._ivf = gpu_ivf
        # One search proves the kernels run on this device (a wheel built for other GPUs fails here).
        moved.search(np.zeros((1, self.dims), dtype=np.float32), 1)
        self.index, self._resources, self.device = moved, resources, "gpu"


def build_faiss_index(
    vectors: np.ndarray, kind: str, nlist: int | None = None, nprobe: int = 1, refine: int = 4
) -> FaissIndex:
    return FaissIndex(vectors, kind=kind, nlist=nlist, nprobe=nprobe, refine=refine)


def load_index(path: Path) -> NeighbourIndex:
    """Reopen an index written by `NeighbourIndex.save` (FaissIndex: a `.faiss` file)."""
    if Path(path).suffix == ".faiss":
        return FaissIndex.load(path)
    return ExactIndex.load(path)


def kth_neighbour_distance(
    points: np.ndarray, reference: np.ndarray, k: int, budget: int = DISTANCE_BUDGET, dtype: type = np.float64
) -> np.ndarray:
    """Distance from each point to its k-th nearest reference point (1-based k): a one-off exact search
    (a caller that searches the same reference again keeps an index instead)."""
    return build_index(reference, dtype=dtype, budget=budget).kth_distance(points, k)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero. Euclidean distance between unit
    vectors is a monotone function of their cosine distance."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
