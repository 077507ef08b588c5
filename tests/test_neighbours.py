"""The neighbour search behind one interface (serving/neighbours.py): exact results, save and load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.neighbours import ExactIndex, NeighbourIndex, build_index, load_index, nearest_other


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
