"""The poster's experiments as commands (benchmarks/poster/): each runs end to end on a tiny collection, reuses
the runs it shares with another table, and writes its table and figure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from training.synthetic import make_synthetic_cells

TINY = ["--seeds", "0", "--epochs", "1,1,1", "--width", "4"]


@pytest.mark.slow
def test_tables_and_figure_on_a_tiny_collection(tmp_path: Path) -> None:
    images, labels, names = make_synthetic_cells(180, (28, 28), seed=5)
    data = tmp_path / "cells.npz"
    np.savez(data, images=images, labels=labels, class_names=np.array(names))
    env = {**os.environ, "TSIMCNE_POSTER_SCRATCH": str(tmp_path / "scratch"), "TSIMCNE_POSTER_DOCS": str(tmp_path)}

    def run(script: str, *extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.poster.{script}", "--data", str(data), *TINY, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    table1 = run("table1")
    assert table1.count("training ") == 6  # SimCLR and t-SimCNE for each of the 3 augmentation columns
    assert "| pixel t-SNE | - |" in table1 and "| t-SimCNE | + 90° and arbitrary rotations |" in table1
    table3 = run("table3")
    assert "training " not in table3  # Table 1's runs are reused
    assert table3.count("| SimCLR |") == 3 and "| t-SimCNE after stage 1 |" in table3
    fig5 = run("fig5")
    assert "| copies of one image (100) | 0 |" in fig5 and "| pen mark (50) | 0 |" in fig5
    # Fig. 5 at another schedule than the tables' 12/2/4 is reported and drawn under a name that says so
    for picture in ("poster-table1-maps.png", "poster-fig5-pbc-e1-1-1-lr0.06.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "scratch" / "table1.md").is_file() and (tmp_path / "scratch" / "fig5-e1-1-1-lr0.06.md").is_file()
    assert not (tmp_path / "poster-fig5-pbc.png").exists()
    # another artefact kind and rate is another run, reported and drawn under its own name
    other = run("fig5", "--lr", "0.1", "--artefact", "blur (defocus)")
    assert "training tsimcne-microscopy-e1-1-1-s0-fig5-cells-blur_(defocus)-w4-lr0.1 ..." in other
    assert "epochs 1/1/1, lr 0.1;" in other and "| blur (defocus) (50) | 0 |" in other
    assert (tmp_path / "poster-fig5-pbc-blur-defocus-e1-1-1-lr0.1.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "scratch" / "fig5-blur-defocus-e1-1-1-lr0.1.md").is_file()
