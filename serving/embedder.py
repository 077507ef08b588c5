"""Placing new images on a bundle's map with onnxruntime (no torch): used by `tsimcne embed` and serving.

For each image: its map position (x, y), the k nearest reference images (id, label, distance), the
majority label among them with its share, and the out-of-distribution flag and score
(serving/flagging.py): "artefact" when the majority of the neighbours carry a label the bundle names
as an artefact label, else "out_of_distribution" when the score exceeds 1. Providers: "cpu", "cuda"
(refuses to run if CUDA was asked for but not obtained) or "auto" (CUDA when onnxruntime can use it,
else CPU); `provider` reports what the session actually got.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.bundle import MODEL_FILE, REFERENCE_FILE, BundleError, open_bundle
from serving.detector import METHOD as DETECTOR_METHOD
from serving.detector import Detector, FeatureSpace, channel_statistics
from serving.flagging import calibrate, pairwise_distances, score_from_kth_distance
from serving.preprocess import to_model_input

DEFAULT_NEIGHBOURS = 5


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
    flag: str  # one of FLAGS
    score: float  # the flag's score (serving/detector.py); > 1 is flagged
    evidence: dict[str, float]  # each measurement over its own calibrated threshold: features, pixels, position
    duplicate_of: int | None = None  # index of another image of the same call that looks the same


IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, ARTEFACT = "in_distribution", "out_of_distribution", "artefact"
FLAGS = (IN_DISTRIBUTION, OUT_OF_DISTRIBUTION, ARTEFACT)


class BundleEmbedder:
    def __init__(
        self,
        bundle: str | Path,
        provider: str = "auto",
        neighbours: int = DEFAULT_NEIGHBOURS,
        threads: int = 0,
        spin: bool = True,
    ) -> None:
        """spin=False: onnxruntime's idle threads sleep instead of spinning, which a service sharing its
        CPU cores with HTTP handling needs (spinning threads would take the cores from the event loop)."""
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        self.folder = Path(bundle)
        self.manifest = open_bundle(self.folder)
        if provider not in ("auto", "cpu", "cuda"):
            raise BundleError(f"provider {provider!r}: choose auto, cpu or cuda")
        wanted = ["CPUExecutionProvider"]
        if provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in ort.get_available_providers()):
            if hasattr(ort, "preload_dlls"):
                # Missing CUDA libraries are not fatal here: the provider check below decides.
                with contextlib.suppress(Exception):
                    ort.preload_dlls()
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's choice (all physical cores)
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options, providers=wanted)
        self.provider = self.session.get_providers()[0]
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise BundleError("CUDA was requested but onnxruntime could not use it (no GPU or CUDA 13/cuDNN 9 missing)")
        with np.load(self.folder / REFERENCE_FILE, allow_pickle=False) as reference:
            self.ref_coords = reference["coords"].astype(np.float32)
            self.ref_ids = reference["ids"]
            labels = reference["labels"] if "labels" in reference.files else None
            ref_features = reference["features"].astype(np.float32) if "features" in reference.files else None
            space = (
                FeatureSpace(reference["feature_mean"], reference["feature_components"])
                if "feature_components" in reference.files
                else None
            )
        names = self.manifest.class_names
        self.ref_labels = np.array([names[i] for i in labels]) if labels is not None else None
        self.ref_label_indices = (
            labels.astype(np.int64) if labels is not None else np.full(len(self.ref_coords), -1, dtype=np.int64)
        )
        self._ref64 = self.ref_coords.astype(np.float64)
        self._ref_sq = (self._ref64**2).sum(1)
        self.k = min(neighbours, len(self.ref_coords))
        self.calibration = self.manifest.calibration or calibrate(self.ref_coords)
        # Bundles from before the combined flag (or without stored features) flag by map position alone.
        self.detector = (
            Detector(self.calibration, ref_features, space)
            if self.calibration.get("method") == DETECTOR_METHOD and ref_features is not None and space is not None
            else None
        )
        position = self.calibration["position"] if self.detector is not None else self.calibration
        self.position_k = min(int(position["k"]), len(self.ref_coords))
        self.position_threshold = float(position["threshold"])
        self.outputs = ["coords", "features"] if self.detector is not None else ["coords"]
        self.artefact_labels = set(self.manifest.artefact_labels)

    def prepare(self, images: list[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 images (any size) -> the model's float32 input batch."""
        return to_model_input(images, self.manifest.preprocessing)

    def run_model(self, batch: np.ndarray) -> np.ndarray:
        """One array per image: map position (2) then backbone features when the flag uses them; the one
        call that uses the accelerator (one array so a batch can be split between requests by rows)."""
        results = self.session.run(self.outputs, {self.manifest.input_name: batch})
        return results[0] if len(results) == 1 else np.concatenate(results, axis=1)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """run_model plus, when the flag uses features, each image's feature-neighbour distance as a last
        column: the two steps worth doing once per batch rather than once per request."""
        outputs = self.run_model(batch)
        if self.detector is None:
            return outputs
        distance = self.detector.feature_distance(outputs[:, self.manifest.out_dim :])
        return np.concatenate([outputs, distance[:, None].astype(outputs.dtype)], axis=1)

    def coordinates(self, images: list[np.ndarray]) -> np.ndarray:
        """Map positions of decoded RGB uint8 images (any size)."""
        return self.run_model(self.prepare(images))[:, : self.manifest.out_dim]

    def place(self, images: list[np.ndarray]) -> list[Placement]:
        batch = self.prepare(images)
        return self.placements(self.infer(batch), batch)

    def placements(self, outputs: np.ndarray, batch: np.ndarray | None = None) -> list[Placement]:
        """Neighbours, majority label, flag and evidence from `infer`'s outputs (and the model input
        `batch`, whose pixel statistics the flag uses)."""
        coords = outputs[:, : self.manifest.out_dim]
        # Computed once: neighbours and the position evidence share it.
        distances = pairwise_distances(coords, self._ref64, self._ref_sq)
        # One partial sort (a single kth: cheaper than two) serves both the k nearest neighbours and the
        # position's k-th distance; then only the few candidates are sorted.
        k_pos = self.position_k
        k_top = max(self.k, k_pos)
        candidates = np.argpartition(distances, k_top - 1, axis=1)[:, :k_top]
        candidate_distances = np.take_along_axis(distances, candidates, axis=1)
        order = candidate_distances.argsort(axis=1)
        nearest = np.take_along_axis(candidates, order[:, : self.k], axis=1)
        kth = np.take_along_axis(candidate_distances, order[:, k_pos - 1 : k_pos], axis=1)[:, 0]
        if self.detector is not None:
            if batch is None:
                raise ValueError("the model input batch is needed for the pixel evidence")
            features, feature_distance = outputs[:, self.manifest.out_dim : -1], outputs[:, -1].astype(np.float64)
            found = self.detector.evidence(feature_distance, channel_statistics(batch), kth)
            scores = found.score
            twins = self.detector.duplicates(features)
            evidence = [
                {"features": float(f), "pixels": float(p), "position": float(q)}
                for f, p, q in zip(found.features, found.pixels, found.position, strict=True)
            ]
        else:
            scores, _ = score_from_kth_distance(kth, self.calibration)  # the position-only flag
            evidence = [{"position": float(q)} for q in scores]
            twins = np.full(len(scores), -1)
        flagged = scores > 1.0
        placements = []
        for row, index in enumerate(nearest):
            labels = [str(label) for label in self.ref_labels[index]] if self.ref_labels is not None else []
            majority, share = None, None
            if labels:
                values, counts = np.unique(labels, return_counts=True)
                majority, share = str(values[counts.argmax()]), float(counts.max() / len(labels))
            placements.append(
                Placement(
                    x=float(coords[row, 0]),
                    y=float(coords[row, 1]) if coords.shape[1] > 1 else 0.0,
                    neighbour_ids=[str(i) for i in self.ref_ids[index]],
                    neighbour_indices=[int(i) for i in index],
                    neighbour_labels=labels,
                    neighbour_distances=[float(d) for d in distances[row, index]],
                    majority_label=majority,
                    majority_share=share,
                    flag=self._flag(majority, bool(flagged[row])),
                    score=float(scores[row]),
                    evidence=evidence[row],
                    duplicate_of=int(twins[row]) if twins[row] >= 0 else None,
                )
            )
        return placements

    def _flag(self, majority_label: str | None, beyond_threshold: bool) -> str:
        if majority_label is not None and majority_label in self.artefact_labels:
            return ARTEFACT
        return OUT_OF_DISTRIBUTION if beyond_threshold else IN_DISTRIBUTION
