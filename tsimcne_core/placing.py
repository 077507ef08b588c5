"""Placing images on a bundle's map: the one pipeline every caller uses (no torch, no BentoML).

The HTTP route, `Bundle.place` (and so `tsimcne embed`), and the Ray actors all hand `Placer.place` a model
batch and get back one `PlacedImage` record per image, the record POST /embed answers with. A whole model
batch is placed at once and vectorised: one model run, one map search, one feature search, one pass of pixel
statistics and of the flag, the majority labels from one count; only the records themselves are built per
image. Near-duplicates are looked for within each *call* (an HTTP request, a batch of `Bundle.place`), so a
batch that gathers several requests still reports a duplicate only between images of the same request.

`Placer` composes the parts, each with one job:
- tsimcne_core/session.py `ModelSession`: the execution provider and the onnxruntime session;
- tsimcne_core/reference.py `ReferenceSet`: the reference map (reference.npz and its memory-mapped arrays);
- tsimcne_core/neighbours.py `build_map_index`: the nearest-neighbour search on the map (a k-d tree);
- tsimcne_core/flag.py `choose_flag`: which flag the bundle's calibration supports, and applying it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from tsimcne_core.bundle_format import MODEL_FILE, REFERENCE_FILE, BundleManifest, open_bundle
from tsimcne_core.flag import Flag, choose_flag, flag_names
from tsimcne_core.neighbours import build_map_index
from tsimcne_core.preprocess import fit_image, stack_fitted
from tsimcne_core.reference import ReferenceSet
from tsimcne_core.session import ModelSession

DEFAULT_NEIGHBOURS = 5  # nearest reference images reported per image (CLI, service and API default)


@dataclass(slots=True)
class Neighbour:
    """One of the reference images nearest to a placed image on the map."""

    id: Annotated[str, Field(description="reference image id (its file name or index in the training data)")]
    index: Annotated[
        int, Field(description="position in GET /map's arrays; its thumbnail is GET /thumbnail?index={index}")
    ]
    label: Annotated[str | None, Field(description="the reference image's label; null for an unlabelled collection")]
    distance: Annotated[float, Field(description="Euclidean distance on the map")]


@dataclass(slots=True)
class PlacedImage:
    """One image placed on the map: what POST /embed answers for it, `Bundle.place` returns and `tsimcne
    embed` writes (as `row()`)."""

    filename: Annotated[str, Field(description="the uploaded file's name (Bundle.place: the image's id)")]
    x: float
    y: float
    flag: Annotated[
        Flag, Field(description="where the image landed: among the collection, away from it, or among artefacts")
    ]
    score: Annotated[
        float,
        Field(
            description="the flag's score, calibrated so that 1 % of clean images exceed 1; above 1 is out of "
            "distribution"
        ),
    ]
    evidence: Annotated[
        dict[str, float],
        Field(
            description="each measurement over its own calibrated threshold (above 1 = unusual by that measure "
            "alone): 'features' (network features), 'pixels' (colour and exposure statistics), 'position' (map)"
        ),
    ]
    duplicate_of: Annotated[
        str | None,
        Field(description="file name of another image of this request that looks the same (a re-acquisition)"),
    ]
    neighbours: Annotated[list[Neighbour], Field(description="nearest reference images, nearest first")]
    majority_label: Annotated[str | None, Field(description="most common label among the neighbours")]
    majority_share: Annotated[float | None, Field(description="share of the neighbours that carry the majority label")]

    def row(self) -> dict[str, Any]:
        """The record as one flat row (the columns of `tsimcne embed`'s table and of its Parquet schema)."""
        labels = [n.label for n in self.neighbours]
        return {
            "id": self.filename,
            "x": self.x,
            "y": self.y,
            "neighbour_ids": [n.id for n in self.neighbours],
            "neighbour_indices": [n.index for n in self.neighbours],
            "neighbour_labels": labels if None not in labels else [],
            "neighbour_distances": [n.distance for n in self.neighbours],
            "majority_label": self.majority_label,
            "majority_share": self.majority_share,
            "flag": self.flag,
            "score": self.score,
            **{f"evidence_{name}": value for name, value in self.evidence.items()},
            "duplicate_of": self.duplicate_of or "",
            "error": "",
        }


class Placer:
    """A verified bundle opened for placing: `place(batch, names)` -> one PlacedImage per image."""

    def __init__(
        self,
        bundle: str | Path,
        provider: str = "auto",
        neighbours: int = DEFAULT_NEIGHBOURS,
        threads: int = 0,
        spin: bool = True,
    ) -> None:
        """Open and verify the bundle (BundleError naming the file otherwise); see ModelSession for
        `provider`, `threads` and `spin`."""
        self.folder = Path(bundle)
        self.manifest: BundleManifest = open_bundle(self.folder)
        self.model = ModelSession(self.folder / MODEL_FILE, provider, threads, spin, self.manifest.input_name)
        self.reference = ReferenceSet.load(
            self.folder / REFERENCE_FILE, self.manifest.class_names, listed=self.manifest.files
        )
        self.map_index = build_map_index(self.reference.coords)
        self.flag = choose_flag(
            self.manifest.calibration, self.reference, gpu=self.model.provider == "CUDAExecutionProvider"
        )
        self.calibration = self.flag.calibration
        self.k = min(neighbours, len(self.reference))
        self.position_k = min(self.flag.k, len(self.reference))
        self.outputs = ["coords", "features"] if self.flag.uses_features else ["coords"]
        self._labels = _LabelCounter(self.reference, self.manifest.artefact_labels)

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def neighbour_index(self) -> dict[str, object]:
        """How the neighbours are searched (GET /info): the map's index, and the feature index's kind,
        where it came from (the bundle's file, memory-mapped, or rebuilt) and its device with the reason."""
        return {"map": self.map_index.kind, "features": self.flag.index_info}

    @property
    def session(self):  # the onnxruntime session itself (benchmarks time the model alone)
        return self.model.session

    def fit(self, image: np.ndarray) -> np.ndarray:
        """One decoded RGB uint8 image (any size) -> RGB uint8 at the model's size (crop, resize)."""
        return fit_image(image, self.manifest.preprocessing)

    def model_input(self, fitted: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Images already at the model's size (`fit`) -> the float32 (N, 3, H, W) batch the model takes."""
        return stack_fitted(fitted, self.manifest.preprocessing)

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 images (any size) -> the model batch."""
        return self.model_input([self.fit(image) for image in images])

    def place_images(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[PlacedImage]:
        """Decoded RGB uint8 images (any size) placed as one call; `names` default to their positions."""
        return self.place(self.prepare(images), [str(i) for i in range(len(images))] if names is None else names)

    def coordinates(self, batch: np.ndarray) -> np.ndarray:
        """Map positions (N, out_dim) of a model batch: the model alone, nothing searched."""
        return self.model.run(["coords"], batch)[0]

    def warm_up(self) -> None:
        """One run of the whole pipeline on a blank image: onnxruntime allocates on its first run, the
        indexes page in; done before a service says it is ready."""
        prep = self.manifest.preprocessing
        self.place(np.zeros((1, 3, prep.height, prep.width), dtype=np.float32), ["warm-up"])

    def place(
        self,
        batch: np.ndarray,
        names: Sequence[str],
        calls: Sequence[int] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[PlacedImage]:
        """Place a model batch (`model_input`); `names` one per image (the records' `filename`); `calls` the
        sizes of the consecutive calls the batch gathers (default: one call), within which duplicates are
        looked for. `timings`, when given, gets the model run's seconds under "model"."""
        if len(names) != len(batch):
            raise ValueError(f"{len(batch)} images but {len(names)} names")
        started = time.perf_counter()
        results = self.model.run(self.outputs, batch)
        if timings is not None:
            timings["model"] = time.perf_counter() - started
        coords = results[0]
        features = results[1] if len(results) > 1 else None
        # One search serves both the k nearest neighbours and the position's k-th distance.
        distances, nearest = self.map_index.search(coords, max(self.k, self.position_k))
        kth = distances[:, self.position_k - 1]
        feature_distance = self.flag.feature_distance(features) if features is not None else None
        assessed = self.flag.assess(features, feature_distance, batch, kth, calls=calls)
        nearest, distances = nearest[:, : self.k], distances[:, : self.k]
        majority, share = self._labels.majority(nearest)
        flags = self._labels.flags(majority, assessed.scores)
        return _records(
            names, coords, assessed, flags, majority, share, nearest, distances, self.reference, self._labels
        )


class _LabelCounter:
    """Majority labels of neighbour sets, counted for a whole batch at once."""

    def __init__(self, reference: ReferenceSet, artefact_labels: Sequence[str]) -> None:
        self.reference = reference
        names = reference.class_names
        self.labelled = names is not None
        self.names: list[str] = [str(n) for n in names] if names is not None else []
        # Ties go to the label first in alphabetical order (as np.unique's sorted counts always gave them).
        order = sorted(range(len(self.names)), key=lambda i: self.names[i])
        self.rank = np.empty(len(self.names), dtype=np.int64)
        self.rank[order] = np.arange(len(self.names))
        self.artefact = np.array([name in set(artefact_labels) for name in self.names] + [False])

    def majority(self, nearest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label index (N,), share (N,)) of the most common label among each row's neighbours; -1 / nan
        for an unlabelled map."""
        rows = len(nearest)
        if not self.labelled:
            return np.full(rows, -1), np.full(rows, np.nan)
        classes = len(self.names)
        labels = self.reference.label_indices[nearest]  # (N, k); -1: an unlabelled reference image
        known = labels >= 0
        slots = (labels + classes * np.arange(rows)[:, None])[known]
        counts = np.bincount(slots, minlength=rows * classes).reshape(rows, classes)
        best = (counts * classes - self.rank).argmax(1)
        share = counts[np.arange(rows), best] / nearest.shape[1]
        none = counts.max(1) == 0  # no labelled neighbour: no majority (not the first label by chance)
        return np.where(none, -1, best), np.where(none, np.nan, share)

    def flags(self, majority: np.ndarray, scores: np.ndarray) -> list[str]:
        return flag_names(self.artefact[majority], scores)  # index -1 (unlabelled) reads the trailing False


def _records(names, coords, assessed, flags, majority, share, nearest, distances, reference, labels):
    """The PlacedImage records of a placed batch (the only per-image Python work of `place`)."""
    n = len(names)
    xs = coords[:, 0].tolist()
    ys = coords[:, 1].tolist() if coords.shape[1] > 1 else [0.0] * n
    ids = reference.ids[nearest].tolist()
    indices = nearest.tolist()
    neighbour_distances = distances.tolist()
    if labels.labelled:
        label_names = np.asarray([*labels.names, None], dtype=object)  # -1 (an unlabelled reference image): None
        neighbour_labels = label_names[reference.label_indices[nearest]].tolist()
        majority_labels = label_names[majority].tolist()
        shares = [None if np.isnan(value) else value for value in share.tolist()]
    else:
        neighbour_labels = [[None] * nearest.shape[1]] * n
        majority_labels = shares = [None] * n
    scores = assessed.scores.tolist()
    evidence = [dict(zip(assessed.names, values, strict=True)) for values in assessed.evidence.tolist()]
    twins = assessed.duplicates.tolist()
    return [
        PlacedImage(
            filename=names[row],
            x=xs[row],
            y=ys[row],
            flag=flags[row],  # type: ignore[arg-type]
            score=scores[row],
            evidence=evidence[row],
            duplicate_of=names[twins[row]] if twins[row] >= 0 else None,
            neighbours=[
                Neighbour(i, j, label, d)
                for i, j, label, d in zip(
                    ids[row], indices[row], neighbour_labels[row], neighbour_distances[row], strict=True
                )
            ],
            majority_label=majority_labels[row],
            majority_share=shares[row],
        )
        for row in range(n)
    ]
