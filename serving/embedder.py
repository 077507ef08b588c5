"""Placing new images on a bundle's map (no torch): used by the Python API's `Bundle`, `tsimcne embed` and
the service.

For each image: its map position (x, y), the k nearest reference images (id, label, distance), the
majority label among them with its share, and the flag with its score and evidence. `BundleEmbedder`
only composes the parts, each with one job:

- serving/session.py `ModelSession`: the execution provider and the onnxruntime session;
- serving/reference.py `ReferenceSet`: the reference map (reference.npz and its memory-mapped arrays);
- serving/neighbours.py `build_map_index`: the nearest-neighbour search on the map (a k-d tree);
- serving/flags.py `choose_flag`: which flag the bundle's calibration supports, and applying it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.bundle import MODEL_FILE, REFERENCE_FILE, open_bundle
from serving.flags import choose_flag, flag_name
from serving.neighbours import build_map_index
from serving.preprocess import to_model_input
from serving.reference import ReferenceSet
from serving.session import ModelSession

DEFAULT_NEIGHBOURS = 5  # nearest reference images reported per image (CLI, service and API default)


@dataclass
class Placement:
    x: float
    y: float
    neighbour_ids: list[str]
    neighbour_indices: list[int]  # positions in the reference map (GET /map, /thumbnail?index={index})
    neighbour_labels: list[str]
    neighbour_distances: list[float]
    majority_label: str | None
    majority_share: float | None
    flag: str  # one of serving/flags.py FLAGS
    score: float  # the flag's score (serving/detector.py); > 1 is flagged
    evidence: dict[str, float]  # each measurement over its own calibrated threshold: features, pixels, position
    duplicate_of: int | None = None  # index of another image of the same call that looks the same


class BundleEmbedder:
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
        self.manifest = open_bundle(self.folder)
        self.model = ModelSession(self.folder / MODEL_FILE, provider, threads, spin, self.manifest.input_name)
        self.reference = ReferenceSet.load(
            self.folder / REFERENCE_FILE, self.manifest.class_names, listed=self.manifest.files
        )
        self.map_index = build_map_index(self.reference.coords)
        on_gpu = self.model.provider == "CUDAExecutionProvider"
        self.flag = choose_flag(self.manifest.calibration, self.reference, gpu=on_gpu)
        self.calibration = self.flag.calibration
        self.k = min(neighbours, len(self.reference))
        self.position_k = min(self.flag.k, len(self.reference))
        self.outputs = ["coords", "features"] if self.flag.uses_features else ["coords"]
        self.artefact_labels = set(self.manifest.artefact_labels)

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

    @property
    def ref_coords(self) -> np.ndarray:
        return self.reference.coords

    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 images (any size) -> the model's float32 input batch."""
        return to_model_input(images, self.manifest.preprocessing)

    def run_model(self, batch: np.ndarray) -> np.ndarray:
        """One array per image: map position (out_dim) then backbone features when the flag uses them; the
        one call that uses the accelerator (one array so a batch can be split between requests by rows)."""
        results = self.model.run(self.outputs, batch)
        return results[0] if len(results) == 1 else np.concatenate(results, axis=1)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """run_model plus, when the flag uses features, each image's feature-neighbour distance as a last
        column: the two steps worth doing once per batch rather than once per request."""
        outputs = self.run_model(batch)
        if not self.flag.uses_features:
            return outputs
        distance = self.flag.feature_distance(outputs[:, self.manifest.out_dim :])
        return np.concatenate([outputs, distance[:, None].astype(outputs.dtype)], axis=1)

    def coordinates(self, images: list[np.ndarray]) -> np.ndarray:
        """Map positions of decoded RGB uint8 images (any size)."""
        return self.run_model(self.prepare(images))[:, : self.manifest.out_dim]

    def place(self, images: list[np.ndarray]) -> list[Placement]:
        batch = self.prepare(images)
        return self.placements(self.infer(batch), batch)

    def placements(self, outputs: np.ndarray, batch: np.ndarray | None = None) -> list[Placement]:
        """Neighbours, majority label, flag and evidence from `infer`'s outputs (and the model input
        `batch`, whose pixel statistics the combined flag uses)."""
        out_dim = self.manifest.out_dim
        coords = outputs[:, :out_dim]
        # One search serves both the k nearest neighbours and the position's k-th distance.
        distances, nearest = self.map_index.search(coords, max(self.k, self.position_k))
        kth = distances[:, self.position_k - 1]
        if self.flag.uses_features:
            features, feature_distance = outputs[:, out_dim:-1], outputs[:, -1].astype(np.float64)
        else:
            features = feature_distance = None
        assessed = self.flag.assess(features, feature_distance, batch, kth)
        placements = []
        for row in range(len(coords)):
            index = nearest[row, : self.k]
            labels, majority, share = self.reference.majority(index)
            placements.append(
                Placement(
                    x=float(coords[row, 0]),
                    y=float(coords[row, 1]) if coords.shape[1] > 1 else 0.0,
                    neighbour_ids=[str(i) for i in self.reference.ids[index]],
                    neighbour_indices=[int(i) for i in index],
                    neighbour_labels=labels,
                    neighbour_distances=[float(d) for d in distances[row, : self.k]],
                    majority_label=majority,
                    majority_share=share,
                    flag=flag_name(majority, bool(assessed.scores[row] > 1.0), self.artefact_labels),
                    score=float(assessed.scores[row]),
                    evidence=assessed.evidence[row],
                    duplicate_of=int(assessed.duplicates[row]) if assessed.duplicates[row] >= 0 else None,
                )
            )
        return placements
