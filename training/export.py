"""`tsimcne export`: a checkpoint -> a self-contained, verified model bundle (format: tsimcne_core/bundle_format.py).

Steps: load the final checkpoint (a stage-1/2 one only with allow_partial, marked in bundle.json);
export the fp32 network to ONNX with a dynamic batch size; run onnxruntime and torch on up to
PARITY_IMAGES training images and refuse to write the bundle unless
max |onnxruntime - torch| <= PARITY_TOLERANCE * max(1, max |torch|); embed the reference images with
torch; calibrate the flag and build the feature index; write the reference map, the
map picture and bundle.json with the sha256 of every file. Everything is written to a temporary folder
beside the target and renamed into place at the end, so a failed export leaves nothing behind.

The reference map is the training images' by default, or (`reference`) any other collection at the
run's image size: labs train on a subset and map the whole archive. Every pass over the images
(embedding, input statistics, thumbnails, parity) reads them in pieces with a progress bar
(training/chunks.py), so a memory-mapped store of any size costs a piece of pixels at a time. The
network runs once over the reference: its raw features go to a scratch file, the feature projection is
fitted on a sample of them, the projected features are written to the bundle's file a block at a time
and the neighbour index is built from that file, so only the map
coordinates, the input statistics (a few floats per image), the ids and the index are held whole:
at 10^6 images well under the decoded images' size (benchmarks/README.md section 12).
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import load_checkpoint
from training.chunks import FileRows, NpyRowWriter, iter_chunks, read_rows
from training.data import ImageDataset
from training.datasets import load_dataset
from training.embedding import embed_images, iter_embeddings
from training.flag_calibration import calibrate_detector_and_index
from training.index_building import write_serving_arrays
from training.plot import plot_map
from training.runs import dataset_for_state, final_checkpoint_path, model_from_state
from tsimcne_core.bundle_format import (
    FEATURES_FILE,
    MANIFEST,
    MAP_FILE,
    MODEL_FILE,
    PIXEL_DIVISOR,
    REFERENCE_FILE,
    SCHEMA_VERSION,
    BundleManifest,
    Preprocessing,
    sha256_file,
)
from tsimcne_core.calibration import CombinedCalibration
from tsimcne_core.errors import UserError
from tsimcne_core.feature_index import feature_index
from tsimcne_core.files import staging_folder
from tsimcne_core.flag_evidence import FeatureSpace, channel_statistics
from tsimcne_core.images import resize_rgb
from tsimcne_core.neighbours import NeighbourIndex
from tsimcne_core.preprocess import to_model_input
from tsimcne_core.versions import package_version

PARITY_IMAGES = 256
PARITY_TOLERANCE = 1e-4
THUMBNAIL_SIDE = 32
MAX_BATCH = 4096
FEATURE_SPACE_SAMPLE = 20_000  # images whose raw features fit the projection (flag_evidence.FeatureSpace)
RAW_FEATURES_FILE = ".raw_features.npy"  # the network's features before projection, while exporting


@dataclass
class ExportResult:
    out: Path
    manifest: BundleManifest


def _export_onnx(model: torch.nn.Module, size: tuple[int, int], path: Path) -> None:
    example = torch.rand(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    torch.onnx.export(
        model.eval(),  # forward(x) -> (coords, features); eval mode uses BatchNorm's running statistics
        (example,),
        str(path),
        input_names=["images"],
        output_names=["coords", "features"],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
        verbose=False,
    )
    _drop_source_paths(path)


def _drop_source_paths(path: Path) -> None:
    """torch.onnx records, on every node, the Python stack that made it: absolute paths of the exporting
    machine's checkout. They say nothing to onnxruntime, leak where the exporter worked, and make the same
    network export to different bytes from two checkouts; the bundle drops them (the rest of each node's
    metadata, its module names, stays)."""
    import onnx

    graph = onnx.load(str(path))
    for node in graph.graph.node:
        kept = [entry for entry in node.metadata_props if entry.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(graph, str(path))


def _parity(model_path: Path, images: np.ndarray, torch_coords: np.ndarray, prep: Preprocessing) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    count = min(PARITY_IMAGES, len(images))
    onnx_coords = session.run(["coords"], {"images": to_model_input(read_rows(images, 0, count), prep)})[0]
    reference = torch_coords[:count]
    max_diff = float(np.abs(onnx_coords - reference).max())
    allowed = PARITY_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    return {"images": count, "max_abs_diff": max_diff, "allowed": allowed, "passed": max_diff <= allowed}


def _thumbnail_size(images: np.ndarray) -> tuple[int, int]:
    height, width = images.shape[1:3]
    if max(height, width) <= THUMBNAIL_SIDE:
        return height, width
    scale = THUMBNAIL_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _thumbnails(images: np.ndarray, size: tuple[int, int]) -> Iterator[np.ndarray]:
    """The images at `size` (at most THUMBNAIL_SIDE px), a piece at a time: for a large collection
    they are as big as the images themselves at 32 px, too big to hold."""
    for _, block in iter_chunks(images, desc="thumbnails"):
        yield (
            block if tuple(block.shape[1:3]) == size else np.stack([resize_rgb(image, size, "area") for image in block])
        )


def _blocks_of(rows: FileRows, block: int = 65_536) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), block):
        yield rows[start : start + block]


def _append_member(archive_file: Path, name: str, dtype: np.dtype, shape: tuple[int, ...], pieces) -> None:
    """Append array `name` to an .npz, written from `pieces` (consecutive row blocks) as they come. The
    member is an ordinary .npy in the zip, so np.load reads it like any other."""
    import zipfile

    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    with (
        zipfile.ZipFile(archive_file, mode="a", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
        archive.open(f"{name}.npy", mode="w", force_zip64=True) as member,
    ):
        np.lib.format.write_array_header_1_0(member, header)
        for piece in pieces:
            member.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())


def _statistics(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """tsimcne_core/flag_evidence.py channel_statistics of the model input of uint8 images, computed a piece at a
    time into one float32 array (27 values an image: 108 MB at 10^6 images; they only feed the pixel
    model's mean and covariance, which are fitted in float64)."""
    statistics = None
    for start, block in iter_chunks(images, desc="statistics"):
        values = channel_statistics(to_model_input(list(block), prep))
        if statistics is None:
            statistics = np.empty((len(images), values.shape[1]), dtype=np.float32)
        statistics[start : start + len(values)] = values
    return statistics


def _calibrate_flag(
    model: torch.nn.Module,
    dataset,
    coords: np.ndarray,
    raw: FileRows,
    projected: FileRows,
    space: FeatureSpace,
    prep: Preprocessing,
    calibration_data: str | Path | None,
    target_rate: float,
    what: str = "training",
) -> tuple[CombinedCalibration, NeighbourIndex]:
    """The flag's calibration, and the feature index over ALL the bundle's reference images as bundle.json's
    record describes it (the one calibrated with when calibration images are held out; built again over
    the whole reference when 10 % of it was left out to calibrate). `raw` / `projected`: the reference's
    raw and projected features, read from their files as they are needed."""
    statistics = _statistics(dataset.images, prep)
    if calibration_data is not None:
        held = load_dataset(calibration_data, size=dataset.size, resize_method=prep.resize_method)
        if len(held) < 100:
            raise UserError(f"--calibration-data {calibration_data}: {len(held)} images; need at least 100")
        held_coords, held_features = embed_images(model, held.images, torch.device("cpu"))
        return calibrate_detector_and_index(
            held_features, _statistics(held.images, prep), held_coords, projected, statistics, coords,
            source=f"held-out images never trained on: {held.source} ({len(held)})", space=space,
            target_rate=target_rate,
        )  # fmt: skip
    order = np.random.default_rng(0).permutation(len(coords))
    out, rest = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10) :]
    calibration, _ = calibrate_detector_and_index(
        raw[out], statistics[out], coords[out], projected.subset(rest), statistics[rest], coords[rest],
        source=f"{what} images, 10 % left out of the reference ({len(out)}; in-sample: the network saw them)",
        space=space, target_rate=target_rate,
    )  # fmt: skip
    return calibration, feature_index(projected, calibration.features.index)


def _embed_reference(model: torch.nn.Module, images: np.ndarray, raw_file: Path) -> tuple[np.ndarray, FileRows]:
    """The one network pass over the reference images: their map coordinates (returned, N x 2, filled in
    place: training/embedding.py says why) and their raw backbone features, written a batch at a time to
    `raw_file` and returned as rows read on demand: at 10^6 images they are 0.5-2 GB, not held."""
    coords = None
    with NpyRowWriter(raw_file, (len(images), model.backbone.feature_dim), np.float32) as writer:
        for start, block_coords, block_features in iter_embeddings(model, images, torch.device("cpu")):
            if coords is None:
                coords = np.empty((len(images), block_coords.shape[1]), dtype=np.float32)
            coords[start : start + len(block_coords)] = block_coords
            writer.write(block_features)
    return coords, FileRows(np.load(raw_file, mmap_mode="r"))


def _feature_space(raw: FileRows) -> FeatureSpace:
    """The projection of the backbone features (tsimcne_core/flag_evidence.py FeatureSpace), fitted on a seeded
    sample of FEATURE_SPACE_SAMPLE images' raw features."""
    rows = np.random.default_rng(0).permutation(len(raw))[:FEATURE_SPACE_SAMPLE]
    return FeatureSpace.fit(raw[rows], sample=FEATURE_SPACE_SAMPLE)


def _write_projected(raw: FileRows, space: FeatureSpace, features_file: Path, block: int = 65_536) -> FileRows:
    """The reference's projected features, written a block at a time to `features_file` (.npy, float32,
    C order: what serving memory-maps) and returned as rows read on demand."""
    with NpyRowWriter(features_file, (len(raw), space.components.shape[0]), np.float32) as writer:
        for piece in _blocks_of(raw, block):
            writer.write(space.project(piece))
    return FileRows(np.load(features_file, mmap_mode="r"))


def export_bundle(
    run_dir: Path,
    out: Path,
    allow_partial: bool = False,
    center_crop: tuple[int, int] | None = None,
    artefact_labels: list[str] | None = None,
    calibration_data: str | Path | None = None,
    target_rate: float = 0.01,
    reference: str | Path | None = None,
) -> ExportResult:
    """center_crop: how new raw images must be cropped to look like the training data (if it was cropped).
    artefact_labels: class names that mean "artefact"; images landing among them are flagged so.
    calibration_data: images of the same collection the network never saw, for the flag's calibration
    (tsimcne_core/flag_evidence.py); without it 10 % of the reference images are left out of the reference.
    reference: the collection to map as the bundle's reference (any data spec or store at the run's
    image size; default: the training images)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or remove it first")
    checkpoint, state = _exportable_checkpoint(Path(run_dir), allow_partial)
    model = model_from_state(state).float().eval()
    dataset = dataset_for_state(state) if reference is None else reference_dataset(state, reference)
    _check_artefact_labels(artefact_labels or [], dataset.class_names)
    prep = Preprocessing(
        height=dataset.size[0],
        width=dataset.size[1],
        resize_method=state["config"]["resize_method"],
        center_crop=center_crop,
        divide_by=PIXEL_DIVISOR,
    )
    what = "training" if reference is None else "reference"
    staging = staging_folder(out)
    try:
        raw_file = staging / RAW_FEATURES_FILE  # scratch: removed before the bundle is complete
        coords, raw = _embed_reference(model, dataset.images, raw_file)
        space = _feature_space(raw)
        projected = _write_projected(raw, space, staging / FEATURES_FILE)
        calibration, index = _calibrate_flag(
            model, dataset, coords, raw, projected, space, prep, calibration_data, target_rate, what
        )
        del raw
        raw_file.unlink()
        serving_arrays = write_serving_arrays(coords, index, staging)
        del index  # its copy of the vectors is saved; the rest of the export streams from the files
        # The ONNX export after the index is gone: torch.onnx keeps ~250 MB it does not give back.
        parity = _write_model(model, dataset, prep, staging)
        _write_reference(dataset, coords, projected, space, staging)
        plot_map(
            coords[:, :2],
            dataset.labels,
            list(dataset.class_names),
            staging / MAP_FILE,
            title=f"{out.name} reference map",
        )
        manifest = BundleManifest(
            schema_version=SCHEMA_VERSION,
            name=out.name,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            preprocessing=prep,
            output_names=["coords", "features"],
            out_dim=int(coords.shape[1]),
            feature_dim=int(space.mean.shape[0]),
            class_names=list(dataset.class_names),
            partial=int(state["finished_stage"]) < 3,
            finished_stage=int(state["finished_stage"]),
            training=_provenance(checkpoint, state, dataset, reference is not None),
            evaluation=_evaluation(Path(run_dir)),
            parity={**parity, "rule": f"max abs diff <= {PARITY_TOLERANCE} * max(1, max |torch coords|)"},
            calibration=calibration,
            artefact_labels=list(artefact_labels or []),
            versions=_versions(),
            files={
                name: sha256_file(staging / name) for name in (MODEL_FILE, REFERENCE_FILE, MAP_FILE, *serving_arrays)
            },
        )
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, manifest)


def _exportable_checkpoint(run_dir: Path, allow_partial: bool) -> tuple[Path, dict]:
    """The run's final checkpoint; an unfinished run only with allow_partial."""
    checkpoint = final_checkpoint_path(run_dir)
    state = load_checkpoint(checkpoint)
    finished = int(state["finished_stage"])
    if finished < 3 and not allow_partial:
        raise UserError(
            f"{checkpoint}: training finished only stage {finished} of 3; finish it with "
            f"`tsimcne train --resume {run_dir}` or export anyway with --allow-partial"
        )
    return checkpoint, state


def _check_artefact_labels(artefact_labels: list[str], class_names: list[str]) -> None:
    unknown = sorted(set(artefact_labels) - set(class_names))
    if unknown:
        raise UserError(
            f"--artefact-label {', '.join(unknown)}: not a class of this run (classes: {', '.join(class_names)})"
        )


def _write_model(model: torch.nn.Module, dataset, prep: Preprocessing, staging: Path) -> dict:
    """model.onnx, refused unless onnxruntime reproduces torch on the first training images; the parity figures."""
    _export_onnx(model, dataset.size, staging / MODEL_FILE)
    first = read_rows(dataset.images, 0, PARITY_IMAGES)
    torch_coords, _ = embed_images(model, first, torch.device("cpu"), progress=False)
    parity = _parity(staging / MODEL_FILE, first, torch_coords, prep)
    if not parity["passed"]:
        raise UserError(
            f"ONNX parity check failed: max |onnxruntime - torch| = {parity['max_abs_diff']:.3g} > "
            f"{parity['allowed']:.3g} on {parity['images']} training images; bundle not written"
        )
    return parity


def _write_reference(dataset, coords: np.ndarray, projected: FileRows, space: FeatureSpace, staging: Path) -> None:
    """reference.npz: the reference images' map, ids, labels, projected features and thumbnails (the last
    two streamed into the archive a piece at a time)."""
    reference = {
        "coords": coords.astype(np.float32),
        "ids": np.array(dataset.ids, dtype=str),
        "class_names": np.array(dataset.class_names, dtype=str),
    }
    if dataset.labels is not None:
        reference["labels"] = dataset.labels
    reference["feature_mean"], reference["feature_components"] = space.mean, space.components
    with open(staging / REFERENCE_FILE, "wb") as handle:
        np.savez_compressed(handle, **reference)
    # features: space.project(backbone features), tsimcne_core/flag_evidence.py FeatureSpace
    _append_member(staging / REFERENCE_FILE, "features", projected.dtype, projected.shape, _blocks_of(projected))
    size = _thumbnail_size(dataset.images)
    _append_member(staging / REFERENCE_FILE, "thumbnails", np.dtype(np.uint8), (len(dataset.images), *size, 3),
                   _thumbnails(dataset.images, size))  # fmt: skip


def _provenance(checkpoint: Path, state: dict, dataset: ImageDataset, other_reference: bool) -> dict:
    """What trained the network; with another reference collection, also what the map shows."""
    provenance = {
        "config": state["config"],
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": sha256_file(checkpoint),
        "dataset_fingerprint": state["dataset"]["fingerprint"],
        "n_images": int(state["dataset"]["n_images"]) if other_reference else len(dataset),
    }
    if other_reference:
        provenance["reference"] = {
            "source": dataset.source,
            "n_images": len(dataset),
            "fingerprint": dataset.fingerprint(),
        }
    return provenance


def reference_dataset(state: dict, reference: str | Path) -> ImageDataset:
    """The collection to map instead of the training images: a folder, CSV or .npz is resized to the
    run's image size as training did; a store must already be at that size (and resize method)."""
    from training.config import TrainConfig
    from training.image_store import is_store

    config = TrainConfig(**state["config"])
    size = tuple(state["dataset"]["image_size"])
    path = Path(str(reference)).expanduser()
    if is_store(path):
        dataset = load_dataset(path)
        if dataset.size != size:
            raise UserError(
                f"--reference {reference}: the store holds {dataset.size[0]}x{dataset.size[1]} images but the run "
                f"was trained on {size[0]}x{size[1]}; prepare the collection at the run's size with "
                f"`tsimcne prepare SOURCE --image-size {size[0]}x{size[1]} --out STORE`"
            )
        if dataset.resize_method != config.resize_method:
            raise UserError(
                f"--reference {reference}: the store was resized with {dataset.resize_method}, the run with "
                f"{config.resize_method} (which serving repeats); prepare it with "
                f"--resize-method {config.resize_method}"
            )
        return dataset
    return load_dataset(
        reference, size, config.resize_method, skip_bad=config.skip_bad, allow_upscale=config.allow_upscale
    )


def _evaluation(run_dir: Path) -> dict | None:
    metrics_file = run_dir / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else None


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnx": package_version("onnx"),
        "onnxruntime": package_version("onnxruntime"),
        "tsimcne-map": package_version("tsimcne-map"),
    }
