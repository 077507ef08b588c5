"""Reading a run folder back: its checkpoints, the trained model, the training data and its map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.data import ImageDataset
from training.datasets import load_dataset
from training.network import TSimCNENet, build_model
from tsimcne_core.errors import UserError
from tsimcne_core.files import atomic_savez

EMBEDDING_FILE = "embedding.npz"


def require_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file():
        raise UserError(f"{run_dir}: not a training run folder (no last.pt); train first with `tsimcne train`")
    return run_dir


def final_checkpoint_path(run_dir: Path) -> Path:
    """stage3.pt once training finished, otherwise the newest state (last.pt)."""
    run_dir = require_run_dir(run_dir)
    finished = run_dir / "stage3.pt"
    return finished if finished.is_file() else run_dir / "last.pt"


def model_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> TSimCNENet:
    config = TrainConfig(**state["config"])
    model = build_model(config)
    if state["model_out_dim"] != model.out_dim:
        model.to_map_output(state["model_out_dim"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def dataset_for_state(state: dict[str, Any], data: str | None = None) -> ImageDataset:
    """Reload the run's training data (or `data`) and check it is the data the run was trained on."""
    config = TrainConfig(**state["config"])
    dataset = load_dataset(
        data or config.data,
        tuple(state["dataset"]["image_size"]),
        config.resize_method,
        skip_bad=config.skip_bad,
        allow_upscale=config.allow_upscale,
    )
    if data is None and dataset.fingerprint() != state["dataset"]["fingerprint"]:
        raise UserError(f"{config.data}: the data changed since training (fingerprint mismatch)")
    return dataset


def write_embedding(run_dir: Path, coords: np.ndarray, dataset: ImageDataset, checkpoint: str) -> Path:
    path = Path(run_dir) / EMBEDDING_FILE
    arrays = {
        "coords": coords.astype(np.float32),
        "ids": np.array(dataset.ids, dtype=str),
        "class_names": np.array(dataset.class_names, dtype=str),
        "checkpoint": np.array(checkpoint),
        "fingerprint": np.array(dataset.fingerprint()),
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    atomic_savez(path, arrays)
    return path


def read_embedding(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / EMBEDDING_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
