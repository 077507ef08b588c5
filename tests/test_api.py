"""The Python API (tsimcne_map): a tiny map fitted on arrays and on files, transform equal to `tsimcne embed`
on its export, Bundle.place with /embed's fields, resume after an interrupt, errors as exceptions."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.harness.cli import run_cli
from tests.conftest import ROOT
from training.export import PARITY_TOLERANCE
from training.synthetic import make_synthetic_cells
from tsimcne_core.placing import PlacedImage as PlacedRecord
from tsimcne_map import (
    Bundle,
    BundleError,
    DataError,
    ImageDecodeError,
    PlacedImage,
    TrainingStopped,
    TSimCNE,
    UserError,
)

SETTINGS = {"epochs": (2, 1, 1), "precision": "fp32", "progress": False}
EMBED_FIELDS = {"filename", "x", "y", "flag", "score", "evidence", "duplicate_of", "neighbours", "majority_label"}


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, list[str]]:
    images, labels, names = make_synthetic_cells(96, (16, 16), seed=5)
    return images, [names[i] for i in labels]


@pytest.fixture(scope="module")
def epoch_records() -> list[dict]:
    """What the fitted model's callback received (filled by `fitted`, which every user of it also asks for)."""
    return []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cells, epoch_records) -> TSimCNE:
    images, labels = cells
    run_dir = tmp_path_factory.mktemp("api") / "runs" / "cells"
    model = TSimCNE("tiny", run_dir=run_dir, callback=epoch_records.append, **SETTINGS)
    coords = model.fit_transform(images, labels)
    assert coords.shape == (96, 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    return model


@pytest.fixture(scope="module")
def new_files(tmp_path_factory) -> list[Path]:
    """Cells the map never saw (another seed), at another size than the training images, as PNG files."""
    folder = tmp_path_factory.mktemp("new")
    images, _, _ = make_synthetic_cells(10, (24, 24), seed=11)
    files = []
    for i, image in enumerate(images):
        files.append(folder / f"new{i}.png")
        Image.fromarray(image).save(files[-1])
    return files


@pytest.fixture(scope="module")
def bundle(fitted, tmp_path_factory) -> Bundle:
    return fitted.export(tmp_path_factory.mktemp("models") / "cells", artefact_labels=["thromboid"])


def test_fit_writes_a_run_folder_the_cli_can_use(fitted, cells, epoch_records) -> None:
    run = fitted.run_dir_
    for name in ("config.json", "data.npz", "stage3.pt", "last.pt", "embedding.npz", "log.jsonl"):
        assert (run / name).is_file(), name
    assert fitted.config_.data == str((run / "data.npz").resolve()) and fitted.config_.image_size == (16, 16)
    assert fitted.class_names_ == sorted(set(cells[1])) and len(fitted.labels_) == 96
    assert [(r["stage"], r["epoch"]) for r in epoch_records] == [(1, 1), (1, 2), (2, 1), (3, 1)]
    result = run_cli("evaluate", str(run))  # the CLI reads the run made from arrays (its data kept in data.npz)
    assert result.returncode == 0, result.stderr


def test_transform_equals_tsimcne_embed_on_the_export(fitted, bundle, new_files, tmp_path) -> None:
    out = tmp_path / "coords.csv"
    result = run_cli("embed", str(bundle.path), *map(str, new_files), "--out", str(out), "--provider", "cpu")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in csv.DictReader(out.open())}
    embedded = np.array([[float(rows[str(f)]["x"]), float(rows[str(f)]["y"])] for f in new_files])
    coords = fitted.transform(new_files)
    assert coords.shape == (10, 2) and coords.dtype == np.float32
    allowed = PARITY_TOLERANCE * max(1.0, float(np.abs(embedded).max()))
    assert np.abs(coords - embedded).max() <= allowed
    # The same pixels as arrays (PNG is lossless) and through the bundle give the same positions.
    arrays = [np.asarray(Image.open(f)) for f in new_files]
    np.testing.assert_array_equal(fitted.transform(arrays), coords)
    assert np.abs(bundle.transform(new_files) - coords).max() <= allowed


def test_transform_of_the_training_images_is_their_map(fitted, cells) -> None:
    np.testing.assert_allclose(fitted.transform(cells[0]), fitted.embedding_, atol=1e-5)


def test_place_gives_the_fields_of_embed(bundle, new_files, tmp_path) -> None:
    placed = bundle.place(new_files)
    assert len(placed) == 10 and not placed.skipped
    first = placed[0]
    assert isinstance(first, PlacedRecord) and PlacedImage is PlacedRecord  # /embed's own record type
    assert set(dataclasses.asdict(first)) >= EMBED_FIELDS and first.filename == str(new_files[0])
    assert first.flag in ("in_distribution", "out_of_distribution", "artefact")
    assert set(first.evidence) == {"features", "pixels", "position"} and len(first.neighbours) == 5
    assert first.majority_label in bundle.class_names
    out = tmp_path / "coords.csv"
    assert run_cli("embed", str(bundle.path), *map(str, new_files), "--out", str(out)).returncode == 0
    for row, image in zip(csv.DictReader(out.open()), placed, strict=True):  # the CLI's table is the same
        assert row["id"] == image.filename and row["flag"] == image.flag
        assert row["neighbour_ids"].split(";") == [n.id for n in image.neighbours]
        assert abs(float(row["score"]) - image.score) <= 1e-5 * max(1.0, image.score)
    frame = placed.to_frame()
    assert list(frame["id"]) == [str(f) for f in new_files] and {"x", "y", "flag", "evidence_pixels"} <= set(frame)


def test_place_reports_unreadable_files_and_duplicates(bundle, new_files, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):
        bundle.place([new_files[0], broken])
    placed = bundle.place([new_files[0], broken, new_files[0]], skip_unreadable=True)
    assert [p.filename for p in placed] == [str(new_files[0])] * 2
    assert placed.skipped[0].id == str(broken) and "broken.png" in placed.skipped[0].error
    assert placed[1].duplicate_of == str(new_files[0])  # the same image twice in one call
    assert [row["error"] != "" for row in placed.rows()] == [False, True, False]  # rows keep the input order


def test_reference_map_is_the_training_map(fitted, bundle) -> None:
    reference = bundle.reference_map()
    np.testing.assert_allclose(reference.coords, fitted.embedding_, atol=1e-5)
    assert reference.class_names == fitted.class_names_ and reference.ids == fitted.ids_
    frame = reference.to_frame()
    assert len(frame) == 96 and set(frame["label"]) == set(fitted.class_names_)


def test_fit_on_files_and_load_evaluate_plot(tmp_path, new_files) -> None:
    labels = ["even" if i % 2 == 0 else "odd" for i in range(len(new_files))]
    files = [*new_files, *new_files]  # 20 files, 10 distinct
    model = TSimCNE("tiny", run_dir=tmp_path / "run", image_size=16, batch_size=8, **SETTINGS)
    model.fit(files, labels + labels)
    assert model.embedding_.shape == (20, 2) and model.class_names_ == ["even", "odd"]
    loaded = TSimCNE.load(model.run_dir_)
    np.testing.assert_allclose(loaded.transform(new_files), model.transform(new_files), atol=1e-5)
    report = loaded.evaluate()
    assert report["n_images"] == 20 and (model.run_dir_ / "metrics.json").exists()
    # the figure is kNN (k=15) on a stratified 10 % hold-out of this run's own map and labels, computed apart here
    train_x, test_x, train_y, test_y = train_test_split(
        loaded.embedding_, labels + labels, test_size=0.1, random_state=0, stratify=labels + labels
    )
    expected = KNeighborsClassifier(n_neighbors=15).fit(train_x, train_y).score(test_x, test_y)
    assert report["knn_accuracy"] == pytest.approx(expected)
    assert loaded.plot().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_fit_raises_and_resume_finishes_it_exactly(tmp_path, fitted, cells) -> None:
    images, labels = cells

    def interrupt_after_the_first_epoch(record: dict) -> None:
        if (record["stage"], record["epoch"]) == (1, 1):
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C (or a notebook's interrupt) sends

    model = TSimCNE("tiny", run_dir=tmp_path / "run", callback=interrupt_after_the_first_epoch, **SETTINGS)
    with pytest.raises(TrainingStopped, match=r"TSimCNE\.resume") as stopped:
        model.fit(images, labels)
    assert stopped.value.run_dir == tmp_path / "run" and not (tmp_path / "run" / "stage3.pt").exists()
    resumed = TSimCNE.resume(tmp_path / "run", progress=False)
    np.testing.assert_array_equal(resumed.embedding_, fitted.embedding_)  # as if never interrupted
    again = TSimCNE.resume(tmp_path / "run", progress=False)  # finished: only opened
    assert again.result_ is None and again.embedding_.shape == (96, 2)


def test_errors_are_exceptions_with_clear_messages(fitted, tmp_path, cells) -> None:
    images, labels = cells
    with pytest.raises(UserError, match="unknown recipe 'huge'"):
        TSimCNE("huge")
    with pytest.raises(UserError, match="unknown setting 'epoch'"):
        TSimCNE("tiny", epoch=(1, 1, 1))
    with pytest.raises(UserError, match="invalid settings: batch_size"):
        TSimCNE("tiny", batch_size=1)
    with pytest.raises(UserError, match="unknown augmentation preset 'sparkly'"):
        TSimCNE("tiny", augmentation="sparkly")
    with pytest.raises(UserError, match="already exists"):
        TSimCNE("tiny", run_dir=fitted.run_dir_, **SETTINGS).fit(images)
    with pytest.raises(DataError, match="labels and ids come with a folder"):
        TSimCNE("tiny", run_dir=tmp_path / "y", **SETTINGS).fit("synthetic:50", labels)
    with pytest.raises(DataError, match="96 images but 3 labels"):
        TSimCNE("tiny", run_dir=tmp_path / "z", **SETTINGS).fit(images, ["a", "b", "c"])
    with pytest.raises(DataError, match="type dict"):
        TSimCNE("tiny", run_dir=tmp_path / "w", **SETTINGS).fit({"images": images})
    with pytest.raises(UserError, match="not fitted"):
        TSimCNE("tiny").transform(images)
    with pytest.raises(UserError, match="not a training run folder"):
        TSimCNE.load(tmp_path)
    with pytest.raises(BundleError, match=r"bundle\.json: missing"):
        Bundle.open(tmp_path)


def test_bundle_imports_without_torch() -> None:
    code = "import sys\nfrom tsimcne_map import Bundle, Placements\nassert 'torch' not in sys.modules\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
