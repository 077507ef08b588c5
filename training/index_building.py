"""Building the feature index at export: exact up to what fits, else IVF with nprobe raised until its recall
against exact search reaches the target on the calibration queries, and writing it with the coordinates for
serving (export and `tsimcne journal fold`). Serving only opens what this built (tsimcne_core/feature_index.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tsimcne_core.bundle_format import COORDS_FILE, FEATURE_INDEX_FILE, FEATURES_FILE
from tsimcne_core.calibration import (
    FeatureIndex,
)
from tsimcne_core.neighbours import (
    FaissIndex,
    NeighbourIndex,
    as_rows,
    blocks,
    build_faiss_index,
    build_index,
    faiss_available,
)
from tsimcne_core.neighbours import exact_limit as exact_limit_for

logger = logging.getLogger("tsimcne")


RECALL_TARGET = 0.99  # recall@k against exact search that an approximate feature index must reach


def plan_feature_index(
    reference_projected: np.ndarray,
    queries: np.ndarray,
    k: int,
    exact_limit: int | None = None,
    target_recall: float = RECALL_TARGET,
    sample: int = 1000,
) -> tuple[NeighbourIndex, FeatureIndex]:
    """The feature index export calibrates with and serving will rebuild, and its record for bundle.json.

    With faiss-cpu: exact (flat) up to `exact_limit` reference vectors (default: as many as fit in
    tsimcne_core/neighbours.py EXACT_LIMIT_BYTES), else IVF, whose nprobe is doubled
    from 8 until its recall@k against exact search on (up to `sample` of) `queries` reaches `target_recall`
    (or every cell is searched). Without faiss-cpu: exact numpy search."""
    vectors = as_rows(reference_projected)
    n, dims = vectors.shape
    k = int(min(k, n))
    picked = np.random.default_rng(0).permutation(len(queries))[:sample]
    probe = np.asarray(queries, dtype=np.float32)[np.sort(picked)]
    fields = {"reference_size": n, "recall_k": k, "recall_queries": len(probe)}
    if not faiss_available():
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32), FeatureIndex(
            kind="exact", recall=1.0, **fields
        )
    if exact_limit is None:
        exact_limit = exact_limit_for(dims)
    if n <= exact_limit:
        vectors = np.asarray(vectors, dtype=np.float32)
        index = build_faiss_index(vectors, "flat")
        exact = build_index(vectors, dtype=np.float32)
        return index, FeatureIndex(kind="faiss-flat", recall=recall_at_k(index, exact, probe, k), **fields)
    index = build_faiss_index(vectors, "ivf", nprobe=8)
    # The truth from the exact float32 vectors the IVF index keeps for re-ranking: no second copy of 10^6 x D.
    truth = true_neighbours(index.exact(), probe, k)  # once: the exact search is the costly part of each try
    with tqdm(desc="tuning nprobe", unit="try", leave=False, disable=None) as bar:
        while True:
            recall = recall_against(index, truth, probe, k)
            bar.set_postfix(nprobe=index.nprobe, recall=f"{recall:.4f}")
            bar.update()
            if recall >= target_recall or index.nprobe >= index.nlist:
                break
            index.nprobe = index.nprobe * 2
    logger.info("IVF feature index: %d cells, nprobe %d, recall@%d %.4f", index.nlist, index.nprobe, k, recall)
    record = FeatureIndex(
        kind="faiss-ivf", nlist=index.nlist, nprobe=index.nprobe, refine=index.refine, recall=recall, **fields
    )
    return index, record


def true_neighbours(exact: NeighbourIndex, queries: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """(M, k) row numbers of each query's k nearest reference rows by exact search (`chunk` queries per
    progress step; the exact index itself keeps each block of distances within its byte budget)."""
    steps = list(blocks(len(queries), chunk))
    return np.concatenate(
        [exact.search(queries[rows], k)[1] for rows in tqdm(steps, desc="exact neighbours", leave=False, disable=None)]
    )


def recall_against(index: NeighbourIndex, truth: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> float:
    """Share of each query's true k nearest reference rows (`truth`, from true_neighbours) that `index`
    returns among its k, averaged. The truth is computed once, however many settings are tried."""
    hits = 0
    for rows in blocks(len(queries), chunk):
        _, found = index.search(queries[rows], k)
        hits += sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth[rows], strict=True))
    return hits / truth.size


def recall_at_k(index: NeighbourIndex, exact: NeighbourIndex, queries: np.ndarray, k: int, chunk: int = 64) -> float:
    """recall_against the true neighbours that `exact` finds."""
    return recall_against(index, true_neighbours(exact, queries, k, chunk), queries, k, chunk)


def write_serving_arrays(coords: np.ndarray, index: NeighbourIndex, staging: Path) -> list[str]:
    """The reference coordinates as a plain .npy file and the FAISS feature index (when export used
    FAISS), which serving memory-maps beside the projected features (written while embedding) so that
    its workers share one copy (tsimcne_core/reference.py); the names of the serving files."""
    np.save(staging / COORDS_FILE, np.ascontiguousarray(coords, dtype=np.float32), allow_pickle=False)
    written = [COORDS_FILE, FEATURES_FILE]
    if isinstance(index, FaissIndex):
        index.save(staging / FEATURE_INDEX_FILE)
        written.append(FEATURE_INDEX_FILE)
    return written
