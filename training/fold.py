"""`tsimcne journal fold`: grow a bundle's reference map with the journal's images reviewed as fine, without
retraining.

The network (model.onnx) and its feature projection stay as they are; the new bundle's reference holds the old
reference images and, after them, every folded image at the x, y the journal recorded, with its label (verdict
`fine`: the row's majority label; a verdict that is a class name: that class) and its projected features,
recomputed by running the bundle's own model on the journal's image at model size. A row is folded only when
it was placed with this very bundle (its bundle_sha256 is the sha256 of the bundle's bundle.json), it keeps its
image, and the model puts that image where the journal says (else the image or the bundle is not what the row
was made from). reference.npz records where each image came from (`provenance`: "training", or
"journal:<row id>", with the row's `image_sha256`), and bundle.json's `training.folds` each fold.

The flag is calibrated again for the grown reference exactly as `tsimcne export --calibration-data` does:
clean images of the collection that neither trained the network nor are in the reference, scored against the
grown reference. A bundle does not keep what export's in-sample calibration needs (the reference images'
pixels and raw features), so calibration images are required here; those that are images being folded (the
same pixels) or images of the old reference (the same place and features) are refused. The pixel model (mean
and covariance of the reference images' channel statistics) is the old one's moments pooled with the folded
images'.
Everything is written to a temporary folder beside the target and renamed into place at the end; the old
bundle is only read.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.flag_calibration import calibrate_detector_and_index
from training.index_building import write_serving_arrays
from training.plot import plot_map
from tsimcne_core.bundle_format import (
    FEATURES_FILE,
    MANIFEST,
    MAP_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    SCHEMA_VERSION,
    BundleManifest,
    open_bundle,
    sha256_file,
)
from tsimcne_core.calibration import CombinedCalibration
from tsimcne_core.errors import UserError
from tsimcne_core.files import staging_folder
from tsimcne_core.flag_evidence import FeatureSpace, PixelModel, channel_statistics
from tsimcne_core.images import resize_rgb
from tsimcne_core.journal import MAX_PAGE, PlacementFilter, SqlJournal, open_journal
from tsimcne_core.preprocess import stack_fitted
from tsimcne_core.session import ModelSession

TRAINING = "training"  # provenance of the images export put in the reference
NOT_FOLDED = ("unreviewed", "artefact")  # verdicts never folded, even where a class carries the name
PLACEMENT_TOLERANCE = 1e-4  # |recomputed - recorded| <= this x max(1, |recorded|): export's parity rule
FEATURE_TOLERANCE = 1e-3  # a calibration image's projected features this close to a reference image's: the same
MIN_CALIBRATION_IMAGES = 100  # as export: fewer cannot meet a 1 % target
BATCH = 256  # images per model run
REGULARISER = 1e-9  # what PixelModel.fit adds to the covariance's diagonal


@dataclass
class FoldedImages:
    """The rows folded into the reference, in journal order, and what was left out and why."""

    row_ids: list[int] = field(default_factory=list)
    coords: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    features: np.ndarray | None = None  # raw backbone features, (N, F)
    statistics: np.ndarray | None = None  # channel statistics of the model input (the pixel evidence), (N, S)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def skip(self, reason: str, rows: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + rows

    def __len__(self) -> int:
        return len(self.row_ids)


@dataclass
class FoldResult:
    out: Path
    manifest: BundleManifest
    folded: int
    reference_size: int
    skipped: dict[str, int]


def fold_bundle(
    journal_url: str,
    bundle: Path,
    out: Path,
    calibration_data: str | Path | None,
    target_rate: float | None = None,
) -> FoldResult:
    """Write a new bundle at `out`: `bundle` with the journal's images reviewed as fine folded into its reference
    and the flag calibrated again on `calibration_data` (see the module); `bundle` itself is only read.
    target_rate: the false-flag rate to calibrate to (default: the old bundle's)."""
    bundle, out = Path(bundle), Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or remove it first")
    manifest = _foldable_bundle(bundle)
    if calibration_data is None:
        raise UserError(
            "--calibration-data: give clean images of the collection that neither trained the network nor were "
            "folded (as for `tsimcne export --calibration-data`); the bundle does not keep what an in-sample "
            "calibration needs"
        )
    journal = _open_existing_journal(journal_url)
    model = ModelSession(bundle / MODEL_FILE, "cpu", input_name=manifest.input_name)
    folded = collect_rows(journal, manifest, sha256_file(bundle / MANIFEST), model)
    if not folded:
        raise UserError(
            f"journal {journal.describe()}: nothing to fold into {bundle}: {describe_skipped(folded.skipped)}"
        )
    held = _calibration_images(calibration_data, manifest, model, folded)
    old = OldReference.load(bundle)
    _refuse_reference_images(calibration_data, held, old, float(manifest.parity.get("allowed", 0.0)))
    rate = target_rate or manifest.calibration.target_false_flag_rate  # type: ignore[union-attr]
    record = _fold_record(journal, bundle, manifest, folded, out)
    staging = staging_folder(out)
    try:
        new_manifest = _write_bundle(bundle, old, manifest, folded, held, rate, record, staging)
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FoldResult(out, new_manifest, len(folded), record["reference_size"], folded.skipped)


def _foldable_bundle(bundle: Path) -> BundleManifest:
    """The verified manifest of a bundle whose flag has the feature evidence that folding grows."""
    if not (bundle / MANIFEST).is_file():
        raise UserError(f"--bundle {bundle}: no {MANIFEST} there; give a bundle folder made by `tsimcne export`")
    manifest = open_bundle(bundle)
    if not isinstance(manifest.calibration, CombinedCalibration):
        raise UserError(
            f"--bundle {bundle}: its flag is not the combined (features+pixels) one; export it again with a "
            "current `tsimcne export` before folding"
        )
    return manifest


def _open_existing_journal(url: str) -> SqlJournal:
    """The journal at `url`; an SQLite file that is not there is refused, not created empty."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UserError(f"journal {url}: no such file")
    return open_journal(url)


def _verdicts(manifest: BundleManifest) -> list[str]:
    """The review verdicts that fold a row: fine, and every class name (not artefact)."""
    return ["fine", *[name for name in manifest.class_names if name not in (*NOT_FOLDED, "fine")]]


def _reviewed_rows(journal: SqlJournal, verdict: str) -> Iterator[dict[str, Any]]:
    """Every row with this verdict, oldest first, a page at a time."""
    after = None
    while True:
        rows = journal.placements(PlacementFilter(review=verdict), after=after, limit=MAX_PAGE)
        yield from rows
        if len(rows) < MAX_PAGE:
            return
        after = rows[-1]["id"]


def collect_rows(
    journal: SqlJournal, manifest: BundleManifest, bundle_sha256: str, model: ModelSession
) -> FoldedImages:
    """The journal's rows to fold into this bundle (see the module), with their images' raw features."""
    folded = FoldedImages()
    seen: set[str] = set()
    rows = sorted(
        (row for verdict in _verdicts(manifest) for row in _reviewed_rows(journal, verdict)), key=lambda r: r["id"]
    )
    pending: list[dict[str, Any]] = []
    for row in rows:
        if row["bundle_sha256"] != bundle_sha256:
            folded.skip("placed with another bundle")
        elif row["image_sha256"] in seen:
            folded.skip("the same image folded already")
        else:
            seen.add(row["image_sha256"])
            pending.append(row)
        if len(pending) == BATCH:
            _add_batch(folded, pending, journal, manifest, model)
            pending = []
    _add_batch(folded, pending, journal, manifest, model)
    return folded


def _add_batch(
    folded: FoldedImages, rows: list[dict[str, Any]], journal: SqlJournal, manifest: BundleManifest, model: ModelSession
) -> None:
    """Run the model on these rows' images; keep those it places where the journal recorded them."""
    prep = manifest.preprocessing
    kept, images = [], []
    for row in rows:
        image = journal.image(row["id"])
        if image is None or image.shape != (prep.height, prep.width, 3):
            folded.skip("no image at the model's size in the journal")
            continue
        kept.append(row)
        images.append(image)
    if not kept:
        return
    batch = stack_fitted(images, prep)
    coords, features = model.run(["coords", "features"], batch)
    recorded = np.array([[row["x"], row["y"]] for row in kept], dtype=np.float64)
    allowed = PLACEMENT_TOLERANCE * np.maximum(1.0, np.abs(recorded))
    same = (np.abs(coords[:, :2].astype(np.float64) - recorded) <= allowed).all(axis=1)
    folded.skip("placed elsewhere by this bundle's model than the journal recorded", int((~same).sum()))
    names = manifest.class_names
    for row, image, keep in zip(kept, images, same.tolist(), strict=True):
        if keep:
            label = row["majority_label"] if row["review"] == "fine" else row["review"]
            folded.row_ids.append(int(row["id"]))
            folded.coords.append((float(row["x"]), float(row["y"])))
            folded.labels.append(names.index(label) if label in names else -1)
            folded.ids.append(f"journal:{row['id']}:{row['filename']}")
            folded.image_sha256.append(str(row["image_sha256"]))
            folded.images.append(image)
    chosen, statistics = features[same], channel_statistics(batch[same])
    folded.features = chosen if folded.features is None else np.concatenate([folded.features, chosen])
    folded.statistics = statistics if folded.statistics is None else np.concatenate([folded.statistics, statistics])


@dataclass
class HeldOut:
    """The calibration images, run through the model."""

    source: str
    coords: np.ndarray
    features: np.ndarray
    statistics: np.ndarray


def _calibration_images(
    spec: str | Path, manifest: BundleManifest, model: ModelSession, folded: FoldedImages
) -> HeldOut:
    """Clean held-out images at the bundle's size, read as export reads --calibration-data; refused when some
    are images being folded (the same pixels at the model's size): each sits on a reference point of the grown
    map, is never flagged, and would make the flag look stricter than it is."""
    from training.datasets import load_dataset

    prep = manifest.preprocessing
    held = load_dataset(spec, size=(prep.height, prep.width), resize_method=prep.resize_method)
    if len(held) < MIN_CALIBRATION_IMAGES:
        raise UserError(f"--calibration-data {spec}: {len(held)} images; need at least {MIN_CALIBRATION_IMAGES}")
    folding = {_pixel_digest(image) for image in folded.images}
    shared = sum(_pixel_digest(image) in folding for image in held.images)
    if shared:
        raise UserError(
            f"--calibration-data {spec}: {shared} of its {len(held)} images are among the {len(folded)} images "
            "being folded (the same pixels at the model's size); calibrate on clean images that are neither folded "
            "nor trained on"
        )
    return HeldOut(f"{held.source} ({len(held)})", *_run_model(held.images, manifest, model))


def _refuse_reference_images(spec: str | Path, held: HeldOut, old: OldReference, parity: float = 0.0) -> None:
    """Refuse calibration images that are images of the map's reference (trained on, or folded before): the
    bundle keeps no training pixels, but such an image lands on its own reference point with that point's
    features (within export's parity tolerance), so it is found by its place and confirmed by its features.
    Like an image being folded, each would never be flagged and make the flag look stricter than it is.
    `parity`: export's allowed |onnxruntime - torch| (bundle.json parity.allowed), twice of which widens the
    search, as the reference may have been placed by torch."""
    reference = old.arrays["coords"][:, :2].astype(np.float64)
    order = np.argsort(reference[:, 0], kind="stable")
    xs = reference[order, 0]
    placed = held.coords[:, :2].astype(np.float64)
    allowed = np.maximum(PLACEMENT_TOLERANCE * np.maximum(1.0, np.abs(placed)), 2 * parity)
    first = np.searchsorted(xs, placed[:, 0] - allowed[:, 0], side="left")
    last = np.searchsorted(xs, placed[:, 0] + allowed[:, 0], side="right")
    projected = old.space.project(held.features)
    shared = 0
    for i in np.flatnonzero(last > first):
        candidates = order[first[i] : last[i]]
        candidates = candidates[np.abs(reference[candidates, 1] - placed[i, 1]) <= allowed[i, 1]]
        if any(np.allclose(old.features[j], projected[i], rtol=1e-3, atol=FEATURE_TOLERANCE) for j in candidates):
            shared += 1
    if shared:
        raise UserError(
            f"--calibration-data {spec}: {shared} of its {len(placed)} images are images of the map's reference "
            "(each lands on a reference point, with its features: trained on, or folded before); calibrate on "
            "clean images that are neither trained on nor folded"
        )


def _pixel_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def _run_model(
    images: np.ndarray | list[np.ndarray], manifest: BundleManifest, model: ModelSession
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coords, raw features, channel statistics) of uint8 images at model size, a batch at a time."""
    parts = []
    for start in range(0, len(images), BATCH):
        batch = stack_fitted(np.asarray(images[start : start + BATCH]), manifest.preprocessing)
        coords, features = model.run(["coords", "features"], batch)
        parts.append((coords, features, channel_statistics(batch)))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))  # type: ignore[return-value]


@dataclass
class OldReference:
    """What the old bundle's reference.npz holds, read whole (the new one is written from it)."""

    arrays: dict[str, np.ndarray]
    features: np.ndarray  # projected, (N, d)
    space: FeatureSpace

    @classmethod
    def load(cls, bundle: Path) -> OldReference:
        with np.load(bundle / REFERENCE_FILE, allow_pickle=False) as reference:
            arrays = {name: reference[name] for name in reference.files}
        if "features" not in arrays or "feature_components" not in arrays:
            raise UserError(f"{bundle / REFERENCE_FILE}: no reference features; export the bundle again to fold")
        space = FeatureSpace(arrays["feature_mean"], arrays["feature_components"])
        return cls(arrays, arrays["features"].astype(np.float32), space)

    def __len__(self) -> int:
        return len(self.arrays["ids"])

    def provenance(self) -> tuple[np.ndarray, np.ndarray]:
        """(provenance, image_sha256) of the old images: as recorded by an earlier fold, else training."""
        n = len(self)
        source = self.arrays.get("provenance", np.full(n, TRAINING))
        return source.astype(str), self.arrays.get("image_sha256", np.full(n, "")).astype(str)


def grown_pixel_model(old: CombinedCalibration, old_images: int, statistics: np.ndarray) -> PixelModel:
    """The pixel model fitted to the old reference and the folded images together, from the old model's moments
    (its mean, and its covariance recovered from the stored precision) pooled with the folded images'
    statistics: the old images' pixels are not in the bundle."""
    mean_a = np.asarray(old.pixels.mean, dtype=np.float64)
    dims = len(mean_a)
    covariance_a = np.linalg.pinv(np.asarray(old.pixels.precision, dtype=np.float64)) - REGULARISER * np.eye(dims)
    values = np.asarray(statistics, dtype=np.float64)
    n_a, n_b = old_images, len(values)
    mean_b = values.mean(0)
    scatter_b = (values - mean_b).T @ (values - mean_b)
    difference = (mean_b - mean_a)[:, None]
    scatter = (n_a - 1) * covariance_a + scatter_b + difference @ difference.T * (n_a * n_b / (n_a + n_b))
    covariance = scatter / (n_a + n_b - 1) + REGULARISER * np.eye(dims)
    return PixelModel((n_a * mean_a + n_b * mean_b) / (n_a + n_b), np.linalg.pinv(covariance))


def _thumbnails(images: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """The folded images at the old reference's thumbnail size (as export makes them: area resize)."""
    return np.stack([image if image.shape[:2] == size else resize_rgb(image, size, "area") for image in images])


def _grown_reference(old: OldReference, folded: FoldedImages, projected: np.ndarray) -> dict[str, np.ndarray]:
    """reference.npz of the new bundle: the old members with the folded images appended, and where each came from."""
    arrays = dict(old.arrays)
    n = len(folded)
    source, digests = old.provenance()
    arrays["coords"] = np.concatenate([old.arrays["coords"], np.asarray(folded.coords, dtype=np.float32)])
    arrays["ids"] = np.concatenate([old.arrays["ids"].astype(str), np.asarray(folded.ids, dtype=str)])
    if "labels" in arrays:
        labels = np.asarray(folded.labels, dtype=arrays["labels"].dtype)
        arrays["labels"] = np.concatenate([arrays["labels"], labels])
    arrays["features"] = np.concatenate([old.features, projected])
    if "thumbnails" in arrays:
        size = tuple(arrays["thumbnails"].shape[1:3])
        arrays["thumbnails"] = np.concatenate([arrays["thumbnails"], _thumbnails(folded.images, size)])
    arrays["provenance"] = np.concatenate([source, np.asarray([f"journal:{i}" for i in folded.row_ids], dtype=str)])
    arrays["image_sha256"] = np.concatenate([digests, np.asarray(folded.image_sha256, dtype=str)])
    assert all(len(arrays[name]) == len(old) + n for name in ("coords", "ids", "features", "provenance"))
    return arrays


def _write_bundle(
    bundle: Path,
    old: OldReference,
    manifest: BundleManifest,
    folded: FoldedImages,
    held: HeldOut,
    target_rate: float,
    record: dict[str, Any],
    staging: Path,
) -> BundleManifest:
    """Every file of the new bundle into `staging`, bundle.json last; its manifest."""
    old_calibration = manifest.calibration
    assert isinstance(old_calibration, CombinedCalibration)
    projected = old.space.project(folded.features)
    arrays = _grown_reference(old, folded, projected)
    pixels = grown_pixel_model(old_calibration, len(old), folded.statistics)
    calibration, index = calibrate_detector_and_index(
        held.features, held.statistics, held.coords, arrays["features"], held.statistics[:0], arrays["coords"],
        source=f"held-out images never trained on: {held.source}; reference grown by `tsimcne journal fold`",
        space=old.space, k=old_calibration.k, target_rate=target_rate, pixels=pixels,
    )  # fmt: skip
    shutil.copyfile(bundle / MODEL_FILE, staging / MODEL_FILE)
    np.save(staging / FEATURES_FILE, np.ascontiguousarray(arrays["features"], dtype=np.float32), allow_pickle=False)
    written = [MODEL_FILE, REFERENCE_FILE, MAP_FILE, *write_serving_arrays(arrays["coords"], index, staging)]
    with open(staging / REFERENCE_FILE, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    labels = arrays.get("labels")
    plot_map(arrays["coords"][:, :2], labels, list(manifest.class_names), staging / MAP_FILE,
             title=f"{record['bundle']} reference map ({len(folded):,} folded from the journal)")  # fmt: skip
    training = {**manifest.training, "folds": [*manifest.training.get("folds", []), record]}
    new_manifest = manifest.model_copy(
        update={
            "schema_version": SCHEMA_VERSION,
            "name": record["bundle"],
            "created": record["created"],
            "calibration": calibration,
            "training": training,
            "files": {name: sha256_file(staging / name) for name in written},
        }
    )
    (staging / MANIFEST).write_text(new_manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return new_manifest


def _fold_record(
    journal: SqlJournal, bundle: Path, manifest: BundleManifest, folded: FoldedImages, out: Path
) -> dict[str, Any]:
    """What bundle.json's training.folds keeps of this fold: from which bundle and journal, which rows."""
    with np.load(bundle / REFERENCE_FILE, allow_pickle=False) as reference:
        reference_size = len(reference["ids"]) + len(folded)
    return {
        "bundle": out.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "from_bundle": manifest.name,
        "from_bundle_sha256": sha256_file(bundle / MANIFEST),
        "journal": journal.describe(),
        "images": len(folded),
        "reference_size": reference_size,
        "first_row": min(folded.row_ids),
        "last_row": max(folded.row_ids),
        "skipped": dict(folded.skipped),
    }


def describe_skipped(skipped: dict[str, int]) -> str:
    """One line: how many rows were left out, by reason."""
    return (
        "; ".join(f"{count:,} {reason}" for reason, count in skipped.items())
        or "no rows reviewed as fine or with a class name"
    )


def provenance_counts(bundle: Path) -> dict[str, int]:
    """How many reference images of a bundle came from training and from the journal (for reports)."""
    with np.load(Path(bundle) / REFERENCE_FILE, allow_pickle=False) as reference:
        if "provenance" not in reference.files:
            return {TRAINING: len(reference["ids"])}
        source = reference["provenance"]
    journal = int(np.char.startswith(source.astype(str), "journal:").sum())
    return {TRAINING: len(source) - journal, "journal": journal}
