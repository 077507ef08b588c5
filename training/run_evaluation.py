"""Evaluate a run folder: the map's kNN accuracy and silhouette, optionally a linear probe of its features.

Library code behind `tsimcne evaluate`; returns the report instead of printing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.checkpoint import load_checkpoint
from training.evaluate import map_quality
from training.runs import dataset_for_state, final_checkpoint_path, model_from_state, read_embedding, require_run_dir
from tsimcne_core.errors import UserError
from tsimcne_core.files import atomic_write_json

CHECKPOINT_NAMES = ("stage1", "stage2", "stage3", "last")


def checkpoint_path(run_dir: Path, name: str | None) -> Path:
    """The final checkpoint, or a named one (stage1, stage2, stage3, last)."""
    if name is None:
        return final_checkpoint_path(run_dir)
    if name not in CHECKPOINT_NAMES:
        raise UserError(f"--checkpoint {name!r}: choose one of {', '.join(CHECKPOINT_NAMES)}")
    path = require_run_dir(run_dir) / f"{name}.pt"
    if not path.is_file():
        raise UserError(f"{path}: this run has no {name} checkpoint (not trained that far)")
    return path


def evaluate_run(
    run_dir: Path,
    data: str | None = None,
    device: str = "auto",
    linear: bool = False,
    checkpoint: str | None = None,
    save: bool = False,
) -> dict[str, Any]:
    """kNN accuracy (k = 15, 10 % hold-out) and silhouette of the network's output for every image.

    With `linear`, also a logistic-regression probe and k-NN on the frozen backbone features
    (training/probe.py). The output is the 2-D map for a finished run, the 128-D output for stage1.
    save: write the report to RUN_DIR/metrics.json when it is about the run's own map (its final
    checkpoint on its training data), where `plot` and `export` find it.
    """
    import torch

    from training.device import resolve_runtime
    from training.embedding import embed_images

    path = checkpoint_path(Path(run_dir), checkpoint)
    state = load_checkpoint(path)
    saved = read_embedding(run_dir) if data is None and path.name == "stage3.pt" else None
    features = dataset = None
    reuse = saved is not None and "labels" in saved and str(saved["fingerprint"]) == state["dataset"]["fingerprint"]
    if reuse and not linear:
        coords, labels = saved["coords"], saved["labels"]
    else:
        runtime = resolve_runtime(device, "fp32", "off")
        dataset = dataset_for_state(state, data)
        with torch.inference_mode():
            coords, features = embed_images(model_from_state(state, runtime.device), dataset.images, runtime.device)
        labels = dataset.labels
    quality = map_quality(coords, labels)
    report: dict[str, Any] = {
        **quality.as_dict(),
        "output_dim": int(coords.shape[1]),
        "checkpoint": path.name,
        "data": data or state["config"]["data"],
    }
    if linear:
        from training.probe import linear_probe

        assert dataset is not None and features is not None
        report["linear_probe"] = linear_probe(features, np.asarray(labels), dataset.ids).as_dict()
    if save and data is None and checkpoint is None:
        atomic_write_json(Path(run_dir) / "metrics.json", report)
    return report
