"""Flagging benchmark (issue 5): how well do scores computed from where an image lands separate clean
held-out cells from artefacts, near-duplicates and images from elsewhere?

    .venv/bin/python -m benchmarks.flagging.run --bundle MODELS/BUNDLE --train TRAIN.npz \
        --calibration CALIB.npz --held-out TEST.npz

--train: the images the bundle's network was trained on (the reference); --calibration and --held-out:
two disjoint sets of clean images of the same collection it never saw. The shipped flag uses the
bundle's own calibration (made by `tsimcne export --calibration-data CALIB.npz`); the other scores are
calibrated here on CALIB at the same target false-flag rate. TEST is the clean test set (false flags
measured on it) and the source of every test kind (artefacts drawn onto its cells). Other-domain
images: uniform noise, crops of the two photographs shipped with scikit-learn, the project's synthetic
cells.

Scores (higher = more unusual): k-th nearest-neighbour distance among the reference images in the
network's backbone features (unit-normalised) and on the 2-D map; baselines: pixel statistics
(Mahalanobis distance of per-channel mean and spread) and a random direction in pixel space.
Near-duplicate bursts are scored by the distance to the nearest other image of the same request.
Reports AUROC and the share caught at the calibrated threshold, per kind; writes
benchmarks/scratch/flagging.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.flagging import artefacts  # noqa: E402
from benchmarks.results import record  # noqa: E402
from training.flag_calibration import calibrate_detector  # noqa: E402
from tsimcne_core.bundle_format import open_bundle  # noqa: E402
from tsimcne_core.calibration import CombinedCalibration  # noqa: E402
from tsimcne_core.flag_evidence import METHOD as DETECTOR_METHOD  # noqa: E402
from tsimcne_core.flag_evidence import Detector, FeatureSpace, channel_statistics  # noqa: E402
from tsimcne_core.images import resize_rgb  # noqa: E402
from tsimcne_core.neighbours import kth_neighbour_distance, unit_rows  # noqa: E402
from tsimcne_core.preprocess import to_model_input  # noqa: E402

PER_KIND = 200
SHIPPED = "shipped: features + pixels + position"


class Model:
    def __init__(self, bundle: Path) -> None:
        import onnxruntime as ort

        self.manifest = open_bundle(bundle)
        self.session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map coordinates, backbone features and the model input's channel statistics."""
        coords, features, statistics = [], [], []
        for start in range(0, len(images), 512):
            batch = to_model_input(list(images[start : start + 512]), self.manifest.preprocessing)
            c, f = self.session.run(["coords", "features"], {"images": batch})
            coords.append(c)
            features.append(f)
            statistics.append(channel_statistics(batch))
        return np.concatenate(coords), np.concatenate(features), np.concatenate(statistics)


def other_domain(count: int, size: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    from training.synthetic import make_synthetic_cells

    photos = load_sample_images().images
    crops = []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        side = int(rng.integers(40, 200))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crops.append(resize_rgb(np.ascontiguousarray(photo[y : y + side, x : x + side]), size))
    synthetic, _, _ = make_synthetic_cells(count, size, seed=int(rng.integers(1000)))
    noise = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    return {
        "uniform noise": noise,
        "natural photographs": np.stack(crops),
        "other microscopy (synthetic cells)": synthetic,
    }


class PixelStatistics:
    """Baseline: Mahalanobis distance of (per-channel mean, per-channel std) from the reference's."""

    def __init__(self, reference: np.ndarray) -> None:
        stats = self._stats(reference)
        self.mean = stats.mean(0)
        self.precision = np.linalg.pinv(np.cov(stats, rowvar=False))

    @staticmethod
    def _stats(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1, 3).astype(np.float64)
        return np.concatenate([flat.mean(1), flat.std(1)], axis=1)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        centred = self._stats(images) - self.mean
        return np.sqrt(np.einsum("ij,jk,ik->i", centred, self.precision, centred))


class RandomDirection:
    """Baseline that should be useless: |z-score| of the projection on one random pixel-space direction."""

    def __init__(self, reference: np.ndarray, seed: int = 0) -> None:
        self.direction = np.random.default_rng(seed).normal(size=reference[0].size)
        projected = self._project(reference)
        self.mean, self.std = projected.mean(), projected.std()

    def _project(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float64) @ self.direction

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.abs(self._project(images) - self.mean) / self.std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--held-out", type=Path, required=True)
    parser.add_argument("--target-rate", type=float, default=0.01)
    parser.add_argument("--k", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    model = Model(args.bundle)
    with np.load(args.train) as data:
        train = data["images"]
    with np.load(args.calibration) as data:
        calib = data["images"]
    with np.load(args.held_out) as data:
        clean = data["images"]
    size = train.shape[1:3]

    ref_coords, ref_features, ref_statistics = model.run(train)
    ref_unit = unit_rows(ref_features)
    shipped_calibration = model.manifest.calibration
    if not isinstance(shipped_calibration, CombinedCalibration):
        sys.exit(f"{args.bundle}: its calibration is not '{DETECTOR_METHOD}'; export it again with this version")
    with np.load(args.bundle / "reference.npz") as reference:
        space = FeatureSpace(reference["feature_mean"], reference["feature_components"])
        detector = Detector(shipped_calibration, reference["features"].astype(np.float32), space)
    # What export does without held-out images: 10 % of the training images left out of the reference.
    leave = rng.permutation(len(train))
    out_idx, keep_idx = leave[: len(train) // 10], leave[len(train) // 10 :]
    in_sample_detector = Detector(
        calibrate_detector(
            ref_features[out_idx], ref_statistics[out_idx], ref_coords[out_idx],
            ref_features[keep_idx], ref_statistics[keep_idx], ref_coords[keep_idx],
            source="in-sample", space=space, k=args.k, target_rate=args.target_rate,
        ),
        space.project(ref_features),
        space,
    )  # fmt: skip

    def scores_for(images: np.ndarray) -> dict[str, np.ndarray]:
        coords, features, statistics = model.run(images)
        unit = unit_rows(features)
        position_kth = kth_neighbour_distance(coords, ref_coords, args.k)
        return {
            SHIPPED: detector.evidence(detector.feature_distance(features), statistics, position_kth).score,
            f"features kNN (k={args.k})": kth_neighbour_distance(unit, ref_unit, args.k),
            "features 1-NN": kth_neighbour_distance(unit, ref_unit, 1),
            f"map position kNN (k={args.k})": position_kth,
            "pixel statistics": pixel_stats(images),
            "random direction": random_direction(images),
        }

    pixel_stats, random_direction = PixelStatistics(train), RandomDirection(train)
    calib_scores, clean_scores = scores_for(calib), scores_for(clean)
    methods = list(clean_scores)
    thresholds = {m: float(np.quantile(calib_scores[m], 1 - args.target_rate)) for m in methods}

    thresholds[SHIPPED] = 1.0  # the bundle's own calibration: flagged above 1
    clean_coords, clean_features, clean_statistics = model.run(clean)
    clean_position = kth_neighbour_distance(clean_coords, ref_coords, args.k)
    in_sample_scores = in_sample_detector.evidence(
        in_sample_detector.feature_distance(clean_features), clean_statistics, clean_position
    ).score
    in_sample = {SHIPPED: {"false_flag_rate": float((in_sample_scores > 1.0).mean())}}

    def pick(count: int) -> np.ndarray:
        return clean[rng.choice(len(clean), count, replace=False)]

    test_sets: dict[tuple[str, str], np.ndarray] = {}
    for group, kinds in (("strong", artefacts.STRONG), ("subtle", artefacts.SUBTLE), ("unseen", artefacts.UNSEEN)):
        for name, make in kinds.items():
            test_sets[(group, name)] = np.stack([make(image, rng) for image in pick(PER_KIND)])
    for name, images in other_domain(PER_KIND, size, rng).items():
        test_sets[("other", name)] = images

    rows = []
    for (group, name), images in test_sets.items():
        kind_scores = scores_for(images)
        row = {"group": group, "kind": name, "n": len(images)}
        for method in methods:
            labels = np.r_[np.zeros(len(clean)), np.ones(len(images))]
            values = np.r_[clean_scores[method], kind_scores[method]]
            row[method] = {
                "auroc": float(roc_auc_score(labels, values)),
                "caught": float((kind_scores[method] > thresholds[method]).mean()),
            }
        rows.append(row)

    # Near-duplicate bursts: requests of 10 re-acquisitions of one field vs requests of 10 different cells.
    def nearest_other_in_request(requests: list[np.ndarray]) -> np.ndarray:
        out = []
        for images in requests:
            unit = unit_rows(model.run(images)[1])
            distances = np.linalg.norm(unit[:, None] - unit[None], axis=2) + np.eye(len(unit)) * 1e9
            out.append(distances.min(1))
        return np.concatenate(out)

    bursts = [np.stack([artefacts.near_duplicate(source, rng) for _ in range(10)]) for source in pick(20)]
    mixed = [pick(10) for _ in range(20)]
    burst_score, mixed_score = -nearest_other_in_request(bursts), -nearest_other_in_request(mixed)
    duplicate_auroc = float(roc_auc_score(np.r_[np.zeros(len(mixed_score)), np.ones(len(burst_score))],
                                          np.r_[mixed_score, burst_score]))  # fmt: skip

    results = {
        "bundle": str(args.bundle),
        "reference_images": len(train),
        "held_out": {"calibration": len(calib), "clean_test": len(clean)},
        "bundle_calibration": shipped_calibration.model_dump(include={"source", "images", "k"}),
        "target_false_flag_rate": args.target_rate,
        "false_flag_rate_on_clean_test": {m: float((clean_scores[m] > thresholds[m]).mean()) for m in methods},
        "in_sample_calibration": in_sample,
        "kinds": rows,
        "near_duplicate_bursts_auroc": duplicate_auroc,
    }
    out = ROOT / "benchmarks" / "scratch" / "flagging.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record(results, out)
    print(f"false-flag rate on {len(clean)} clean held-out images (target {args.target_rate:.0%}):")
    for method in methods:
        print(f"  {method}: {results['false_flag_rate_on_clean_test'][method]:.2%}")
    print("shipped flag calibrated on training images instead (10 % left out):", json.dumps(in_sample))
    header = "| group | kind | " + " | ".join(methods) + " |"
    print("\nAUROC / caught at the calibrated threshold\n" + header)
    print("|---|---|" + "---|" * len(methods))
    for row in rows:
        cells = [f"{row[m]['auroc']:.3f} / {row[m]['caught']:.0%}" for m in methods]
        print(f"| {row['group']} | {row['kind']} | " + " | ".join(cells) + " |")
    print(f"\nnear-duplicate bursts (nearest other image of the request, features): AUROC {duplicate_auroc:.3f}")


if __name__ == "__main__":
    main()
