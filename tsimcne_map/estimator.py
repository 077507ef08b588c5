"""`TSimCNE`: train a t-SimCNE map of an image collection, place new images on it, export it (needs torch).

    from tsimcne_map import TSimCNE
    model = TSimCNE("cpu", time_budget="10m")          # a recipe, and any training setting overridden
    coords = model.fit_transform(images, labels)        # (N, 2) float32: the map of the training images
    new_coords = model.transform(new_images)            # (M, 2): new images placed on the same map
    model.evaluate(); model.plot(); bundle = model.export("models/cells")

Every fit writes a run folder (checkpoints, config, log, the map) like `tsimcne train`, so a run made
here is evaluated, plotted, exported or resumed with the CLI too, and the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.augment import get_preset
from training.budget import parse_budget
from training.config import RECIPES, TrainConfig, build_config
from training.data import ImageDataset, dataset_from_arrays, dataset_from_files, parse_size
from training.run_training import (
    TrainResult,
    check_new_run_dir,
    load_resume_state,
    train_run,
)
from tsimcne_core.bundle_format import Preprocessing
from tsimcne_core.errors import DataError, UserError
from tsimcne_core.preprocess import to_model_input
from tsimcne_map._inputs import collect_images
from tsimcne_map.bundle import Bundle

logger = logging.getLogger("tsimcne")
SETTINGS = tuple(name for name in TrainConfig.model_fields if name != "data")
ALIASES = {"lr": "base_lr", "time_budget": "time_budget_s"}
_DATA_PLACEHOLDER = "(the images given to fit)"


class TSimCNE:
    """A t-SimCNE map: a ResNet trained in three stages (128-D contrastive pre-training, a 2-D output
    layer, fine-tuning) whose 2-D output *is* the map, so new images can be placed on it.

    recipe: named defaults: "cpu" (default: a width-16 network trained for a 30-minute time budget on
        whatever CPU it runs on), "reference" (the paper, GPU-sized), "demo", "tiny" (seconds; tests).
    run_dir: the run folder to write (checkpoints, config.json, log.jsonl, embedding.npz); default
        runs/tsimcne-<date>-<time> under the working directory. It must not exist unless `overwrite`.
    progress: progress bars while reading data and training (tqdm: a notebook widget in Jupyter).
    callback: called with each finished epoch's record (stage, epoch, loss, lr, images_per_s, seconds).
    echo: where progress messages go (stage starts, epoch lines, the budget plan); default: the
        "tsimcne" logger at INFO (`logging.basicConfig(level="INFO")` shows them), e.g. `echo=print`.
    **settings: any training setting of training/config.py TrainConfig, overriding the recipe, e.g.
        epochs=(30, 5, 10), time_budget="10m" (or seconds), image_size=28 (or (H, W) or "64x48"),
        batch_size=256, lr=0.05, augmentation="microscopy", width=16, device="cuda", seed=1.

    Errors are exceptions that say what was wrong: UserError (bad settings, a refused operation) and its
    DataError (unreadable data, naming the file); TrainingStopped when Ctrl-C / a notebook interrupt
    stopped training (its checkpoint is saved: `TSimCNE.resume(run_dir)` continues it).

    Fitted attributes: run_dir_, config_ (TrainConfig), embedding_ (N, 2), labels_ (N,) or None,
    class_names_, ids_, and result_ (seconds, final loss, budget plan) after fit or resume.
    """

    def __init__(
        self,
        recipe: str = "cpu",
        *,
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        progress: bool | None = True,
        callback: Callable[[dict[str, Any]], None] | None = None,
        echo: Callable[[str], None] | None = None,
        **settings: Any,
    ) -> None:
        if recipe not in RECIPES:
            build_config(recipe, {})  # raises the UserError listing the recipes
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.overwrite = overwrite
        self.progress = progress
        self.callback = callback
        self.echo = echo
        self.settings = _config_values(settings)
        config = build_config(recipe, {**self.settings, "data": _DATA_PLACEHOLDER})  # bad settings fail here
        get_preset(config.augmentation)
        self._forget()

    def _forget(self) -> None:
        """No fitted state (yet)."""
        self.run_dir_: Path | None = None
        self.config_: TrainConfig | None = None
        self.result_: TrainResult | None = None
        self._model = None
        self._embedding: dict[str, Any] | None = None

    def __repr__(self) -> str:
        where = f", run_dir_={str(self.run_dir_)!r}" if self.run_dir_ is not None else ""
        settings = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return f"TSimCNE({self.recipe!r}{settings}{where})"

    # ------------------------------------------------------------------------------------ training
    def fit(self, images: Any, labels: Iterable[Any] | None = None, *, ids: Iterable[str] | None = None) -> TSimCNE:
        """Train the map on `images`; returns self.

        images: uint8 arrays (N, H, W, 3), grayscale (N, H, W) or (N, H, W, 1|4) (16-bit and float in
            [0, 1] are scaled), a list of image file paths, or a data source as the CLI reads it: a
            folder (one sub-folder per class, or flat), a .npz, a .csv manifest, "synthetic:N", or a
            store written by `tsimcne prepare` (memory-mapped: training streams it with bounded memory).
            Arrays and file lists are kept in the run folder (data.npz) so the run can be resumed and
            exported without them. All images are brought to one size: `image_size`, or their own.
        labels: one per image (ints or class names), for arrays and file lists; a folder, .npz or .csv
            carries its own. Labels only colour the plot and are scored by `evaluate`: training never
            sees them.
        ids: a name per image for arrays (default: the index).
        """
        config = build_config(self.recipe, {**self.settings, "data": _DATA_PLACEHOLDER})
        spec, dataset = _training_data(images, labels, ids, config)
        config = config.model_copy(update={"data": spec})
        run_dir = self.run_dir if self.run_dir is not None else _default_run_dir()
        check_new_run_dir(run_dir, self.overwrite)
        result = train_run(
            config,
            run_dir,
            overwrite=self.overwrite,
            dataset=dataset,
            show_progress=self.progress,
            echo=self.echo,
            on_epoch=self.callback,
        )
        self._adopt(result)
        return self

    def fit_transform(
        self, images: Any, labels: Iterable[Any] | None = None, *, ids: Iterable[str] | None = None
    ) -> np.ndarray:
        """fit, then the map of the training images: float32 (N, 2), in the order given."""
        return self.fit(images, labels, ids=ids).embedding_

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        device: str | None = None,
        precision: str | None = None,
        channels_last: str | None = None,
        compile: str | None = None,
        progress: bool | None = True,
        callback: Callable[[dict[str, Any]], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> TSimCNE:
        """Continue a stopped or killed run from its last checkpoint to the end (exactly where it stopped:
        the result equals an uninterrupted run's); a finished run is only opened. Only the runtime
        settings may change (device, precision, channels_last, compile)."""
        runtime = {"device": device, "precision": precision, "channels_last": channels_last, "compile": compile}
        config, state = load_resume_state(Path(run_dir), runtime)
        model = cls._opened(Path(run_dir), config, progress=progress, callback=callback, echo=echo)
        result = train_run(
            config, Path(run_dir), resume_state=state, show_progress=progress, echo=echo, on_epoch=callback
        )
        if not result.already_finished:
            model._adopt(result)
        return model

    @classmethod
    def load(cls, run_dir: str | Path) -> TSimCNE:
        """Open an existing run folder (made by fit or `tsimcne train`) without training."""
        from training.checkpoint import load_checkpoint
        from training.runs import final_checkpoint_path

        state = load_checkpoint(final_checkpoint_path(Path(run_dir)))
        return cls._opened(Path(run_dir), TrainConfig(**state["config"]))

    @classmethod
    def _opened(
        cls,
        run_dir: Path,
        config: TrainConfig,
        progress: bool | None = True,
        callback: Callable[[dict[str, Any]], None] | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> TSimCNE:
        """An estimator for an existing run: its settings are the run's config (config_), not a recipe."""
        model = cls.__new__(cls)
        model.recipe, model.settings, model.run_dir, model.overwrite = "(from the run folder)", {}, run_dir, False
        model.progress, model.callback, model.echo = progress, callback, echo
        model._forget()
        model.run_dir_, model.config_ = run_dir, config
        return model

    def _adopt(self, result: TrainResult) -> None:
        self.result_ = result
        self.run_dir_, self.config_ = result.run_dir, result.config
        self._model = result.model
        self._embedding = None
        if result.coords is not None and result.dataset is not None:
            dataset = result.dataset
            self._embedding = {
                "coords": result.coords.astype(np.float32),
                "labels": dataset.labels,
                "class_names": list(dataset.class_names),
                "ids": list(dataset.ids),
            }

    # ------------------------------------------------------------------------------- the fitted map
    def _run(self) -> Path:
        if self.run_dir_ is None:
            raise UserError("this TSimCNE is not fitted yet: call fit(images) first, or TSimCNE.load(run_dir)")
        return self.run_dir_

    def _saved_map(self) -> dict[str, Any]:
        if self._embedding is None:
            from training.runs import read_embedding

            saved = read_embedding(self._run())
            if saved is None:
                raise UserError(f"{self._run()}: no embedding.npz yet; it is written when training finishes")
            self._embedding = {
                "coords": saved["coords"].astype(np.float32),
                "labels": saved.get("labels"),
                "class_names": [str(c) for c in saved["class_names"]],
                "ids": [str(i) for i in saved["ids"]],
            }
        return self._embedding

    @property
    def embedding_(self) -> np.ndarray:
        """The map of the training images: float32 (N, 2)."""
        return self._saved_map()["coords"]

    @property
    def labels_(self) -> np.ndarray | None:
        """The training images' labels as indices into class_names_ (int64 (N,)), or None."""
        return self._saved_map()["labels"]

    @property
    def class_names_(self) -> list[str]:
        return self._saved_map()["class_names"]

    @property
    def ids_(self) -> list[str]:
        return self._saved_map()["ids"]

    def _network(self):
        """The trained network (the final checkpoint), fp32, eval mode."""
        if self._model is None:
            from training.checkpoint import load_checkpoint
            from training.runs import final_checkpoint_path, model_from_state

            self._model = model_from_state(load_checkpoint(final_checkpoint_path(self._run())))
        return self._model.float().eval()

    def _preprocessing(self) -> Preprocessing:
        assert self.config_ is not None and self.config_.image_size is not None
        height, width = self.config_.image_size
        return Preprocessing(height=height, width=width, resize_method=self.config_.resize_method)

    def transform(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Place new images on the map: float32 (N, 2), in the order given.

        images: file paths and/or arrays (any size; RGB, grayscale or RGBA), an (N, H, W[, C]) array, a
        folder, or a data spec. Each image is resized to the training size exactly as the exported
        bundle's preprocessing does, so the result equals `tsimcne embed` / `Bundle.place` on the export
        within the export's parity tolerance (1e-4 x max(1, max |coordinate|)). Runs on the device the
        network is on (the training device after fit; the CPU after load).
        """
        import torch

        self._run()
        items = collect_images(images)
        network = self._network()
        device = next(network.parameters()).device
        prep = self._preprocessing()
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                batch = to_model_input([item.decode() for item in chunk], prep)  # as Placer.prepare does
                coords, _ = network(torch.from_numpy(batch).to(device))
                chunks.append(coords.float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32)

    def evaluate(
        self,
        data: str | None = None,
        *,
        linear: bool = False,
        checkpoint: str | None = None,
        device: str = "auto",
        save: bool = True,
    ) -> dict[str, Any]:
        """How well the map separates the labelled classes: kNN accuracy (k = 15, 10 % stratified hold-out)
        and silhouette, as a dict (also n_images, n_classes, checkpoint, output_dim).

        data: another data source to place and score instead of the training data. linear: also a
        logistic-regression probe and kNN on the frozen backbone features ("linear_probe"). checkpoint:
        "stage1", "stage2", "stage3" or "last" (default: the final one). save: write metrics.json into
        the run (only for its own map: the final checkpoint on its training data), where plot and export
        pick it up.
        """
        from training.run_evaluation import evaluate_run

        return evaluate_run(self._run(), data=data, device=device, linear=linear, checkpoint=checkpoint, save=save)

    def plot(self, path: str | Path | None = None) -> Path:
        """Draw the map of the training images coloured by label to a PNG (default RUN_DIR/map.png; with
        the evaluation's figures once evaluate has run); returns its path (in Jupyter:
        `IPython.display.Image(model.plot())`)."""
        from training.plot import plot_run

        return plot_run(self._run(), Path(path) if path is not None else None)

    def export(
        self,
        path: str | Path,
        *,
        center_crop: int | tuple[int, int] | str | None = None,
        artefact_labels: Iterable[str] | None = None,
        calibration_data: str | Path | None = None,
        target_rate: float = 0.01,
        allow_partial: bool = False,
        reference: str | Path | None = None,
    ) -> Bundle:
        """Write a verified model bundle to `path` (a new folder) and open it: ONNX model (refused unless
        onnxruntime reproduces torch within 1e-4 x max(1, max |coordinate|)), the reference map, the flag's
        calibration, bundle.json with every file's sha256.

        center_crop: N, (H, W) or "HxW" when the training images were cut from larger originals; new raw
        images are then cut the same way. artefact_labels: classes that mean "artefact" (such neighbours
        flag an image `artefact`). calibration_data: >= 100 images of the same collection never trained
        on, to calibrate the flag (default: 10 % of the training images left out). target_rate: the share
        of clean images flagged (default 1 %). allow_partial: export a run that has not finished stage 3.
        reference: map this collection instead of the training images as the bundle's reference (a
        folder, .csv, .npz, or a store from `tsimcne prepare` at the run's image size), e.g. the whole
        archive when the network was trained on a subset of it.
        """
        from training.export import export_bundle

        if not 0.0001 <= target_rate <= 0.5:
            raise UserError(f"target_rate {target_rate}: give a rate between 0.0001 and 0.5")
        result = export_bundle(
            self._run(),
            Path(path),
            allow_partial=allow_partial,
            center_crop=parse_size(center_crop),
            artefact_labels=list(artefact_labels) if artefact_labels is not None else None,
            calibration_data=calibration_data,
            target_rate=target_rate,
            reference=reference,
        )
        return Bundle.open(result.out, provider="cpu")


def _config_values(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword settings -> TrainConfig values (aliases resolved, sizes and durations parsed)."""
    values: dict[str, Any] = {}
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in SETTINGS:
            known = ", ".join(sorted([*SETTINGS, *ALIASES]))
            raise UserError(f"unknown setting {key!r}; the settings are: {known}")
        if name == "image_size":
            value = parse_size(value)
        elif name == "time_budget_s" and isinstance(value, str):
            value = parse_budget(value)
        elif name in ("epochs", "warmup_epochs") and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return values


def _training_data(
    images: Any, labels: Iterable[Any] | None, ids: Iterable[str] | None, config: TrainConfig
) -> tuple[str, ImageDataset | None]:
    """(the data spec for config.json, the dataset when it is in memory)."""
    if isinstance(images, str | Path):
        if labels is not None or ids is not None:
            raise DataError(
                f"{images}: labels and ids come with a folder, .npz or .csv; give them only with arrays or file lists"
            )
        return str(images), None
    options = {"size": config.image_size, "resize_method": config.resize_method, "allow_upscale": config.allow_upscale}
    if isinstance(images, np.ndarray) or (
        isinstance(images, list | tuple) and images and all(isinstance(i, np.ndarray) for i in images)
    ):
        try:
            stacked = np.stack(images) if not isinstance(images, np.ndarray) else images
        except ValueError as exc:
            raise DataError(f"arrays of different shapes ({exc}); give images of one size, or file paths") from None
        return _DATA_PLACEHOLDER, dataset_from_arrays(stacked, labels, ids, **options)
    if isinstance(images, list | tuple) and images and all(isinstance(i, str | Path) for i in images):
        if ids is not None:
            raise DataError("ids: files are named by their paths")
        return _DATA_PLACEHOLDER, dataset_from_files(images, labels, skip_bad=config.skip_bad, **options)
    raise DataError(
        f"images of type {type(images).__name__}: give uint8 arrays (N, H, W, 3), a list of file paths, "
        "or a folder, .npz, .csv or 'synthetic:N'"
    )


def _default_run_dir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, number = Path("runs") / f"tsimcne-{stamp}", 1
    while run_dir.exists():
        number += 1
        run_dir = Path("runs") / f"tsimcne-{stamp}-{number}"
    return run_dir
