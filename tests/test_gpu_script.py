"""The GPU reference script, run on the CPU with a tiny schedule: train, evaluate, plot, summarise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from training.synthetic import make_synthetic_cells


def _run_gpu_script(script: str, tmp_path: Path, settings: dict[str, str]) -> Path:
    """benchmarks/gpu/SCRIPT on 300 synthetic 28 px cells with the CPU standing in for the GPU (DEVICE=cpu and
    `settings`); asserts it succeeded and returns its results folder."""
    images, labels, names = make_synthetic_cells(300, (28, 28), seed=1)
    data = tmp_path / "cells.npz"
    np.savez(data, images=images, labels=labels, class_names=np.array(names))
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", **settings}
    results = tmp_path / "results"
    done = subprocess.run(
        ["bash", f"benchmarks/gpu/{script}", str(data), str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return results


@pytest.mark.slow
def test_reference_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    settings = {"EPOCHS": "2,1,1", "WIDTH": "4", "BATCH": "64", "WORK": str(tmp_path / "work")}
    results = _run_gpu_script("reference_pbc.sh", tmp_path, settings)
    summary = json.loads((results / "summary.json").read_text())
    assert summary["config"]["epochs"] == [2, 1, 1] and summary["config"]["width"] == 4
    assert set(summary["stages"]) == {"1", "2", "3"} and summary["stages"]["1"]["images_per_s"] > 0
    assert summary["stages"]["1"]["model_tflop_s"] >= 0 and summary["peak_bf16_flops"] is None  # no GPU: no MFU
    assert 0 <= summary["knn_accuracy"] <= 1 and summary["linear_probe"] is not None
    assert summary["met"]["knn_accuracy"] is False  # a 4-epoch width-4 map is far from the paper's 0.93
    assert (results / "map.png").read_bytes()[:4] == b"\x89PNG" and "| stage |" in (results / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("wrk") is None, reason="wrk not installed (scripts/test installs it)")
def test_gpu_serve_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu/serve_hot_path.sh, the one call prepared for a lent GPU, with the CPU standing in: it
    trains, exports, and measures /embed with wrk, so a lent device is not spent finding a broken script."""
    settings = {"PROVIDERS": "cpu", "SECONDS_PER_ROW": "1", "RECIPE": "tiny", "WARM_UP": "1"}
    results = _run_gpu_script("serve_hot_path.sh", tmp_path, settings)
    report = json.loads((results / "hot_path-cpu.json").read_text())
    assert report["provider"] == "cpu" and [row["case"] for row in report["rows"]] == [
        "multipart-1", "multipart-8", "raw-1"
    ]  # fmt: skip
    assert all(row["requests"] > 0 and row["non_2xx"] == 0 for row in report["rows"])
