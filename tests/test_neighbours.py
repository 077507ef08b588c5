"""The neighbour search behind one interface (tsimcne_core/neighbours.py): exact results at any memory budget,
the map's k-d tree, save and load (memory-mapped), FAISS."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from training.index_building import recall_at_k, true_neighbours
from tsimcne_core.neighbours import (
    ExactIndex,
    FaissIndex,
    NeighbourIndex,
    TreeIndex,
    build_faiss_index,
    build_index,
    build_map_index,
    faiss_gpus,
    ivf_cells,
    load_index,
    nearest_other,
    rows_within,
)


def _brute(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_search_and_kth_distance_match_brute_force(dtype) -> None:
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(300, 8)), rng.normal(size=(23, 8))
    index = build_index(reference, dtype=dtype, budget=7 * 300 * np.dtype(dtype).itemsize)  # blocks of 7 queries
    assert index.rows == 7
    assert isinstance(index, NeighbourIndex) and len(index) == 300
    brute = _brute(queries, reference)
    distances, indices = index.search(queries, 5)
    assert distances.shape == indices.shape == (23, 5)
    np.testing.assert_array_equal(indices, np.argsort(brute, axis=1)[:, :5])
    tolerance = 1e-9 if dtype is np.float64 else 1e-4
    np.testing.assert_allclose(distances, np.sort(brute, axis=1)[:, :5], atol=tolerance)
    np.testing.assert_allclose(index.kth_distance(queries, 3), np.sort(brute, axis=1)[:, 2], atol=tolerance)


@pytest.mark.parametrize("budget", [1, 8 * 41, 8 * 41 * 5 + 3, 2**30])
def test_any_memory_budget_gives_identical_answers(budget: int) -> None:
    """The budget decides only how many query rows share one distance block: 1 byte (one row at a time)
    and 1 GiB (all at once) give the same neighbours and the same distances (to the last bits: BLAS sums a
    single row's products in another order than a block's)."""
    rng = np.random.default_rng(5)
    reference, queries = rng.normal(size=(41, 3)), rng.normal(size=(17, 3))
    whole = build_index(reference, budget=2**30)
    blocked = build_index(reference, budget=budget)
    assert blocked.rows == rows_within(budget, 41, 8) and (budget > 1 or blocked.rows == 1)
    (whole_distances, whole_indices), (distances, indices) = whole.search(queries, 6), blocked.search(queries, 6)
    np.testing.assert_array_equal(indices, whole_indices)
    np.testing.assert_allclose(distances, whole_distances, rtol=1e-13)
    np.testing.assert_allclose(whole.kth_distance(queries, 4), blocked.kth_distance(queries, 4), rtol=1e-13)
    np.testing.assert_array_equal(true_neighbours(whole, queries, 5, chunk=4), true_neighbours(blocked, queries, 5))
    (whole_other, whole_gap), (other, gap) = nearest_other(reference, budget=2**30), nearest_other(reference, budget)
    np.testing.assert_array_equal(other, whole_other)
    np.testing.assert_allclose(gap, whole_gap, rtol=1e-13)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_map_tree_finds_what_exact_search_finds(dims: int) -> None:
    """The map's k-d tree against brute force: the same neighbours in the same order and the same
    distances (to 1e-9: brute force's |q|^2 + |r|^2 - 2 q.r loses digits for close points, the tree
    subtracts coordinates directly)."""
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(2000, dims)).astype(np.float32)  # float32, as the bundle stores the map
    queries = np.concatenate([rng.normal(size=(60, dims)), rng.normal(size=(5, dims)) * 10])  # some far away
    tree, exact = build_map_index(reference), build_index(reference)
    assert isinstance(tree, TreeIndex) and isinstance(tree, NeighbourIndex) and len(tree) == 2000
    distances, indices = tree.search(queries, 15)
    exact_distances, exact_indices = exact.search(queries, 15)
    np.testing.assert_allclose(distances, exact_distances, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(indices, exact_indices)
    np.testing.assert_allclose(tree.kth_distance(queries, 15), exact.kth_distance(queries, 15), rtol=0, atol=1e-9)
    np.testing.assert_allclose(tree.kth_distance(queries, 1), exact.kth_distance(queries, 1), rtol=0, atol=1e-9)
    assert tree.search(queries[:1], 1)[1].shape == (1, 1)  # k = 1 keeps the (q, k) shape
    assert tree.search(queries[:2], 5000)[0].shape == (2, 2000)  # k capped at the reference size


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
    with pytest.raises(ValueError, match="non-empty"):
        build_map_index(np.zeros((0, 2)))


def test_a_memory_mapped_float32_reference_is_searched_in_place(tmp_path: Path) -> None:
    """ExactIndex keeps a contiguous float32 reference as it is (a memory-mapped .npy stays shared)."""
    reference = np.random.default_rng(8).normal(size=(64, 5)).astype(np.float32)
    np.save(tmp_path / "features.npy", reference)
    mapped = np.load(tmp_path / "features.npy", mmap_mode="r")
    index = build_index(mapped, dtype=np.float32)
    assert index.vectors is mapped
    np.testing.assert_array_equal(index.search(reference[:3], 2)[1][:, 0], [0, 1, 2])


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


def test_an_ivf_index_built_from_rows_on_disk_equals_one_built_from_memory(tmp_path: Path) -> None:
    """Export builds the index of 10^6 vectors from rows read off the features file, training k-means on a
    seeded sample (here 64 x 8 of 3,000 vectors); the result must not depend on where the rows came from.
    Its exact view searches the stored vectors as exact search does."""
    from training.chunks import FileRows

    reference, queries = _clustered(3000, 16, 5), _clustered(100, 16, 6)
    np.save(tmp_path / "features.npy", reference)
    on_disk = FileRows(np.load(tmp_path / "features.npy", mmap_mode="r"))
    from_memory = build_faiss_index(reference, "ivf", nlist=8, nprobe=2)
    from_disk = build_faiss_index(on_disk, "ivf", nlist=8, nprobe=2)
    for found, expected in zip(from_disk.search(queries, 10), from_memory.search(queries, 10), strict=True):
        np.testing.assert_array_equal(found, expected)
    exact = build_index(reference, dtype=np.float32)
    _, truth = exact.search(queries, 10)
    _, view = from_disk.exact().search(queries, 10)
    assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(view, truth, strict=True)]) / 10 > 0.999
    np.testing.assert_allclose(from_disk.exact().kth_distance(queries, 10), exact.kth_distance(queries, 10), rtol=1e-4)


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


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_loaded_faiss_index_is_memory_mapped_from_its_file(tmp_path: Path, kind: str) -> None:
    """FaissIndex.load maps the file (faiss IO_FLAG_MMAP_IFC): the vectors live in a file-backed mapping
    of the index file, not in this process's own memory, and the answers are those of the built index."""
    reference, queries = _clustered(6000, 16, 9), _clustered(50, 16, 10)
    built = build_faiss_index(reference, kind, nprobe=16)
    built.save(tmp_path / "index.faiss")
    before = _mapped_kib(tmp_path / "index.faiss")
    loaded = FaissIndex.load(tmp_path / "index.faiss")
    loaded.search(queries, 15)  # touch the pages
    assert loaded.memory_mapped and before == 0
    assert _mapped_kib(tmp_path / "index.faiss") >= reference.nbytes // 1024 // 2
    for a, b in zip(built.search(queries, 15), loaded.search(queries, 15), strict=True):
        np.testing.assert_array_equal(a, b)
    del loaded  # unmaps the file
    copied = FaissIndex.load(tmp_path / "index.faiss", mmap=False)
    assert not copied.memory_mapped and _mapped_kib(tmp_path / "index.faiss") == 0


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line: address range ... file name
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(faiss_gpus() > 0, reason="a GPU is present: tests/test_neighbours.py checks only the refusal")
def test_moving_to_a_gpu_is_refused_clearly_without_one() -> None:
    index = build_faiss_index(_clustered(500, 8, 11), "flat")
    with pytest.raises(RuntimeError, match=r"no GPU support|CUDA|device"):
        index.to_gpu()
    assert index.device == "cpu" and len(index.search(_clustered(3, 8, 12), 2)[1]) == 3


def test_faiss_refuses_what_it_cannot_index() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_faiss_index(np.zeros((0, 4), np.float32), "flat")
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        build_faiss_index(np.ones((10, 4), np.float32), "hnsw")


def test_the_exact_limit_is_a_byte_budget_so_wider_features_switch_to_ivf_sooner() -> None:
    from tsimcne_core.neighbours import EXACT_LIMIT_BYTES, exact_limit

    for dimensions in (2, 32, 128, 512):
        rows = exact_limit(dimensions)
        assert rows * dimensions * 4 <= EXACT_LIMIT_BYTES < (rows + 1) * dimensions * 4
    assert exact_limit(128) < 200_000 < exact_limit(32)
