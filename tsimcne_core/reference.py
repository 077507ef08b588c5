"""A bundle's reference map: where the training images lie, their labels and ids, and for the flag their
features in the bundle's feature space. numpy only; opened once per serving worker.

reference.npz holds all of it (ids, labels, thumbnails, the feature projection, and in every bundle the
coordinates and features too, for readers that know only it). Bundles exported since issue 14 also hold
the coordinates and features as plain .npy files (tsimcne_core/bundle_format.py COORDS_FILE, FEATURES_FILE), which
are memory-mapped read-only here: the workers of one machine share one copy in the page cache instead
of each decompressing its own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsimcne_core.bundle_format import COORDS_FILE, FEATURE_INDEX_FILE, FEATURES_FILE, BundleError
from tsimcne_core.flag_evidence import FeatureSpace


@dataclass
class ReferenceSet:
    coords: np.ndarray  # float32 (N, out_dim): the map
    ids: np.ndarray  # str (N,)
    label_indices: np.ndarray  # int64 (N,): index into class_names, -1 where unlabelled
    class_names: np.ndarray | None  # str (C,): None for an unlabelled collection
    features: np.ndarray | None  # float32 (N, d): projected backbone features (None in older bundles)
    space: FeatureSpace | None  # how new images' features are projected (None in older bundles)
    feature_index_file: Path | None = None  # the saved FAISS index over `features`, if the bundle has one

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def has_features(self) -> bool:
        return self.features is not None and self.space is not None

    @property
    def labels(self) -> np.ndarray | None:
        """str (N,): each reference image's class name (made on demand: N strings per worker otherwise)."""
        return None if self.class_names is None else self.class_names[self.label_indices]

    @classmethod
    def load(cls, path: Path, class_names: list[str], listed: Collection[str] = ()) -> ReferenceSet:
        """reference.npz at `path`; the coordinates and features from the memory-mapped .npy files beside
        it when they are among `listed` (the bundle's files, already verified against their checksums)."""
        folder = Path(path).parent
        with np.load(path, allow_pickle=False) as reference:
            ids = reference["ids"]
            if COORDS_FILE in listed:
                coords = _mapped(folder / COORDS_FILE, len(ids))
            else:
                coords = reference["coords"].astype(np.float32)
            labels = reference["labels"] if "labels" in reference.files else None
            space = (
                FeatureSpace(reference["feature_mean"], reference["feature_components"])
                if "feature_components" in reference.files
                else None
            )
            if FEATURES_FILE in listed:
                features = _mapped(folder / FEATURES_FILE, len(ids))
            else:
                features = reference["features"].astype(np.float32) if "features" in reference.files else None
        if features is not None and space is not None and features.shape[1] != space.components.shape[0]:
            raise BundleError(
                f"{folder}: reference features have {features.shape[1]} dimensions, the feature projection "
                f"{space.components.shape[0]}"
            )
        return cls(
            coords=coords,
            ids=ids,
            label_indices=labels.astype(np.int64) if labels is not None else np.full(len(coords), -1, dtype=np.int64),
            class_names=np.asarray(class_names, dtype=str) if labels is not None else None,
            features=features,
            space=space,
            feature_index_file=folder / FEATURE_INDEX_FILE if FEATURE_INDEX_FILE in listed else None,
        )

    def majority(self, neighbours: np.ndarray) -> tuple[list[str], str | None, float | None]:
        """The labels of the reference images `neighbours` (indices), their most common one and its share."""
        if self.class_names is None:
            return [], None, None
        labels = [str(label) for label in self.class_names[self.label_indices[neighbours]]]
        values, counts = np.unique(labels, return_counts=True)
        return labels, str(values[counts.argmax()]), float(counts.max() / len(labels))


def _mapped(path: Path, rows: int) -> np.ndarray:
    """A float32 (rows, d) .npy file, memory-mapped read-only; BundleError naming it otherwise."""
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.dtype != np.float32 or array.ndim != 2 or len(array) != rows:
        raise BundleError(
            f"{path}: expected float32 ({rows}, d) like the ids in reference.npz, found {array.dtype} {array.shape}"
        )
    return array
