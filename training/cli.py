"""`tsimcne` command line: train, evaluate, plot, presets, synth.

Thin on purpose: parse, validate, print, and call library functions (which tests call directly).
Bad input ends with `error: <what and where>` and exit code 2, never a traceback; Ctrl-C during
training saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from training.errors import UserError

app = typer.Typer(
    name="tsimcne",
    help="Map microscopy image collections with t-SimCNE.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError and config validation errors into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise _fail(str(exc)) from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise _fail(f"invalid settings: {problems}") from None
        except KeyError as exc:  # unknown preset / recipe names
            raise _fail(str(exc.args[0]) if exc.args else str(exc)) from None

    return wrapper


def _parse_triple(text: str | None, what: str, cast: Callable[[str], Any] = int) -> tuple | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3:
        raise UserError(f"{what} {text!r}: give three comma-separated values, one per stage, e.g. 1000,50,450")
    try:
        return tuple(cast(p) for p in parts)
    except ValueError as exc:
        raise UserError(f"{what} {text!r}: {exc}") from exc


@app.command()
@user_errors
def train(
    data: Annotated[str | None, typer.Option(help="folder, .npz, .csv manifest, or synthetic[:N]")] = None,
    name: Annotated[str | None, typer.Option(help="run name: results go to RUNS_DIR/NAME")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder from its last.pt")] = None,
    runs_dir: Annotated[Path, typer.Option(help="parent folder of runs")] = Path("runs"),
    recipe: Annotated[str, typer.Option(help="named defaults: reference, cpu, demo, tiny")] = "reference",
    image_size: Annotated[str | None, typer.Option(help="N or HxW; default: the data's own size")] = None,
    augmentation: Annotated[str | None, typer.Option(help="augmentation preset (see `tsimcne presets`)")] = None,
    width: Annotated[int | None, typer.Option(help="ResNet-18 base width (64 = reference)")] = None,
    stem_stride: Annotated[
        int | None, typer.Option(help="first conv stride: 1 = reference, 2 = a quarter of the compute")
    ] = None,
    epochs: Annotated[str | None, typer.Option(help="epochs per stage, e.g. 1000,50,450")] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="train for this long (e.g. 30m, 2h): epochs are planned from timed steps")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per step")] = None,
    lr: Annotated[float | None, typer.Option(help="stage 1/2 learning rate (default 0.03 * batch / 256)")] = None,
    stage3_lr_factor: Annotated[float | None, typer.Option(help="stage 3 lr as a fraction of lr")] = None,
    metric: Annotated[str | None, typer.Option(help="cauchy (t-SimCNE) or cosine (SimCLR)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32")] = None,
    channels_last: Annotated[str | None, typer.Option(help="auto, on or off")] = None,
    compile: Annotated[str | None, typer.Option(help="torch.compile the network: auto (CUDA only), on, off")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    sync_bn: Annotated[
        bool | None, typer.Option(help="under torchrun: BatchNorm statistics over all processes (default on)")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="epochs between periodic checkpoints")] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="skip unreadable images (and report them) instead of stopping")
    ] = False,
    allow_upscale: Annotated[bool, typer.Option(help="allow images smaller than --image-size")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder of the same name")] = False,
    progress: Annotated[bool | None, typer.Option(help="progress bars (default: when on a terminal)")] = None,
) -> None:
    """Train t-SimCNE through its three stages, writing checkpoints to RUNS_DIR/NAME."""
    from serving.files import atomic_write_json
    from training.budget import parse_budget
    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig, build_config
    from training.data import load_dataset, parse_size
    from training.device import resolve_runtime
    from training.distributed import init_from_env, shutdown
    from training.embedding import embed_images
    from training.runs import write_embedding
    from training.trainer import StagedTrainer, format_seconds

    resume_state = None
    if resume is not None:
        fixed = {"data": data, "name": name, "image_size": image_size, "epochs": epochs, "time_budget": time_budget}
        given = [k.replace("_", "-") for k, v in fixed.items() if v]
        if given:
            raise UserError(
                f"--resume continues a run with its saved settings; drop {', '.join('--' + g for g in given)}"
            )
        run_dir = Path(resume)
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"{run_dir}: nothing to resume (no last.pt); the run stopped before its first checkpoint")
        resume_state = load_checkpoint(run_dir / "last.pt")
        settings = dict(resume_state["config"])
        runtime_options = {"device": device, "precision": precision, "channels_last": channels_last, "compile": compile}
        for key, value in runtime_options.items():
            if value is not None:
                settings[key] = value
        config = TrainConfig(**settings)
        if resume_state["position"]["stage"] > 3:
            typer.echo(f"{run_dir}: training already finished (stage3.pt); nothing to resume")
            return
    else:
        if data is None or name is None:
            raise UserError("give --data and --name for a new run, or --resume RUN_DIR to continue one")
        run_dir = runs_dir / name
        if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
            raise UserError(
                f"{run_dir} already exists; continue it with --resume {run_dir}, choose another --name, "
                "or pass --overwrite to replace it"
            )
        overrides = {
            "data": data,
            "image_size": parse_size(image_size),
            "augmentation": augmentation,
            "width": width,
            "stem_stride": stem_stride,
            "epochs": _parse_triple(epochs, "--epochs"),
            "time_budget_s": parse_budget(time_budget),
            "batch_size": batch_size,
            "base_lr": lr,
            "stage3_lr_factor": stage3_lr_factor,
            "metric": metric,
            "device": device,
            "precision": precision,
            "channels_last": channels_last,
            "compile": compile,
            "seed": seed,
            "sync_bn": sync_bn,
            "checkpoint_every": checkpoint_every,
            "skip_bad": skip_bad or None,
            "allow_upscale": allow_upscale or None,
        }
        config = build_config(recipe, overrides)
    from training.augment import get_preset
    from training.runlock import hold_run_lock

    # Only the main process of a torchrun job holds the lock (the others share its run folder).
    run_lock = hold_run_lock(run_dir) if os.environ.get("RANK", "0") == "0" else None  # noqa: F841 (held)
    get_preset(config.augmentation)  # unknown preset: fail before reading any data
    runtime = resolve_runtime(config.device, config.precision, config.channels_last, compile=config.compile)
    dist_info = init_from_env(runtime.device.type == "cuda")
    if dist_info.enabled and runtime.device.type == "cuda":
        runtime = resolve_runtime(
            config.device, config.precision, config.channels_last, dist_info.local_rank, config.compile
        )
    dataset = load_dataset(config.data, config.image_size, config.resize_method, config.skip_bad, config.allow_upscale)
    if dataset.skipped:
        typer.echo(f"skipped {len(dataset.skipped)} unreadable image(s), first: {dataset.skipped[0]}", err=True)
    if resume_state is None:
        config = config.model_copy(update={"image_size": dataset.size})
        if dist_info.is_main:
            if run_dir.exists() and overwrite:
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", config.model_dump(mode="json"))
            if dataset.skipped:
                atomic_write_json(run_dir / "skipped.json", dataset.skipped)
    if dist_info.is_main:
        labels = f", {len(dataset.class_names)} classes" if dataset.labels is not None else ", no labels"
        typer.echo(
            f"data: {len(dataset):,} images of {dataset.size[0]}x{dataset.size[1]} from {dataset.source}{labels}\n"
            f"device: {runtime.describe()}"
            + (f", {dist_info.world_size} processes" if dist_info.enabled else "")
            + (f", BatchNorm {'synchronised' if config.sync_bn else 'per process'}" if dist_info.enabled else "")
        )
    trainer = StagedTrainer(config, dataset, run_dir, runtime, dist_info, resume_state, show_progress=progress)
    if resume_state is None and config.time_budget_s is not None:
        plan = trainer.plan_time_budget(config.time_budget_s)
        config = trainer.config
        if dist_info.is_main:
            typer.echo(plan.describe())
            atomic_write_json(run_dir / "config.json", config.model_dump(mode="json"))
            atomic_write_json(run_dir / "budget.json", plan.as_dict())
    summary = trainer.run()
    shutdown(dist_info)
    if summary.stopped_early:
        typer.echo(f"stopped; continue with: tsimcne train --resume {run_dir}", err=True)
        raise typer.Exit(130)
    if not dist_info.is_main:
        return
    coords, _ = embed_images(trainer.model, dataset.images, runtime.device)
    write_embedding(run_dir, coords, dataset, "stage3.pt")
    loss = f", final loss {summary.final_loss:.4f}" if summary.final_loss is not None else ""
    typer.echo(f"done in {format_seconds(summary.seconds)}{loss}: {run_dir}/stage3.pt, map in {run_dir}/embedding.npz")


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a run folder")],
    data: Annotated[str | None, typer.Option(help="evaluate on other data instead of the training set")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    linear: Annotated[
        bool, typer.Option(help="also a linear probe (logistic regression) and kNN on the frozen backbone features")
    ] = False,
    checkpoint: Annotated[
        str | None, typer.Option(help="stage1, stage2, stage3 or last (default: the final one)")
    ] = None,
) -> None:
    """kNN accuracy (k=15, 10 % stratified hold-out) and silhouette of the 2-D map; writes metrics.json."""
    from serving.files import atomic_write_json
    from training.run_evaluation import evaluate_run

    report = evaluate_run(run_dir, data=data, device=device, linear=linear, checkpoint=checkpoint)
    if report["output_dim"] != 2:
        typer.echo(f"note: {report['checkpoint']} has a {report['output_dim']}-D output, not the 2-D map", err=True)
    if data is None and checkpoint is None:
        atomic_write_json(Path(run_dir) / "metrics.json", report)
    typer.echo(
        f"kNN accuracy (k=15, 10% hold-out): {report['knn_accuracy']:.3f}   silhouette: {report['silhouette']:.3f}   "
        f"({report['n_images']:,} images, {report['n_classes']} classes, {report['checkpoint']})"
    )
    if linear:
        probe = report["linear_probe"]
        typer.echo(
            f"backbone features ({probe['n_features']}-D), {probe['split']} split, {probe['n_test']:,} test images: "
            f"linear probe {probe['linear_accuracy']:.3f}, kNN {probe['knn_accuracy']:.3f}"
        )


@app.command()
@user_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="a run folder")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN_DIR/map.png)")] = None,
) -> None:
    """Draw the 2-D map of the training images, coloured by label."""
    from training.plot import plot_map
    from training.runs import read_embedding, require_run_dir

    require_run_dir(run_dir)
    saved = read_embedding(run_dir)
    if saved is None:
        raise UserError(f"{run_dir}: no embedding.npz yet; it is written when training finishes")
    coords = saved["coords"]
    if coords.shape[1] < 2:
        raise UserError(f"{run_dir}: the map is {coords.shape[1]}-D; plotting needs 2-D")
    metrics_file = Path(run_dir) / "metrics.json"
    subtitle = ""
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        subtitle = f"kNN accuracy {metrics['knn_accuracy']:.3f}, silhouette {metrics['silhouette']:.3f}"
    target = out or Path(run_dir) / "map.png"
    plot_map(
        coords[:, :2],
        saved.get("labels"),
        [str(c) for c in saved["class_names"]],
        target,
        title=f"t-SimCNE map of {Path(run_dir).name} ({len(coords):,} images)",
        subtitle=subtitle,
    )
    typer.echo(f"map written to {target}")


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder")],
    out: Annotated[Path, typer.Option(help="bundle folder to create, e.g. models/NAME")],
    allow_partial: Annotated[bool, typer.Option(help="export a run that has not finished stage 3")] = False,
    center_crop: Annotated[
        str | None, typer.Option(help="N or HxW: crop new raw images to their centre first, as the training data was")
    ] = None,
    artefact_label: Annotated[
        list[str] | None, typer.Option(help="a class that means 'artefact' (repeatable); the service flags it")
    ] = None,
    calibration_data: Annotated[
        str | None,
        typer.Option(help="images of the same collection never used in training, to calibrate the flag on"),
    ] = None,
    target_rate: Annotated[
        float, typer.Option(help="false-flag rate the flag is calibrated to on clean images", min=0.0001, max=0.5)
    ] = 0.01,
    register: Annotated[
        bool, typer.Option(help="also add the bundle to BentoML's model store (for `bentoml build`)")
    ] = False,
) -> None:
    """Turn a run's final checkpoint into a verified model bundle (ONNX + reference map + bundle.json)."""
    from training.data import parse_size
    from training.export import export_bundle

    result = export_bundle(
        run_dir,
        out,
        allow_partial=allow_partial,
        center_crop=parse_size(center_crop),
        artefact_labels=artefact_label,
        calibration_data=calibration_data,
        target_rate=target_rate,
    )
    parity = result.manifest.parity
    typer.echo(
        f"bundle written to {result.out}: parity max |onnxruntime - torch| = {parity['max_abs_diff']:.2e} "
        f"(allowed {parity['allowed']:.2e}) on {parity['images']} training images"
        + (" [partial: stage 3 not finished]" if result.manifest.partial else "")
    )
    if register:
        from serving.store import register_bundle

        try:
            tag = register_bundle(result.out)
        except Exception as exc:  # the bundle itself is written; say so and why the store refused it
            raise UserError(f"bundle written to {result.out}, but BentoML's model store refused it: {exc}") from exc
        typer.echo(f"registered in BentoML's model store as {tag} (serve it with --arg model_tag={tag})")


@app.command()
@user_errors
def embed(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder made by `tsimcne export`")],
    images: Annotated[list[Path] | None, typer.Argument(help="image files to place on the map")] = None,
    data: Annotated[Path | None, typer.Option(help="a folder of images (searched recursively) instead")] = None,
    out: Annotated[Path, typer.Option(help="output table: .csv or .parquet")] = Path("coords.csv"),
    provider: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    neighbours: Annotated[int, typer.Option(help="nearest reference images to report")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per onnxruntime run")] = 64,
) -> None:
    """Place images on a bundle's map offline (onnxruntime); unreadable files are reported, not fatal."""
    import dataclasses

    from tqdm import tqdm

    from serving.bundle import BundleError
    from serving.embedder import BundleEmbedder
    from serving.images import IMAGE_SUFFIXES, ImageDecodeError, read_image
    from training.table import write_table

    files = list(images or [])
    if data is not None:
        if not data.is_dir():
            raise UserError(f"{data}: not a folder")
        files += sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError("no images given: pass image files or --data FOLDER")
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"{out}: the output must end in .csv or .parquet")
    try:
        embedder = BundleEmbedder(bundle, provider, neighbours)
    except BundleError as exc:
        raise UserError(str(exc)) from None
    rows: list[dict] = []
    failures = 0
    for start in tqdm(range(0, len(files), batch_size), desc="embedding", unit="batch", disable=None):
        chunk, decoded = files[start : start + batch_size], []
        for path in chunk:
            try:
                decoded.append((path, read_image(path)))
            except ImageDecodeError as exc:
                failures += 1
                typer.echo(f"skipped: {exc}", err=True)
                rows.append({"id": str(path), "error": str(exc)})
        if decoded:
            for (path, _), placed in zip(decoded, embedder.place([image for _, image in decoded]), strict=True):
                fields = dataclasses.asdict(placed)
                evidence = {f"evidence_{name}": value for name, value in fields.pop("evidence").items()}
                twin = fields.pop("duplicate_of")
                duplicate_of = str(decoded[twin][0]) if twin is not None else ""
                rows.append({"id": str(path), **fields, **evidence, "duplicate_of": duplicate_of, "error": ""})
    first = ["id", "x", "y", "flag", "score", "majority_label", "majority_share", "neighbour_ids", "neighbour_labels"]
    write_table(rows, out, columns=[*first, "neighbour_distances", "error"])
    typer.echo(
        f"placed {len(files) - failures} of {len(files)} image(s) on {bundle} ({embedder.provider}); "
        f"{failures} unreadable; table written to {out}"
    )
    if failures == len(files):
        raise typer.Exit(2)


@app.command()
def presets() -> None:
    """List the augmentation presets and the training recipes."""
    from training.augment import MODIFIERS, PRESETS
    from training.config import RECIPE_NOTES

    typer.echo("augmentation presets (--augmentation):")
    for preset in PRESETS.values():
        typer.echo(f"  {preset.name:<12} {preset.description}")
    typer.echo("switches, added with commas (--augmentation microscopy,no-crop):")
    for switch, (description, _) in MODIFIERS.items():
        typer.echo(f"  {switch:<12} {description}")
    typer.echo("training recipes (--recipe):")
    for name, note in RECIPE_NOTES.items():
        typer.echo(f"  {name:<12} {note}")


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="folder (class sub-folders of PNGs) or a .npz file")],
    n: Annotated[int, typer.Option(help="number of images")] = 2400,
    size: Annotated[str, typer.Option(help="N or HxW")] = "32",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write the synthetic cell dataset (the project's demo data) as PNG folders or an npz."""
    import numpy as np
    from PIL import Image

    from serving.files import atomic_write
    from training.data import parse_size
    from training.synthetic import make_synthetic_cells

    if n < 1:
        raise UserError(f"--n must be positive, got {n}")
    images, labels, names = make_synthetic_cells(n, parse_size(size), seed=seed)
    if out.suffix == ".npz":

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, images=images, labels=labels, class_names=np.array(names))

        atomic_write(out, write)
    else:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty; choose another folder")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = out / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:06d}.png")
    typer.echo(f"wrote {n} synthetic images ({len(names)} classes) to {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
