"""`tsimcne journal fold`: a bundle grown with 1,000 images reviewed in a real SQLite journal, placed with real
onnxruntime; the grown bundle's placements, provenance, checksums and flag; the old bundle untouched; refusals."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness.cli import run_cli
from training.datasets import load_dataset
from training.fold import grown_pixel_model
from training.synthetic import make_synthetic_cells
from tsimcne_core.bundle_format import MANIFEST, open_bundle, sha256_file
from tsimcne_core.calibration import CombinedCalibration
from tsimcne_core.flag_evidence import PixelModel, channel_statistics
from tsimcne_core.journal import JournalRow, now, open_journal
from tsimcne_core.preprocess import to_model_input
from tsimcne_map import Bundle

FOLDED = 1000
SIZE = (16, 16)  # the service_bundle fixture's image size


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


def _journal_rows(bundle: Bundle, images: np.ndarray, bundle_sha256: str) -> list[JournalRow]:
    """Rows as the service writes them: the placed record and the model input scaled back to uint8."""
    placed = bundle.place(images, ids=[f"cell{i:04d}.png" for i in range(len(images))], batch_size=64)
    prep = bundle.manifest.preprocessing
    pixels = np.clip(np.rint(to_model_input(list(images), prep).transpose(0, 2, 3, 1) * prep.divide_by), 0, 255)
    rows = []
    for record, image in zip(placed, pixels.astype(np.uint8), strict=True):
        rows.append(
            JournalRow(
                time=now(), request_id="test", bundle_sha256=bundle_sha256, filename=record.filename,
                image_sha256=hashlib.sha256(image.tobytes()).hexdigest(), x=record.x, y=record.y,
                flag=str(record.flag), score=record.score, evidence=dict(record.evidence),
                majority_label=record.majority_label, majority_share=record.majority_share, neighbours=[],
                duplicate_of=None, source="test", sample_id=None, tags=[], image=image,
            )
        )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def folded(service_bundle, tmp_path_factory) -> dict:
    """1,000 images placed with the old bundle and reviewed in the journal (plus rows that must not be folded),
    folded into a new bundle through the command line."""
    old, data = service_bundle
    root = tmp_path_factory.mktemp("fold")
    before = _digests(old)
    sha = sha256_file(old / MANIFEST)
    images, _, _ = make_synthetic_cells(FOLDED + 4, SIZE, seed=11)
    calibration, _, _ = make_synthetic_cells(1000, SIZE, seed=12)
    np.savez(root / "calibration.npz", images=calibration)
    url = f"sqlite:///{root / 'journal.db'}"
    journal = open_journal(url)
    rows = _journal_rows(Bundle.open(old, provider="cpu"), images, sha)
    rows[FOLDED].bundle_sha256 = "0" * 64  # placed with another bundle
    rows[FOLDED + 1].x += 0.5  # not where the model puts its image
    journal.write(rows)
    ids = [row["id"] for row in journal.placements(_all(), limit=1000)]
    ids += [row["id"] for row in journal.placements(_all(), after=ids[-1], limit=1000)]
    labelled = {ids[i]: "lymphoid" for i in range(10)}  # a class name as the verdict: that label
    for row_id in ids[: FOLDED + 2]:
        journal.review(row_id, labelled.get(row_id, "fine"), "tester", None)
    journal.review(ids[FOLDED + 2], "artefact", "tester", None)  # never folded; ids[-1] stays unreviewed
    new = root / "grown"
    result = run_cli("journal", "fold", url, "--bundle", str(old), "--out", str(new),
                     "--calibration-data", str(root / "calibration.npz"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {"old": old, "new": new, "before": before, "images": images, "ids": ids, "url": url,
            "journal": journal, "stdout": result.stdout, "root": root, "data": data}  # fmt: skip


def _all():
    from tsimcne_core.journal import PlacementFilter

    return PlacementFilter()


def test_the_grown_bundle_places_the_folded_images_where_the_journal_recorded_them(folded) -> None:
    grown = Bundle.open(folded["new"], provider="cpu")
    placed = grown.place(folded["images"][:FOLDED], batch_size=64)
    recorded = folded["journal"].placements(_all(), limit=FOLDED)
    np.testing.assert_array_equal([p.x for p in placed], [row["x"] for row in recorded])
    np.testing.assert_array_equal([p.y for p in placed], [row["y"] for row in recorded])
    # Each folded image is now on the map: its nearest reference image is itself, at distance 0.
    assert all(p.neighbours[0].distance == 0.0 for p in placed)
    assert f"{FOLDED:,} journal images folded" in folded["stdout"]
    assert "1 placed with another bundle" in folded["stdout"] and "1 placed elsewhere" in folded["stdout"]


def test_the_reference_holds_old_and_folded_images_with_provenance_and_labels(folded) -> None:
    old, new = open_bundle(folded["old"]), open_bundle(folded["new"])  # both verify every checksum
    with np.load(folded["old"] / "reference.npz") as before, np.load(folded["new"] / "reference.npz") as after:
        n_old = len(before["ids"])
        assert len(after["ids"]) == len(after["coords"]) == len(after["thumbnails"]) == n_old + FOLDED
        np.testing.assert_array_equal(after["coords"][:n_old], before["coords"])
        np.testing.assert_array_equal(after["features"][:n_old], before["features"])
        provenance, digests, labels = after["provenance"], after["image_sha256"], after["labels"]
        assert set(provenance[:n_old]) == {"training"} and set(digests[:n_old]) == {""}
        rows = folded["journal"].placements(_all(), limit=FOLDED)
        assert list(provenance[n_old:]) == [f"journal:{row['id']}" for row in rows]
        assert list(digests[n_old:]) == [row["image_sha256"] for row in rows]
        names = list(new.class_names)
        expected = ["lymphoid" if i < 10 else row["majority_label"] for i, row in enumerate(rows)]
        assert [names[i] for i in labels[n_old:]] == expected
        np.testing.assert_array_equal(np.load(folded["new"] / "reference_features.npy"), after["features"])
    fold = new.training["folds"][-1]
    assert fold["from_bundle_sha256"] == sha256_file(folded["old"] / MANIFEST) and fold["images"] == FOLDED
    assert new.training["config"] == old.training["config"] and new.name == "grown"
    assert _digests(folded["old"]) == folded["before"]  # the old bundle, byte for byte


def test_the_grown_flag_keeps_its_calibrated_false_flag_rate_on_held_out_images(folded) -> None:
    calibration = open_bundle(folded["new"]).calibration
    assert isinstance(calibration, CombinedCalibration) and calibration.images == 1000
    assert calibration.features.index.reference_size == len(Bundle.open(folded["new"]).reference_map().ids)
    held, _, _ = make_synthetic_cells(3000, SIZE, seed=13)  # neither trained on, folded nor calibrated with
    scores = np.array([p.score for p in Bundle.open(folded["new"], provider="cpu").place(held, batch_size=256)])
    rate, interval = float((scores > 1).mean()), calibration.false_flag_rate
    # The interval holds the true rate with 90 %; the measured rate adds the binomial noise of 3,000 images.
    noise = 3 * math.sqrt(interval.high * (1 - interval.high) / len(held))
    assert interval.low - noise <= rate <= interval.high + noise, (rate, interval)


def test_pooled_pixel_moments_equal_a_fit_on_all_the_images() -> None:
    images, _, _ = make_synthetic_cells(400, SIZE, seed=5)
    statistics = channel_statistics(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    old = PixelModel.fit(statistics[:300])
    calibration = CombinedCalibration.model_validate(
        {"target_false_flag_rate": 0.01, "source": "test", "images": 100, "k": 15, "threshold": 1.0,
         "features": {"scale": 1.0}, "pixels": old.calibration(1.0), "position": {"k": 15, "threshold": 1.0}}
    )  # fmt: skip
    pooled, exact = grown_pixel_model(calibration, 300, statistics[300:]), PixelModel.fit(statistics)
    np.testing.assert_allclose(pooled.mean, exact.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pooled.distance(statistics), exact.distance(statistics), rtol=1e-4)


def test_bad_input_is_refused_with_one_line_and_exit_code_2(folded, tmp_path) -> None:
    old, url = str(folded["old"]), folded["url"]
    data = ["--calibration-data", str(folded["root"] / "calibration.npz")]
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    open_journal(empty)
    overlapping = tmp_path / "overlapping.npz"  # 300 of the images being folded among the calibration images
    trained_on = tmp_path / "trained-on.npz"  # 50 images of the old map's reference (it keeps no pixels)
    training = load_dataset(folded["data"], size=SIZE)
    with np.load(folded["old"] / "reference.npz") as reference:
        in_reference = set(reference["ids"].astype(str))
    trained = [image for image, name in zip(training.images, training.ids, strict=True) if name in in_reference]
    with np.load(folded["root"] / "calibration.npz") as clean:
        np.savez(overlapping, images=np.concatenate([folded["images"][:300], clean["images"]]))
        np.savez(trained_on, images=np.concatenate([np.stack(trained[:50]), clean["images"]]))
    cases = {
        "unknown journal": (["mysql://x/y", "--bundle", old, "--out", str(tmp_path / "a")], "journal"),
        "missing journal file": ([f"sqlite:///{tmp_path}/none.db", "--bundle", old, "--out", str(tmp_path / "b")],
                                 "no such file"),
        "missing bundle": ([url, "--bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")], "bundle.json"),
        "out exists": ([url, "--bundle", old, "--out", str(folded["new"])], "already exists"),
        "no reviewed rows": ([empty, "--bundle", old, "--out", str(tmp_path / "d")], "nothing to fold"),
        "no calibration data": ([url, "--bundle", old, "--out", str(tmp_path / "e")], "--calibration-data"),
        "calibration images being folded": (
            [url, "--bundle", old, "--out", str(tmp_path / "f"), "--calibration-data", str(overlapping)],
            "300 of its 1300 images are among the 1000 images being folded"),
        "calibration images trained on": (
            [url, "--bundle", old, "--out", str(tmp_path / "g"), "--calibration-data", str(trained_on)],
            "50 of its 1050 images are images of the map's reference"),
    }  # fmt: skip
    for name, (args, says) in cases.items():
        extra = [] if name.startswith(("no calibration data", "calibration images")) else data
        result = run_cli("journal", "fold", *args, *extra)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error: ") and says in result.stderr and "Traceback" not in result.stderr, name
    assert not (tmp_path / "none.db").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert json.loads((folded["old"] / MANIFEST).read_text())["name"] == "cells"


def test_the_service_tells_what_grew_its_reference(folded, tmp_path) -> None:
    """GET /info of the grown bundle: its reference size and the fold (when, from which bundle, how many), not
    the journal's path."""
    from benchmarks.harness.servers import start_server

    running = start_server(tmp_path, {"bundle": str(folded["new"])}, home=tmp_path)
    try:
        with running.client() as client:
            info = client.get("/info").json()
    finally:
        running.stop()
    old = open_bundle(folded["old"])
    (fold,) = info["folds"]
    assert fold["images"] == FOLDED and fold["from_bundle"] == old.name
    assert fold["from_bundle_sha256"] == sha256_file(folded["old"] / MANIFEST)
    assert info["reference_images"] == fold["reference_size"]
    assert "journal" not in fold and str(folded["root"]) not in json.dumps(info)
