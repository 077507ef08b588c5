"""Shared fixtures: real image files written to disk, the shared blood-cell data, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.harness.cli import run_cli
from benchmarks.harness.postgres import postgres_bin, start_postgres
from training.synthetic import make_synthetic_cells

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "bloodcells"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker cores of its own before anything imports torch.

    Torch (and every `tsimcne`/`bentoml` subprocess a test starts, which inherit the affinity) sizes its thread
    pool to the cores it may use (serving/cores.usable_cores); two workers each using every core
    oversubscribe them, which on a 2-core machine is 10-20x slower, not 2x.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index, workers = int(worker.removeprefix("gw")), int(count)
    if workers > 1 and len(cores) >= workers:
        os.sched_setaffinity(0, cores[index::workers])


@pytest.fixture(scope="session")
def synthetic_arrays() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    return make_synthetic_cells(240, (24, 24), seed=3)


@pytest.fixture
def class_folder(tmp_path: Path, synthetic_arrays) -> Path:
    """A folder of class sub-folders holding real PNG files."""
    images, labels, names = synthetic_arrays
    root = tmp_path / "cells"
    for i, (image, label) in enumerate(zip(images[:60], labels[:60], strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def _shared(relative: str) -> Path:
    """A path in ../shared/data/bloodcells, or skip where the shared data is not laid out."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared blood-cell data not found at {path}")
    return path


@pytest.fixture(scope="session")
def pbc_npz() -> Path:
    return _shared("pbc_28.npz")


@pytest.fixture(scope="session")
def pbc_jpg_folder() -> Path:
    return _shared("jpg_sample")


@pytest.fixture(scope="session")
def service_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny trained model exported as a bundle (16 px synthetic cells; 'thromboid' named an artefact
    label), and the folder of its training images."""
    root = tmp_path_factory.mktemp("service-bundle")
    data = root / "cells"
    result = run_cli("synth", str(data), "--n", "120", "--size", "16")
    assert result.returncode == 0, result.stderr
    args = ["--recipe", "tiny", "--epochs", "2,1,1", "--runs-dir", str(root / "runs")]
    result = run_cli("train", "--data", str(data), "--name", "cells", *args)
    assert result.returncode == 0, result.stderr
    bundle = root / "models" / "cells"
    result = run_cli("export", str(root / "runs" / "cells"), "--out", str(bundle), "--artefact-label", "thromboid")
    assert result.returncode == 0, result.stderr
    return bundle, data


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the test run (each test makes a database of its own:
    benchmarks.harness.postgres.new_database)."""
    if postgres_bin() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and PostgreSQL is missing: scripts/test installs it as root")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    server = start_postgres()
    yield server
    server.stop()
