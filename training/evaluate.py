"""Map quality as the medical t-SimCNE paper measures it (Nwabufo et al., reference doc §6).

- kNN accuracy: KNeighborsClassifier(k=15, Euclidean) trained on 90 % of the 2-D map and scored on a
  stratified 10 % hold-out (random_state 0);
- silhouette score of the 2-D map with the ground-truth class labels (Euclidean).
Both use scikit-learn, as the papers did. The silhouette costs O(N^2) distances, so above
SILHOUETTE_SAMPLE images it is computed on a uniform random sample of that many (random_state 0;
metrics.json records the sample size); kNN in 2-D uses a tree and always scores the whole hold-out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import silhouette_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from tsimcne_core.errors import UserError

KNN_K = 15
HOLDOUT = 0.1
RANDOM_STATE = 0
SILHOUETTE_SAMPLE = 20_000  # above PBC's 17,092, so every figure in benchmarks/README.md is exact


@dataclass(frozen=True)
class MapQuality:
    knn_accuracy: float
    silhouette: float
    n_images: int
    n_classes: int
    k: int = KNN_K
    holdout: float = HOLDOUT
    silhouette_sample: int | None = None  # None: all images

    def as_dict(self) -> dict:
        return asdict(self)


def knn_accuracy(coords: np.ndarray, labels: np.ndarray, k: int = KNN_K) -> float:
    """Accuracy of k-NN on a stratified 10 % hold-out (random_state 0)."""
    train_x, test_x, train_y, test_y = train_test_split(
        coords, labels, test_size=HOLDOUT, random_state=RANDOM_STATE, stratify=labels
    )
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(train_x)))
    return float(classifier.fit(train_x, train_y).score(test_x, test_y))


def map_quality(
    coords: np.ndarray, labels: np.ndarray | None, silhouette_sample: int = SILHOUETTE_SAMPLE
) -> MapQuality:
    if labels is None:
        raise UserError("this dataset has no labels: kNN accuracy and silhouette need class labels")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UserError("evaluation needs at least two classes")
    if counts.min() < 2 or len(labels) * HOLDOUT < len(classes):
        raise UserError(
            f"too few images per class for a stratified 10 % hold-out (smallest class has {counts.min()}, "
            f"{len(labels)} images for {len(classes)} classes)"
        )
    sample = silhouette_sample if len(labels) > silhouette_sample else None
    silhouette = silhouette_score(coords, labels, metric="euclidean", sample_size=sample, random_state=RANDOM_STATE)
    return MapQuality(
        knn_accuracy=knn_accuracy(coords, labels),
        silhouette=float(silhouette),
        n_images=len(labels),
        n_classes=len(classes),
        silhouette_sample=sample,
    )
