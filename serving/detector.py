"""The shipped out-of-distribution flag: evidence from the network's features, from the pixels and from
the map position, calibrated together to one false-flag rate.

Why not the 2-D position alone (measured in benchmarks/flagging): t-SimCNE is trained to give the same
output for augmented views of a cell, and the augmentations include colour jitter, grayscale, crops and
(microscopy preset) rotations. The map is therefore deliberately blind to exposure and stain changes
and hardly moves for borders or debris; on a PBC map the position alone separates such images from
clean cells barely better than chance. It does move for blur. Three measurements, each scaled by its
own (1 - target) quantile on calibration images:

- features: the distance from the image's backbone features (unit length, on their first 128 principal
  components) to its k-th nearest reference image (the network's view before the 2-D head);
- pixels: the Mahalanobis distance of per-channel image statistics of the model input (mean, spread,
  percentiles, centre and border means) from those of the reference images: exposure, stain, borders,
  bubbles, debris, cells cut by the crop, which the network was taught to ignore;
- position: the distance to the k-th nearest reference point on the map (what a person sees).

The score is the largest of the three, divided by that maximum's value on the calibration image of the
conformal rank (serving/conformal.py), so a score above 1 is flagged and new clean images are flagged at
`target_rate` in expectation; the bundle records the interval the true rate lies in, which depends on the
number of calibration images (0.39-1.82 % for 1 % with 500). Calibration images are ideally held-out
images the network never saw (`tsimcne export --calibration-data`); without them 10 % of the training
images are left out of the reference instead (in-sample: the network has seen them; the bundle records
which was used). Near-duplicates within one
request are those closer in features than all but `target_rate` of distinct clean images. numpy, scipy's
k-d tree for the map positions, and faiss-cpu for the feature index where it is installed
(`plan_feature_index`; export saves it in the bundle and serving memory-maps it, `open_feature_index`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from serving.bundle import BundleError
from serving.calibration import (
    DEFAULT_K,
    CombinedCalibration,
    FeatureIndex,
    FeatureScale,
    PixelCalibration,
    PositionScale,
)
from serving.conformal import threshold_at_rank
from serving.neighbours import (
    FaissIndex,
    NeighbourIndex,
    as_rows,
    build_faiss_index,
    build_index,
    build_map_index,
    faiss_available,
    faiss_gpus,
    nearest_other,
    recall_against,
    recall_at_k,
    true_neighbours,
    unit_rows,
)
from serving.neighbours import (
    exact_limit as exact_limit_for,
)

METHOD = "features+pixels"
RECALL_TARGET = 0.99  # recall@k against exact search that an approximate feature index must reach
logger = logging.getLogger("tsimcne")


def channel_statistics(batch: np.ndarray) -> np.ndarray:
    """(N, 27) per-channel image statistics of model inputs (N, 3, H, W): mean and spread (exposure,
    stain, contrast), 1st and 99th percentile (dark debris, glare), and the means of the central half
    and of the four border strips (a cell cut by the crop or off-centre, black borders)."""
    n, c, h, w = batch.shape
    low, high = percentiles(batch.reshape(n, c, -1), (1, 99))
    flat = batch.reshape(n, c, -1).astype(np.float64)
    bh, bw = max(1, h // 6), max(1, w // 6)
    regions = [
        batch[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4],
        batch[:, :, :bh, :],
        batch[:, :, h - bh :, :],
        batch[:, :, :, :bw],
        batch[:, :, :, w - bw :],
    ]
    region_means = [region.reshape(n, c, -1).astype(np.float64).mean(2) for region in regions]
    return np.concatenate([flat.mean(2), flat.std(2), low, high, *region_means], axis=1)


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, qs, axis=-1) with its default linear interpolation, the same arithmetic in float64,
    from one sort of the last axis in the values' own type (a cast to float64 keeps their order): for the rows of
    a few hundred pixel values the flag takes per image, 10x faster than np.percentile or np.partition."""
    size = values.shape[-1]
    ordered = np.sort(values, axis=-1)
    out = []
    for q in qs:
        position = (size - 1) * q / 100.0
        low = int(np.floor(position))
        high = min(low + 1, size - 1)
        a, b = ordered[..., low].astype(np.float64), ordered[..., high].astype(np.float64)
        t, difference = position - low, b - a
        out.append(b - difference * (1 - t) if t >= 0.5 else a + difference * t)  # numpy's _lerp
    return np.stack(out)


@dataclass
class PixelModel:
    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, statistics: np.ndarray) -> PixelModel:
        covariance = np.cov(statistics, rowvar=False) + 1e-9 * np.eye(statistics.shape[1])
        return cls(statistics.mean(0, dtype=np.float64), np.linalg.pinv(covariance))  # float64 from float32 too

    def distance(self, statistics: np.ndarray) -> np.ndarray:
        centred = statistics - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def calibration(self, scale: float) -> PixelCalibration:
        return PixelCalibration(scale=scale, mean=self.mean.tolist(), precision=self.precision.tolist())

    @classmethod
    def from_calibration(cls, values: PixelCalibration) -> PixelModel:
        return cls(np.asarray(values.mean, dtype=np.float64), np.asarray(values.precision, dtype=np.float64))


@dataclass
class FeatureSpace:
    """Unit-length backbone features projected on their first principal components (128 by default).

    Distances between projected vectors follow the unit features' distances closely, and the nearest-
    neighbour search costs 4x less for 512-D features: the flag's largest cost under load."""

    mean: np.ndarray  # (F,) float32
    components: np.ndarray  # (d, F) float32

    @classmethod
    def fit(cls, features: np.ndarray, dims: int = 128, sample: int = 20_000, seed: int = 0) -> FeatureSpace:
        unit = unit_rows(features)
        rows = unit[np.random.default_rng(seed).permutation(len(unit))[:sample]]
        mean = rows.mean(0)
        _, _, components = np.linalg.svd(rows - mean, full_matrices=False)
        return cls(mean.astype(np.float32), components[: min(dims, components.shape[0])].astype(np.float32))

    def project(self, features: np.ndarray) -> np.ndarray:
        return ((unit_rows(features) - self.mean) @ self.components.T).astype(np.float32)


def feature_index(reference_projected: np.ndarray, record: FeatureIndex | None) -> NeighbourIndex:
    """The index over the reference features that `record` (bundle.json) describes, built as export built it
    (bundles without an index file: exported before it was saved, or served by rebuilding).

    float32; exact numpy search in blocks of queries within a byte budget: the reference (17,000 x 128
    for PBC) is read once per block instead of once per image, which is what makes the flag cheap under
    load. A FAISS index in a bundle opened where faiss-cpu is missing is searched exactly instead (the
    same neighbours, or better than IVF's), with a warning."""
    vectors = as_rows(reference_projected)
    if record is None or record.kind == "exact":
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32)
    if not faiss_available():
        logger.warning("the bundle's %s feature index needs faiss-cpu (not installed): searching exactly", record.kind)
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32)
    if record.kind == "faiss-flat":
        return build_faiss_index(np.asarray(vectors, dtype=np.float32), "flat")
    return build_faiss_index(vectors, "ivf", nlist=record.nlist, nprobe=record.nprobe or 1, refine=record.refine or 4)


def load_feature_index(index_file: Path, record: FeatureIndex, reference_size: int, dims: int) -> FaissIndex:
    """The FAISS index export saved in the bundle, memory-mapped, checked against its record in bundle.json
    and the reference features (BundleError naming the file otherwise); nprobe as the record says."""
    try:
        index = FaissIndex.load(index_file, mmap=True)
    except (RuntimeError, ValueError) as exc:
        raise BundleError(f"{index_file}: not a readable FAISS index ({str(exc).splitlines()[0]})") from exc
    expected = {"faiss-flat": "flat", "faiss-ivf": "ivf"}.get(record.kind)
    if index.kind != expected:
        raise BundleError(f"{index_file}: a {index.kind} index, but bundle.json's feature index is {record.kind}")
    if len(index) != reference_size or index.dims != dims:
        raise BundleError(
            f"{index_file}: holds {len(index)} vectors of {index.dims} dimensions; the reference features are "
            f"{reference_size} x {dims}"
        )
    if index.kind == "ivf":
        if record.nlist is not None and index.nlist != record.nlist:
            raise BundleError(f"{index_file}: {index.nlist} IVF cells, bundle.json says {record.nlist}")
        index.nprobe = record.nprobe or 1
    return index


def open_feature_index(
    reference_projected: np.ndarray, record: FeatureIndex | None, index_file: Path | None = None, gpu: bool = False
) -> tuple[NeighbourIndex, dict[str, str]]:
    """The feature index a serving worker searches, and how it got it (logged, and shown in GET /info).

    A flat (exact) index on the CPU: numpy's exact search over the bundle's memory-mapped features (the same
    neighbours as FAISS's flat index, faster on the batches a service runs). An IVF index: the bundle's index
    file when there is one (memory-mapped: the workers share one copy), else rebuilt from bundle.json's
    record (`feature_index`). gpu=True (the model runs on CUDA): a FAISS index is
    moved to the GPU when this faiss has GPU support and sees a device; where that fails it stays on the
    CPU, and the reason is recorded."""
    mapped = isinstance(reference_projected, np.memmap)
    vectors = np.asarray(reference_projected)
    kind = record.kind if record is not None else "exact"
    if kind == "faiss-flat" and not gpu:
        # Exact search either way: numpy's matrix product over the memory-mapped features answers a batch of
        # queries 1.5-3.5x faster than FAISS's flat index on one thread, the neighbours the same.
        index: NeighbourIndex = build_index(vectors, dtype=np.float32)
        source = f"the bundle's features{', memory-mapped' if mapped else ''} (exact numpy search)"
    elif index_file is not None and record is not None and kind != "exact" and faiss_available():
        index = load_feature_index(index_file, record, len(vectors), vectors.shape[1])
        source = "bundle file, memory-mapped" if index.memory_mapped else "bundle file, read into memory"
    else:
        index = feature_index(vectors, record)
        source = "rebuilt from bundle.json" if isinstance(index, FaissIndex) else "exact numpy search"
    info = {"kind": kind, "source": source, "device": "cpu", "device_reason": "the model runs on the CPU"}
    if isinstance(index, FaissIndex) and gpu:
        info["device_reason"] = _move_to_gpu(index)
        info["device"] = index.device
    elif gpu:
        info["device_reason"] = "numpy exact search runs on the CPU"
    logger.info(
        "feature index: %s (%d vectors), %s, on the %s (%s)",
        kind, len(index), source, info["device"].upper(), info["device_reason"],
    )  # fmt: skip
    return index, info


def _move_to_gpu(index: FaissIndex) -> str:
    """Move `index` to the first CUDA device if faiss can; the reason for where it ended up."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return "this faiss has no GPU support (faiss-cpu; the GPU image installs faiss-gpu-cu12)"
    if faiss_gpus() == 0:
        return "faiss sees no CUDA device"
    try:
        index.to_gpu(0)
    except Exception as exc:  # a device the wheel was not built for, out of memory, nprobe above the limit
        logger.warning("the feature index stays on the CPU: moving it to the GPU failed: %s", exc)
        return f"moving it to the GPU failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return "faiss GPU index on CUDA device 0"


def plan_feature_index(
    reference_projected: np.ndarray,
    queries: np.ndarray,
    k: int,
    exact_limit: int | None = None,
    target_recall: float = RECALL_TARGET,
    sample: int = 1000,
) -> tuple[NeighbourIndex, FeatureIndex]:
    """The feature index export calibrates with and serving will rebuild, and its record for bundle.json.

    With faiss-cpu: exact (flat) up to `exact_limit` reference vectors (default: as many as fit in
    serving/neighbours.py EXACT_LIMIT_BYTES), else IVF, whose nprobe is doubled
    from 8 until its recall@k against exact search on (up to `sample` of) `queries` reaches `target_recall`
    (or every cell is searched). Without faiss-cpu: exact numpy search."""
    vectors = as_rows(reference_projected)
    n, dims = vectors.shape
    k = int(min(k, n))
    picked = np.random.default_rng(0).permutation(len(queries))[:sample]
    probe = np.asarray(queries, dtype=np.float32)[np.sort(picked)]
    fields = {"reference_size": n, "recall_k": k, "recall_queries": len(probe)}
    if not faiss_available():
        return build_index(np.asarray(vectors, dtype=np.float32), dtype=np.float32), FeatureIndex(
            kind="exact", recall=1.0, **fields
        )
    if exact_limit is None:
        exact_limit = exact_limit_for(dims)
    if n <= exact_limit:
        vectors = np.asarray(vectors, dtype=np.float32)
        index = build_faiss_index(vectors, "flat")
        exact = build_index(vectors, dtype=np.float32)
        return index, FeatureIndex(kind="faiss-flat", recall=recall_at_k(index, exact, probe, k), **fields)
    index = build_faiss_index(vectors, "ivf", nprobe=8)
    # The truth from the exact float32 vectors the IVF index keeps for re-ranking: no second copy of 10^6 x D.
    truth = true_neighbours(index.exact(), probe, k)  # once: the exact search is the costly part of each try
    with tqdm(desc="tuning nprobe", unit="try", leave=False, disable=None) as bar:
        while True:
            recall = recall_against(index, truth, probe, k)
            bar.set_postfix(nprobe=index.nprobe, recall=f"{recall:.4f}")
            bar.update()
            if recall >= target_recall or index.nprobe >= index.nlist:
                break
            index.nprobe = index.nprobe * 2
    logger.info("IVF feature index: %d cells, nprobe %d, recall@%d %.4f", index.nlist, index.nprobe, k, recall)
    record = FeatureIndex(
        kind="faiss-ivf", nlist=index.nlist, nprobe=index.nprobe, refine=index.refine, recall=recall, **fields
    )
    return index, record


def _quantile(values: np.ndarray, target_rate: float) -> float:
    return max(float(np.quantile(values, 1 - target_rate)), 1e-12)


def calibrate_detector_and_index(
    calibration_features: np.ndarray,
    calibration_statistics: np.ndarray,
    calibration_coords: np.ndarray,
    reference_projected: np.ndarray,
    reference_statistics: np.ndarray,
    reference_coords: np.ndarray,
    source: str,
    space: FeatureSpace,
    k: int = DEFAULT_K,
    target_rate: float = 0.01,
    index_exact_limit: int | None = None,
) -> tuple[CombinedCalibration, NeighbourIndex]:
    """The calibration stored in bundle.json: every scale and threshold the service needs, and the
    feature index (with its recall) that the feature distances were measured with and are served with;
    and that index itself, which export can save instead of building it again.

    The calibration images' features are raw (projected here with `space`); the reference's are already
    projected (`space.project`), as an array or as rows read from a file on demand (export at 10^6)."""
    if not 0 < target_rate < 1:
        raise ValueError(f"target_rate must be between 0 and 1, got {target_rate}")
    pixels = PixelModel.fit(reference_statistics)
    calibration_projected = space.project(calibration_features)
    index, index_record = plan_feature_index(
        reference_projected, calibration_projected, k, exact_limit=index_exact_limit
    )
    feature_distance = _kth_with_progress(index, calibration_projected, k, "feature distances")
    pixel_distance = pixels.distance(calibration_statistics)
    position_distance = _kth_with_progress(
        build_map_index(reference_coords), np.asarray(calibration_coords), k, "map distances"
    )
    feature_scale, pixel_scale = _quantile(feature_distance, target_rate), _quantile(pixel_distance, target_rate)
    position_scale = _quantile(position_distance, target_rate)
    combined = np.maximum.reduce(
        [feature_distance / feature_scale, pixel_distance / pixel_scale, position_distance / position_scale]
    )
    # Near-duplicates: closer than all but `target_rate` of distinct clean images are to their nearest other.
    # (At most 2,000 calibration images for this: the pairwise matrix grows with the square.)
    sample = np.random.default_rng(0).permutation(len(calibration_features))[:2000]
    _, nearest_distance = nearest_other(space.project(calibration_features[sample]))
    # The joint threshold alone decides how many clean images are flagged: the conformal rank of the
    # calibration scores, so that the target is met in expectation, with the interval of the true rate.
    threshold, interval = threshold_at_rank(combined, target_rate)
    calibration = CombinedCalibration(
        duplicate_distance=float(np.quantile(nearest_distance, target_rate)),
        target_false_flag_rate=float(target_rate),
        source=source,
        images=len(calibration_features),
        k=int(min(k, len(reference_projected))),
        threshold=max(threshold, 1e-12),
        false_flag_rate=interval,
        features=FeatureScale(scale=feature_scale, index=index_record),
        pixels=pixels.calibration(pixel_scale),
        position=PositionScale(k=int(min(k, len(reference_coords))), threshold=position_scale),
    )
    return calibration, index


def calibrate_detector(
    calibration_features: np.ndarray,
    calibration_statistics: np.ndarray,
    calibration_coords: np.ndarray,
    reference_features: np.ndarray,
    reference_statistics: np.ndarray,
    reference_coords: np.ndarray,
    *,
    space: FeatureSpace,
    **kwargs: Any,
) -> CombinedCalibration:
    """calibrate_detector_and_index from raw reference features, without the index (the calibration
    stored in bundle.json)."""
    return calibrate_detector_and_index(
        calibration_features, calibration_statistics, calibration_coords, space.project(reference_features),
        reference_statistics, reference_coords, space=space, **kwargs,
    )[0]  # fmt: skip


def _kth_with_progress(index: NeighbourIndex, queries: np.ndarray, k: int, what: str, step: int = 4096) -> np.ndarray:
    """index.kth_distance over `queries`, `step` at a time with a progress bar (10^5 calibration images
    against 10^6 reference images take minutes)."""
    parts = [
        index.kth_distance(queries[start : start + step], k)
        for start in tqdm(range(0, len(queries), step), desc=f"calibration: {what}", leave=False, disable=None)
    ]
    return np.concatenate(parts) if parts else np.empty(0)


@dataclass
class Evidence:
    score: np.ndarray  # the flag's score: above 1 is out of distribution
    features: np.ndarray  # each component over its own calibrated threshold (above 1: beyond it alone)
    pixels: np.ndarray
    position: np.ndarray


class Detector:
    """Applies a bundle's calibration to new images."""

    def __init__(
        self,
        calibration: CombinedCalibration,
        reference_projected: np.ndarray,
        space: FeatureSpace,
        index_file: Path | None = None,
        gpu: bool = False,
    ) -> None:
        """reference_projected: the reference images' features already in `space` (as the bundle keeps them).
        index_file: the bundle's saved feature index, if it has one; gpu: the model runs on CUDA
        (`open_feature_index`)."""
        self.space = space
        self.calibration = calibration
        self.k = calibration.k
        self.index, self.index_info = open_feature_index(
            reference_projected, calibration.features.index, index_file, gpu
        )
        self.pixels = PixelModel.from_calibration(calibration.pixels)
        self.feature_scale = calibration.features.scale
        self.pixel_scale = calibration.pixels.scale
        self.threshold = calibration.threshold
        self.position_threshold = calibration.position.threshold

    def feature_distance(self, features: np.ndarray) -> np.ndarray:
        """Distance from each image's projected features to its k-th nearest reference image."""
        return self.index.kth_distance(self.space.project(features), self.k)

    def evidence(self, feature_distance: np.ndarray, statistics: np.ndarray, position_kth: np.ndarray) -> Evidence:
        """The score and its parts from the three raw measurements (see `feature_distance`)."""
        feature_z = feature_distance / self.feature_scale
        pixel_z = self.pixels.distance(statistics) / self.pixel_scale
        position_z = position_kth / self.position_threshold
        return Evidence(
            score=np.maximum.reduce([feature_z, pixel_z, position_z]) / self.threshold,
            features=feature_z,
            pixels=pixel_z,
            position=position_z,
        )

    def duplicates(self, features: np.ndarray) -> np.ndarray:
        """For each image, the index of another image of the same batch that looks the same (closer in
        features than nearly all distinct clean images are to each other), or -1."""
        limit = self.calibration.duplicate_distance
        if len(features) < 2 or limit is None:
            return np.full(len(features), -1)
        nearest, distance = nearest_other(self.space.project(features))
        return np.where(distance < limit, nearest, -1)
