"""The flag's calibration as one typed model: written by export, read back typed; bundles from before the
combined flag (position-only calibration, none at all, or no stored features) still open and place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from training.datasets import load_dataset
from tsimcne_core.bundle_format import MANIFEST, REFERENCE_FILE, BundleError, open_bundle, sha256_file
from tsimcne_core.calibration import Calibration, CombinedCalibration, PositionCalibration
from tsimcne_core.flag import CombinedFlag, PositionFlag, calibrate_position
from tsimcne_core.placing import Placer

# What `tsimcne export` wrote before the combined flag (tsimcne_core/flag.py calibrate_position, as a dict).
OLD_POSITION_CALIBRATION = {
    "method": "kth-neighbour-distance-2d",
    "k": 15,
    "target_false_flag_rate": 0.01,
    "threshold": 0.8,
    "holdout_images": 12,
    "seed": 0,
}


def _copy_with(bundle: Path, tmp_path: Path, calibration: dict | None, drop_features: bool = False) -> Path:
    target = tmp_path / "old"
    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST).read_text())
    if calibration is None:
        del manifest["calibration"]
    else:
        manifest["calibration"] = calibration
    if drop_features:  # as exported before the features were projected: no feature_components
        with np.load(target / REFERENCE_FILE) as reference:
            kept = {key: reference[key] for key in reference.files if key not in ("feature_components", "feature_mean")}
        with open(target / REFERENCE_FILE, "wb") as handle:
            np.savez_compressed(handle, **kept)
        manifest["files"][REFERENCE_FILE] = sha256_file(target / REFERENCE_FILE)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_export_writes_a_typed_combined_calibration(service_bundle) -> None:
    bundle, _ = service_bundle
    calibration = open_bundle(bundle).calibration
    assert isinstance(calibration, CombinedCalibration) and calibration.method == "features+pixels"
    raw = json.loads((bundle / MANIFEST).read_text())["calibration"]
    assert TypeAdapter(Calibration).validate_python(raw) == calibration  # the JSON is exactly the model
    assert isinstance(Placer(bundle, "cpu").flag, CombinedFlag)


@pytest.mark.parametrize("kind", ["position-only", "none", "combined-without-features"])
def test_bundles_from_before_the_combined_flag_still_open_and_place(service_bundle, tmp_path, kind) -> None:
    bundle, data = service_bundle
    if kind == "position-only":
        with np.load(bundle / REFERENCE_FILE) as reference:
            threshold = calibrate_position(reference["coords"]).threshold  # what such a bundle carries for this map
        old = _copy_with(bundle, tmp_path, dict(OLD_POSITION_CALIBRATION, threshold=threshold))
    elif kind == "none":
        old = _copy_with(bundle, tmp_path, None)
    else:
        combined = json.loads((bundle / MANIFEST).read_text())["calibration"]
        old = _copy_with(bundle, tmp_path, combined, drop_features=True)
    embedder = Placer(old, "cpu")
    assert isinstance(embedder.flag, PositionFlag) and embedder.outputs == ["coords"]
    if kind == "position-only":
        assert embedder.calibration == PositionCalibration(**json.loads((old / MANIFEST).read_text())["calibration"])
    elif kind == "combined-without-features":
        assert embedder.calibration == open_bundle(bundle).calibration.position_only()
    else:  # computed from the map when opened
        assert isinstance(embedder.calibration, PositionCalibration)
    images = list(load_dataset(data, size=(16, 16)).images[:12])
    placed = embedder.place_images(images)
    assert all(set(p.evidence) == {"position"} and p.score >= 0 for p in placed)
    assert all(p.duplicate_of is None for p in placed)
    assert sum(p.flag == "out_of_distribution" for p in placed) <= 2  # training images sit on the map


def test_a_malformed_calibration_is_refused_naming_the_field(service_bundle, tmp_path) -> None:
    bundle, _ = service_bundle
    broken = dict(OLD_POSITION_CALIBRATION, threshold=-1.0)
    with pytest.raises(BundleError, match=r"bundle\.json: field 'calibration\..*threshold'"):
        open_bundle(_copy_with(bundle, tmp_path, broken))


def test_unknown_method_is_not_read_as_another() -> None:
    with pytest.raises(ValidationError, match="method"):
        TypeAdapter(Calibration).validate_python(dict(OLD_POSITION_CALIBRATION, method="magic"))
