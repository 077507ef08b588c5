"""The neighbour search behind one interface (serving/neighbours.py): exact results, save and load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.neighbours import (
    ExactIndex,
    FaissIndex,
    NeighbourIndex,
    build_faiss_index,
    build_index,
    ivf_cells,
    load_index,
    nearest_other,
    recall_at_k,
)


def _brute(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_search_and_kth_distance_match_brute_force(dtype) -> None:
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(300, 8)), rng.normal(size=(23, 8))
    index = build_index(reference, dtype=dtype, chunk=7)  # chunks smaller than the query count
    assert isinstance(index, NeighbourIndex) and len(index) == 300
    brute = _brute(queries, reference)
    distances, indices = index.search(queries, 5)
    assert distances.shape == indices.shape == (23, 5)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :5])
    tolerance = 1e-9 if dtype is np.float64 else 1e-4
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :5], atol=tolerance)
    np.testing.assert_allclose(index.kth_distance(queries, 3), np.sort(brute, axis=1)[:, 2], atol=tolerance)


def test_k_larger_than_the_reference_is_capped() -> None:
    index = build_index(np.array([[0.0, 0.0], [3.0, 4.0]]))
    distances, indices = index.search(np.array([[0.0, 0.0]]), 10)
    assert indices.tolist() == [[0, 1]] and distances.tolist() == [[0.0, 5.0]]
    assert index.kth_distance(np.array([[0.0, 0.0]]), 10).tolist() == [5.0]


def test_save_and_load_give_the_same_answers(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    index = build_index(rng.normal(size=(50, 4)).astype(np.float32), dtype=np.float32)
    index.save(tmp_path / "index.npy")
    again = load_index(tmp_path / "index.npy")
    queries = rng.normal(size=(6, 4))
    assert isinstance(again, ExactIndex) and again.dtype is np.float32
    for a, b in zip(index.search(queries, 4), again.search(queries, 4), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_reference_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_index(np.zeros((0, 2)))


def test_nearest_other_skips_itself() -> None:
    vectors = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    index, distance = nearest_other(vectors)
    assert index.tolist() == [2, 0, 0] and distance.tolist() == [1.0, 10.0, 1.0]


# ---- FAISS (faiss-cpu, a dependency of the train and serve extras) -------------------------------------


def test_faiss_flat_finds_what_exact_search_finds(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    reference, queries = rng.normal(size=(400, 8)).astype(np.float32), rng.normal(size=(31, 8)).astype(np.float32)
    index, exact = build_faiss_index(reference, "flat"), build_index(reference)
    assert isinstance(index, NeighbourIndex) and len(index) == 400
    distances, indices = index.search(queries, 6)
    exact_distances, exact_indices = exact.search(queries, 6)
    np.testing.assert_array_equal(indices, exact_indices)
    np.testing.assert_allclose(distances, exact_distances, atol=1e-4)
    np.testing.assert_allclose(index.kth_distance(queries, 4), exact.kth_distance(queries, 4), atol=1e-4)
    assert recall_at_k(index, exact, queries, 6) == 1.0
    index.save(tmp_path / "flat.faiss")
    again = load_index(tmp_path / "flat.faiss")
    assert isinstance(again, FaissIndex) and again.kind == "flat"
    np.testing.assert_array_equal(again.search(queries, 6)[1], indices)


def _clustered(n: int, dims: int, seed: int) -> np.ndarray:
    """Points around 50 centres, like a map's clusters of cells (uniform noise has no structure to index)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dims)) * 4
    return (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, dims))).astype(np.float32)


def test_faiss_ivf_reranks_exactly_and_recall_grows_with_nprobe(tmp_path: Path) -> None:
    reference, queries = _clustered(6000, 16, 3), _clustered(200, 16, 4)
    exact = build_index(reference, dtype=np.float32)
    index = build_faiss_index(reference, "ivf", nprobe=1)
    assert index.kind == "ivf" and index.nlist == ivf_cells(6000) == 153
    low = recall_at_k(index, exact, queries, 15)
    index.nprobe = 32
    high = recall_at_k(index, exact, queries, 15)
    assert low < high and high >= 0.99
    # The candidates are re-ranked with exact float32 distances: each returned distance is the true one.
    distances, indices = index.search(queries, 15)
    true = np.linalg.norm(queries[:, None, :] - reference[indices], axis=2)
    np.testing.assert_allclose(distances, true, rtol=1e-5, atol=1e-4)
    assert (np.diff(distances, axis=1) >= 0).all()
    index.save(tmp_path / "ivf.faiss")
    again = load_index(tmp_path / "ivf.faiss")
    assert (again.kind, again.nlist, again.nprobe, again.refine) == ("ivf", 153, 32, 4)
    np.testing.assert_array_equal(again.search(queries, 15)[1], indices)


def test_faiss_refuses_what_it_cannot_index() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_faiss_index(np.zeros((0, 4), np.float32), "flat")
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        build_faiss_index(np.ones((10, 4), np.float32), "hnsw")
