"""`tsimcne` end to end as a subprocess: train through three stages, evaluate, plot, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.harness.cli import run_cli

TINY = ["--recipe", "tiny", "--epochs", "2,1,1", "--image-size", "16"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    result = run_cli("train", "--data", "synthetic:120", "--name", "t", "--runs-dir", str(runs), *TINY)
    assert result.returncode == 0, result.stderr
    assert "stage 3/3" in result.stdout and "done in" in result.stdout
    return runs / "t"


def test_train_writes_staged_checkpoints_log_and_map(trained_run: Path) -> None:
    for name in ("config.json", "log.jsonl", "stage1.pt", "stage2.pt", "stage3.pt", "last.pt", "embedding.npz"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (1, 2), (2, 1), (3, 1)]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in records)
    stage1 = torch.load(trained_run / "stage1.pt", weights_only=True)
    stage3 = torch.load(trained_run / "stage3.pt", weights_only=True)
    assert stage1["model_out_dim"] == 128 and stage3["model_out_dim"] == 2
    assert stage3["finished_stage"] == 3 and stage3["position"] == {"stage": 4, "epoch": 0, "step": 0}
    with np.load(trained_run / "embedding.npz", allow_pickle=False) as saved:
        assert saved["coords"].shape == (120, 2) and np.isfinite(saved["coords"]).all()


def test_evaluate_and_plot(trained_run: Path) -> None:
    result = run_cli("evaluate", str(trained_run))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert 0 <= metrics["knn_accuracy"] <= 1 and -1 <= metrics["silhouette"] <= 1 and metrics["n_images"] == 120
    result = run_cli("plot", str(trained_run))
    assert result.returncode == 0, result.stderr
    assert (trained_run / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_linear_probe_and_a_named_checkpoint(trained_run: Path) -> None:
    result = run_cli("evaluate", str(trained_run), "--linear")
    assert result.returncode == 0, result.stderr
    probe = json.loads((trained_run / "metrics.json").read_text())["linear_probe"]
    assert probe["n_test"] == 24 and probe["n_features"] == 32 and 0 <= probe["linear_accuracy"] <= 1
    assert "linear probe" in result.stdout
    stage1 = run_cli("evaluate", str(trained_run), "--checkpoint", "stage1")
    assert stage1.returncode == 0 and "128-D output" in stage1.stderr and "stage1.pt" in stage1.stdout
    unknown = run_cli("evaluate", str(trained_run), "--checkpoint", "best")
    assert unknown.returncode == 2 and "choose one of stage1" in unknown.stderr


def test_existing_run_is_not_overwritten(trained_run: Path) -> None:
    before = (trained_run / "stage3.pt").read_bytes()
    result = run_cli("train", "--data", "synthetic:120", "--name", "t", "--runs-dir", str(trained_run.parent), *TINY)
    assert result.returncode == 2 and "already exists" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert (trained_run / "stage3.pt").read_bytes() == before


def test_resume_of_finished_run_says_so(trained_run: Path) -> None:
    result = run_cli("train", "--resume", str(trained_run))
    assert result.returncode == 0 and "already finished" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "synthetic:50", "--augmentation", "sparkly"], "unknown augmentation preset 'sparkly'"),
        (["--data", "synthetic:50", "--recipe", "huge"], "unknown recipe 'huge'"),
        (["--data", "synthetic:50", "--epochs", "1,2"], "three comma-separated values"),
        (["--data", "synthetic:50", "--batch-size", "1"], "batch_size"),
        (["--data", "does/not/exist"], "does/not/exist: no such file"),
        (["--data", "synthetic:50", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_bad_options_give_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("train", "--name", "bad", "--runs-dir", str(tmp_path), "--recipe", "tiny", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_corrupt_image_is_named_and_skip_bad_reports_count(tmp_path: Path, class_folder: Path) -> None:
    (class_folder / "monoid" / "zero.png").write_bytes(b"")
    result = run_cli("train", "--data", str(class_folder), "--name", "c", "--runs-dir", str(tmp_path), *TINY)
    assert result.returncode == 2 and "zero.png: empty file" in result.stderr
    result = run_cli(
        "train", "--data", str(class_folder), "--name", "c", "--runs-dir", str(tmp_path), *TINY, "--skip-bad"
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable image" in result.stderr
    assert len(json.loads((tmp_path / "c" / "skipped.json").read_text())) == 1


def test_empty_dataset_and_npz_mismatch(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("train", "--data", str(empty), "--name", "e", "--runs-dir", str(tmp_path), *TINY)
    assert result.returncode == 2 and "no images found" in result.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((10, 16, 16, 3), np.uint8), labels=np.zeros(9, np.int64))
    result = run_cli("train", "--data", str(bad), "--name", "n", "--runs-dir", str(tmp_path), *TINY)
    assert result.returncode == 2 and "10 images but 'labels' has 9" in result.stderr


def test_resume_without_checkpoint_is_explained(tmp_path: Path) -> None:
    result = run_cli("train", "--resume", str(tmp_path))
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def test_evaluate_needs_a_run(tmp_path: Path) -> None:
    result = run_cli("evaluate", str(tmp_path))
    assert result.returncode == 2 and "not a training run folder" in result.stderr


def test_presets_lists_augmentations_and_recipes() -> None:
    result = run_cli("presets")
    assert result.returncode == 0
    for name in ("default", "microscopy", "reference", "cpu", "demo"):
        assert name in result.stdout


def test_synth_writes_a_readable_class_folder(tmp_path: Path) -> None:
    result = run_cli("synth", str(tmp_path / "s"), "--n", "12", "--size", "16")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "s").rglob("*.png"))) == 12
