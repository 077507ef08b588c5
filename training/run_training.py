"""Train a run folder from start (or a checkpoint) to the finished map: the library behind `tsimcne train`
and `tsimcne_map.TSimCNE.fit` / `.resume`.

The steps, each its own function: take the run's lock; choose the device (and join a torchrun job);
read the data; create the run folder (config.json, and the data itself when it came from memory); plan
the epochs for a time budget; train the three stages (training/trainer.py); embed the training images
(embedding.npz). Messages go to `echo` (default: the "tsimcne" logger at INFO; warnings at WARNING);
nothing here prints or exits. Ctrl-C / SIGTERM raise TrainingStopped after the checkpoint is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.budget import BudgetPlan
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, config_from
from training.data import ImageDataset, save_dataset
from training.datasets import load_dataset
from training.device import Runtime, resolve_runtime
from training.distributed import DistInfo, init_from_env, shutdown
from training.network import TSimCNENet
from tsimcne_core.errors import TrainingStopped, UserError
from tsimcne_core.files import atomic_write_json

logger = logging.getLogger("tsimcne")
DATA_FILE = "data.npz"  # a dataset given in memory (arrays, file lists), kept with its run
RUNTIME_SETTINGS = ("device", "precision", "channels_last", "compile")  # may change when a run is resumed


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    seconds: float = 0.0
    final_loss: float | None = None
    budget: BudgetPlan | None = None
    # The finished map of the training images and what made it (main process only; None elsewhere).
    coords: np.ndarray | None = None
    dataset: ImageDataset | None = None
    model: TSimCNENet | None = None
    is_main: bool = True
    already_finished: bool = False  # a resumed run that had nothing left to train


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run must not write into an existing one unless told to replace it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(
            f"{run_dir} already exists; continue it with --resume {run_dir}, choose another --name, "
            "or pass --overwrite to replace it"
        )


def load_resume_state(run_dir: Path, runtime: dict[str, Any] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved settings and state of a run to continue; `runtime` may change only RUNTIME_SETTINGS."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").is_file():
        raise UserError(f"{run_dir}: nothing to resume (no last.pt); the run stopped before its first checkpoint")
    state = load_checkpoint(run_dir / "last.pt")
    settings = dict(state["config"])
    for key, value in (runtime or {}).items():
        if key not in RUNTIME_SETTINGS:
            raise UserError(f"{key}: a resumed run keeps its saved settings; only {', '.join(RUNTIME_SETTINGS)} change")
        if value is not None:
            settings[key] = value
    return config_from(settings), state


def is_finished(state: dict[str, Any]) -> bool:
    return state["position"]["stage"] > 3


def train_run(
    config: TrainConfig,
    run_dir: Path,
    resume_state: dict[str, Any] | None = None,
    overwrite: bool = False,
    dataset: ImageDataset | None = None,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train `run_dir` to the end: a new run (`resume_state` None: check_new_run_dir first) or a resumed
    one (`load_resume_state`). `dataset`: the data already in memory (kept as RUN_DIR/data.npz, which
    config.data then names); otherwise config.data is read. Raises UserError / DataError on bad input,
    TrainingStopped when a signal stopped training (checkpoint saved)."""
    from training.runlock import hold_run_lock

    run_dir = Path(run_dir)
    echo = echo or logger.info
    if resume_state is not None and is_finished(resume_state):
        echo(f"{run_dir}: training already finished (stage3.pt); nothing to resume")
        return TrainResult(run_dir, config, already_finished=True)
    # Only the main process of a torchrun job holds the lock (the others share its run folder). It is
    # released when training ends however it ends, so the same Python process can resume the run.
    run_lock = hold_run_lock(run_dir) if os.environ.get("RANK", "0") == "0" else None
    try:
        return _train_locked(config, run_dir, resume_state, overwrite, dataset, show_progress, echo, on_epoch)
    finally:
        if run_lock is not None:
            run_lock.close()


def _train_locked(
    config: TrainConfig,
    run_dir: Path,
    resume_state: dict[str, Any] | None,
    overwrite: bool,
    dataset: ImageDataset | None,
    show_progress: bool | None,
    echo: Callable[[str], None],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    from training.augment import get_preset
    from training.embedding import embed_images
    from training.runs import write_embedding
    from training.trainer import StagedTrainer

    get_preset(config.augmentation)  # unknown preset: fail before reading any data
    runtime, dist_info = _start_runtime(config)
    in_memory = dataset is not None
    if dataset is None:
        dataset = load_dataset(
            config.data, config.image_size, config.resize_method, config.skip_bad, config.allow_upscale
        )
    if dataset.skipped:
        logger.warning(f"skipped {len(dataset.skipped)} unreadable image(s), first: {dataset.skipped[0]}")
    if resume_state is None:
        config = _create_run_folder(config, run_dir, dataset, overwrite, dist_info, in_memory)
    if dist_info.is_main:
        echo(_describe(dataset, runtime, dist_info, config))
    trainer = StagedTrainer(
        config, dataset, run_dir, runtime, dist_info, resume_state, show_progress=show_progress, echo=echo,
        on_epoch=on_epoch,
    )  # fmt: skip
    if resume_state is None and config.time_budget_s is not None:
        trainer.plan_time_budget(config.time_budget_s)  # the epochs, into config.json and budget.json
    summary = trainer.run()
    config, plan = trainer.config, trainer.budget_plan  # (the budget's plan as last re-planned)
    shutdown(dist_info)
    if summary.stopped_early:
        raise TrainingStopped(run_dir)
    result = TrainResult(run_dir, config, summary.seconds, summary.final_loss, plan, is_main=dist_info.is_main)
    if dist_info.is_main:
        result.coords, _ = embed_images(trainer.model, dataset.images, runtime.device)
        write_embedding(run_dir, result.coords, dataset, "stage3.pt")
        result.dataset, result.model = dataset, trainer.model
    return result


def _start_runtime(config: TrainConfig) -> tuple[Runtime, DistInfo]:
    """The device and precision to train with; under torchrun, this process's place in the job."""
    runtime = resolve_runtime(config.device, config.precision, config.channels_last, compile=config.compile)
    dist_info = init_from_env(runtime.device.type == "cuda")
    if dist_info.enabled and runtime.device.type == "cuda":
        runtime = resolve_runtime(
            config.device, config.precision, config.channels_last, dist_info.local_rank, config.compile
        )
    return runtime, dist_info


def _create_run_folder(
    config: TrainConfig, run_dir: Path, dataset: ImageDataset, overwrite: bool, dist_info: DistInfo, in_memory: bool
) -> TrainConfig:
    """The new run's folder with config.json (the data's size filled in), skipped.json, and the data
    itself when it came from memory. Replaced (--overwrite) only now that the new data has been read."""
    config = config.model_copy(update={"image_size": dataset.size})
    if dataset.resize_method is not None:  # a store: its images were resized so; serving must do the same
        config = config.model_copy(update={"resize_method": dataset.resize_method})
    if in_memory:
        config = config.model_copy(update={"data": str((run_dir / DATA_FILE).resolve())})
    if dist_info.is_main:
        if run_dir.exists() and overwrite:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if in_memory:
            save_dataset(dataset, run_dir / DATA_FILE)
        atomic_write_json(run_dir / "config.json", config.model_dump(mode="json"))
        if dataset.skipped:
            atomic_write_json(run_dir / "skipped.json", dataset.skipped)
    return config


def _describe(dataset: ImageDataset, runtime: Runtime, dist_info: DistInfo, config: TrainConfig) -> str:
    labels = f", {len(dataset.class_names)} classes" if dataset.labels is not None else ", no labels"
    return (
        f"data: {len(dataset):,} images of {dataset.size[0]}x{dataset.size[1]} from {dataset.source}{labels}\n"
        f"device: {runtime.describe()}"
        + (f", {dist_info.world_size} processes" if dist_info.enabled else "")
        + (f", BatchNorm {'synchronised' if config.sync_bn else 'per process'}" if dist_info.enabled else "")
    )
