"""Linear evaluation: the split it uses, and that it measures class information (not a constant)."""

from __future__ import annotations

import numpy as np

from training.probe import linear_probe, split_indices


def _blobs(n_per_class: int, separation: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per_class)
    centres = rng.normal(size=(4, 16)) * separation
    return centres[labels] + rng.normal(size=(len(labels), 16)), labels


def test_stratified_split_has_medmnist_proportions_and_no_overlap() -> None:
    _, labels = _blobs(100, 1.0)
    train, val, test, how = split_indices([str(i) for i in range(len(labels))], labels)
    assert (len(train), len(val), len(test)) == (280, 40, 80) and "70/10/20" in how
    assert len(np.intersect1d(train, test)) == 0 and len(np.intersect1d(val, test)) == 0
    assert np.bincount(labels[test]).tolist() == [20, 20, 20, 20]


def test_official_split_is_kept() -> None:
    ids = [f"train/{i}" for i in range(6)] + [f"test/{i}" for i in range(3)] + [f"val/{i}" for i in range(2)]
    train, val, test, how = split_indices(ids, np.zeros(len(ids), dtype=int))
    assert train.tolist() == list(range(6)) and test.tolist() == [6, 7, 8] and val.tolist() == [9, 10]
    assert how.startswith("official")


def test_probe_separates_informative_features_and_not_noise() -> None:
    features, labels = _blobs(100, 4.0)
    ids = [str(i) for i in range(len(labels))]
    good = linear_probe(features, labels, ids)
    assert good.linear_accuracy > 0.95 and good.knn_accuracy > 0.95 and good.n_test == 80
    noise = linear_probe(np.random.default_rng(1).normal(size=features.shape), labels, ids)
    assert noise.linear_accuracy < 0.5 and noise.knn_accuracy < 0.5
