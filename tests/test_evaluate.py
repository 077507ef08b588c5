"""Map quality: the silhouette of a large map is taken on a sample (O(N^2) otherwise), and says so."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import map_quality
from tsimcne_core.errors import UserError


def _clusters(n: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    return centres[labels] + rng.normal(0, spread, (n, 2)).astype(np.float32), labels


def test_small_maps_are_scored_on_every_image() -> None:
    coords, labels = _clusters(600, 1.0)
    quality = map_quality(coords, labels)
    assert quality.silhouette_sample is None
    assert quality.knn_accuracy > 0.95 and quality.silhouette > 0.6


def test_large_maps_score_the_silhouette_on_a_sample_close_to_the_full_value() -> None:
    coords, labels = _clusters(4000, 3.0)
    full = map_quality(coords, labels)
    sampled = map_quality(coords, labels, silhouette_sample=1000)
    assert sampled.silhouette_sample == 1000 and sampled.as_dict()["silhouette_sample"] == 1000
    assert sampled.knn_accuracy == full.knn_accuracy  # kNN always scores the whole hold-out
    assert sampled.silhouette != full.silhouette
    assert abs(sampled.silhouette - full.silhouette) < 0.03


def test_unlabelled_maps_are_refused_with_a_reason() -> None:
    coords, _ = _clusters(100, 1.0)
    with pytest.raises(UserError, match="no labels"):
        map_quality(coords, None)
