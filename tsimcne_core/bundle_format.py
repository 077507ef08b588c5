"""The model bundle: the one contract between training (which writes it) and serving (which reads it).

models/<name>/
  model.onnx       float32 images (N, 3, H, W) in [0, 1] -> coords (N, 2), features (N, F)
  reference.npz    the training images' map: coords, labels, ids, class_names, thumbnails, and for the
                   flag their features projected as tsimcne_core/flag_evidence.py FeatureSpace (no pickle)
  reference_coords.npy, reference_features.npy
                   the same coordinates and projected features as plain float32 arrays, memory-mapped
                   by serving (bundles exported since issue 14; older ones have only reference.npz)
  reference_features.faiss
                   the FAISS feature index the flag was calibrated with (when export had faiss-cpu),
                   memory-mapped by serving instead of being rebuilt in every worker
  map.png          the reference map picture
  bundle.json      schema version, preprocessing, outputs, classes, provenance, parity, flag calibration
                   (typed: tsimcne_core/calibration.py), sha256 of every file

`open_bundle` refuses a bundle whose schema version it does not know, whose files do not match their
checksums, or whose bundle.json names a file outside the folder (an absolute or `..` name, a sub-folder:
export writes plain names only), naming the file and the reason. numpy + pydantic only: no torch here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tsimcne_core.calibration import Calibration

# The format version of bundle.json and the files it lists, the flag's calibration included
# (tsimcne_core/calibration.py): raised whenever a reader of the previous version could not read the new one.
SCHEMA_VERSION = 2  # 2: the calibration may hold false_flag_rate (issue 27); an older reader refuses it by number
READABLE_SCHEMAS = (1, 2)
MANIFEST = "bundle.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
MAP_FILE = "map.png"
COORDS_FILE = "reference_coords.npy"
FEATURES_FILE = "reference_features.npy"
FEATURE_INDEX_FILE = "reference_features.faiss"
# What `tsimcne export` writes: plain names in the bundle folder itself.
_PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and why."""


# What training divides uint8 pixels by (training/augment.py, training/embedding.py) and export records as
# `divide_by`; serving divides by the bundle's value. One number, so the two sides cannot disagree.
PIXEL_DIVISOR = 255.0


class Preprocessing(BaseModel):
    """How a decoded RGB uint8 image becomes the model input (see tsimcne_core/preprocess.py)."""

    model_config = ConfigDict(extra="forbid")
    height: int
    width: int
    resize_method: str = "bicubic"
    # Central (height, width) region taken from a raw image before resizing, when the training data
    # was made that way (BloodMNIST: 200x200 of the 360x363 originals); None = the whole image.
    center_crop: tuple[int, int] | None = None
    channels: str = "rgb"  # grayscale repeated, alpha dropped (tsimcne_core/images.py)
    divide_by: float = PIXEL_DIVISOR  # pixel values are divided by this (uint8 -> [0, 1])
    layout: str = "NCHW"


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int
    name: str
    created: str
    preprocessing: Preprocessing
    input_name: str = "images"
    output_names: list[str]
    out_dim: int
    feature_dim: int
    class_names: list[str]
    partial: bool = False
    finished_stage: int
    training: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    parity: dict[str, Any]
    # The flag's calibration (tsimcne_core/calibration.py); None in bundles exported before the flag existed.
    calibration: Calibration | None = None
    # Class names that mean "artefact" (debris, blur, ...): images landing among them are flagged so.
    artefact_labels: list[str] = []
    versions: dict[str, str]
    files: dict[str, str]

    @field_validator("files")
    @classmethod
    def _plain_file_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            check_file_name(name)
        return files


def check_file_name(name: str) -> str:
    """`name` when it is a plain file name inside a bundle folder; ValueError naming it otherwise."""
    if not _PLAIN_FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{name!r} is not a plain file name inside the bundle folder (letters, digits, '.', '_', '-'; "
            "no folders, absolute or '..' names)"
        )
    return name


def bundle_file(folder: Path, name: str) -> Path:
    """folder / name for a name listed in bundle.json, checked to name a file in `folder` itself;
    BundleError otherwise. (A file may still be a symbolic link, as in Kubernetes volumes.)"""
    try:
        check_file_name(name)
    except ValueError as exc:
        raise BundleError(f"{Path(folder) / MANIFEST}: {exc}") from exc
    return Path(folder) / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_bundle(path: str | Path) -> BundleManifest:
    """Read and verify a bundle folder; raises BundleError naming the file that is wrong."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; is {folder} a bundle made by `tsimcne export`?")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not readable JSON ({exc})") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{manifest_path}: schema version {version!r} is not supported (this version reads "
            f"{', '.join(map(str, READABLE_SCHEMAS))})"
        )
    try:
        manifest = BundleManifest(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{manifest_path}: field '{where}': {first['msg']}") from exc
    for name, expected in manifest.files.items():
        file = bundle_file(folder, name)
        if not file.is_file():
            raise BundleError(f"{file}: listed in {MANIFEST} but missing")
        if sha256_file(file) != expected:
            raise BundleError(f"{file}: checksum mismatch (file changed or truncated since export)")
    for required in (MODEL_FILE, REFERENCE_FILE):
        if required not in manifest.files:
            raise BundleError(f"{manifest_path}: does not list {required}")
    return manifest
