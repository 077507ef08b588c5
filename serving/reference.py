"""A bundle's reference map (reference.npz): where the training images lie, their labels and ids, and
for the flag their features in the bundle's feature space. numpy only; loaded once per bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.detector import FeatureSpace


@dataclass
class ReferenceSet:
    coords: np.ndarray  # float32 (N, out_dim): the map
    ids: np.ndarray  # str (N,)
    label_indices: np.ndarray  # int64 (N,): index into class_names, -1 where unlabelled
    labels: np.ndarray | None  # str (N,): the class names, None for an unlabelled collection
    features: np.ndarray | None  # float32 (N, d): projected backbone features (None in older bundles)
    space: FeatureSpace | None  # how new images' features are projected (None in older bundles)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def has_features(self) -> bool:
        return self.features is not None and self.space is not None

    @classmethod
    def load(cls, path: Path, class_names: list[str]) -> ReferenceSet:
        with np.load(path, allow_pickle=False) as reference:
            coords = reference["coords"].astype(np.float32)
            labels = reference["labels"] if "labels" in reference.files else None
            features = reference["features"].astype(np.float32) if "features" in reference.files else None
            space = (
                FeatureSpace(reference["feature_mean"], reference["feature_components"])
                if "feature_components" in reference.files
                else None
            )
            ids = reference["ids"]
        return cls(
            coords=coords,
            ids=ids,
            label_indices=labels.astype(np.int64) if labels is not None else np.full(len(coords), -1, dtype=np.int64),
            labels=np.array([class_names[i] for i in labels]) if labels is not None else None,
            features=features,
            space=space,
        )

    def majority(self, neighbours: np.ndarray) -> tuple[list[str], str | None, float | None]:
        """The labels of the reference images `neighbours` (indices), their most common one and its share."""
        if self.labels is None:
            return [], None, None
        labels = [str(label) for label in self.labels[neighbours]]
        values, counts = np.unique(labels, return_counts=True)
        return labels, str(values[counts.argmax()]), float(counts.max() / len(labels))
