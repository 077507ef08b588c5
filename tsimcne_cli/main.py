"""`tsimcne` command line: prepare, train, evaluate, plot, export, embed, presets, synth.

A thin shell over the Python API (tsimcne_map: TSimCNE, Bundle): it parses options, prints, and maps
exceptions to exit codes. Bad input ends with `error: <what and where>` and exit code 2, never a
traceback; Ctrl-C during training saves a checkpoint and exits with 130. The library's progress messages
arrive through the "tsimcne" logger: INFO on stdout, warnings on stderr.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tsimcne_cli.journal_commands import journal_app
from tsimcne_core.errors import TrainingStopped, UserError, invalid_settings

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
    """The library's errors as one clear line and exit code 2 (a stopped training run: 130)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        from tsimcne_core.bundle_format import BundleError
        from tsimcne_core.images import ImageDecodeError

        try:
            return command(*args, **kwargs)
        except TrainingStopped as exc:
            raise _fail(f"stopped; continue with: tsimcne train --resume {exc.run_dir}", 130) from None
        except (UserError, BundleError, ImageDecodeError) as exc:
            raise _fail(str(exc)) from None
        except ValidationError as exc:
            raise _fail(str(invalid_settings(exc))) from None

    return wrapper


class _EchoHandler(logging.Handler):
    """The library's messages as plain lines: INFO on stdout, warnings on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(record.getMessage(), err=record.levelno >= logging.WARNING)


def _show_library_messages() -> None:
    library = logging.getLogger("tsimcne")
    if not any(isinstance(handler, _EchoHandler) for handler in library.handlers):
        library.addHandler(_EchoHandler())
    library.setLevel(logging.INFO)
    library.propagate = False


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
def prepare(
    source: Annotated[str, typer.Argument(help="folder, .npz, .csv manifest, or synthetic[:N]")],
    out: Annotated[Path, typer.Option(help="store folder to create")],
    image_size: Annotated[
        str | None, typer.Option(help="N or HxW: the training size (default: the images' own, one size for all)")
    ] = None,
    resize_method: Annotated[str, typer.Option(help="bicubic, bilinear, nearest, lanczos or area")] = "bicubic",
    skip_bad: Annotated[
        bool, typer.Option(help="skip unreadable images (listed in STORE/skipped.json) instead of stopping")
    ] = False,
    allow_upscale: Annotated[bool, typer.Option(help="allow images smaller than --image-size")] = False,
    workers: Annotated[int | None, typer.Option(help="decoding threads (default: 2 per usable core, 2-16)")] = None,
    progress: Annotated[bool | None, typer.Option(help="progress bar (default: when on a terminal)")] = None,
) -> None:
    """Decode a collection once into an on-disk store (memory-mapped by train, evaluate and export)."""
    from training.data import format_bytes
    from training.image_store import prepare_store  # torch-free: importing torch alone costs ~800 MB of memory
    from tsimcne_core.images import RESIZE_FILTERS

    if resize_method not in RESIZE_FILTERS:
        raise UserError(f"--resize-method {resize_method!r}: choose one of {', '.join(RESIZE_FILTERS)}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    store = prepare_store(source, out, image_size, resize_method, skip_bad, allow_upscale, workers, progress)
    for problem in store.skipped[:5]:
        typer.echo(f"skipped: {problem}", err=True)
    more = f" ({len(store.skipped)} unreadable skipped, listed in {out}/skipped.json)" if store.skipped else ""
    typer.echo(
        f"store written to {store.path}: {store.n_images:,} images of {store.image_size[0]}x{store.image_size[1]} "
        f"({format_bytes(store.bytes)}) in {store.seconds:,.1f} s{more}; use it as --data {store.path}"
    )


@app.command()
@user_errors
def train(
    data: Annotated[
        str | None, typer.Option(help="folder, .npz, .csv manifest, a store (tsimcne prepare), or synthetic[:N]")
    ] = None,
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
    from training.trainer import format_seconds
    from tsimcne_map import TSimCNE

    runtime = {"device": device, "precision": precision, "channels_last": channels_last, "compile": compile}
    if resume is not None:
        fixed = {"data": data, "name": name, "image_size": image_size, "epochs": epochs, "time_budget": time_budget}
        given = [k.replace("_", "-") for k, v in fixed.items() if v]
        if given:
            raise UserError(
                f"--resume continues a run with its saved settings; drop {', '.join('--' + g for g in given)}"
            )
        model = TSimCNE.resume(resume, progress=progress, **runtime)
    else:
        if data is None or name is None:
            raise UserError("give --data and --name for a new run, or --resume RUN_DIR to continue one")
        settings = {
            **runtime,
            "image_size": image_size,
            "augmentation": augmentation,
            "width": width,
            "stem_stride": stem_stride,
            "epochs": _parse_triple(epochs, "--epochs"),
            "time_budget": time_budget,
            "batch_size": batch_size,
            "lr": lr,
            "stage3_lr_factor": stage3_lr_factor,
            "metric": metric,
            "seed": seed,
            "sync_bn": sync_bn,
            "checkpoint_every": checkpoint_every,
            "skip_bad": skip_bad or None,
            "allow_upscale": allow_upscale or None,
        }
        given_settings = {key: value for key, value in settings.items() if value is not None}
        model = TSimCNE(recipe, run_dir=runs_dir / name, overwrite=overwrite, progress=progress, **given_settings)
        model.fit(data)
    result = model.result_
    if result is None or not result.is_main:  # nothing was left to train, or another process reports
        return
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    where = result.run_dir
    typer.echo(f"done in {format_seconds(result.seconds)}{loss}: {where}/stage3.pt, map in {where}/embedding.npz")


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
    from tsimcne_map import TSimCNE

    report = TSimCNE.load(run_dir).evaluate(data, linear=linear, checkpoint=checkpoint, device=device, save=True)
    if report["output_dim"] != 2:
        typer.echo(f"note: {report['checkpoint']} has a {report['output_dim']}-D output, not the 2-D map", err=True)
    sampled = f" of a {report['silhouette_sample']:,}-image sample" if report.get("silhouette_sample") else ""
    typer.echo(
        f"kNN accuracy (k=15, 10% hold-out): {report['knn_accuracy']:.3f}   silhouette{sampled}: "
        f"{report['silhouette']:.3f}   ({report['n_images']:,} images, {report['n_classes']} classes, "
        f"{report['checkpoint']})"
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
    from tsimcne_map import TSimCNE

    target = TSimCNE.load(run_dir).plot(out)
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
    reference: Annotated[
        str | None,
        typer.Option(help="map this collection (store or data spec at the run's size) instead of the training set"),
    ] = None,
) -> None:
    """Turn a run's final checkpoint into a verified model bundle (ONNX + reference map + bundle.json)."""
    from tsimcne_map import TSimCNE

    bundle = TSimCNE.load(run_dir).export(
        out,
        center_crop=center_crop,
        artefact_labels=artefact_label,
        calibration_data=calibration_data,
        target_rate=target_rate,
        allow_partial=allow_partial,
        reference=reference,
    )
    parity = bundle.manifest.parity
    typer.echo(
        f"bundle written to {bundle.path}: parity max |onnxruntime - torch| = {parity['max_abs_diff']:.2e} "
        f"(allowed {parity['allowed']:.2e}) on {parity['images']} {'reference' if reference else 'training'} images"
        + (" [partial: stage 3 not finished]" if bundle.manifest.partial else "")
    )
    calibration = bundle.manifest.calibration
    interval = getattr(calibration, "false_flag_rate", None)
    if interval is not None:  # how sure the flag's rate is, from how many images set it
        loose = interval.images < interval.images_for_tight or interval.expected > calibration.target_false_flag_rate
        typer.echo(f"{'warning: ' if loose else ''}{interval.describe(calibration.target_false_flag_rate)}", err=loose)
    if register:
        tag = bundle.register()
        typer.echo(f"registered in BentoML's model store as {tag} (serve it with --arg model_tag={tag})")


# The first columns of `tsimcne embed`'s CSV, in this order (the rest follow as they come).
CSV_COLUMNS = "id x y flag score majority_label majority_share neighbour_ids neighbour_labels neighbour_distances error"
CSV_COLUMNS = CSV_COLUMNS.split()


@app.command()
@user_errors
def embed(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder made by `tsimcne export`")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="image files, folders (searched recursively), CSV manifests (a 'path' column) or .txt file lists"
        ),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="a folder of images (searched recursively) instead")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="output: a .csv or .parquet file (default coords.csv); with --engine ray a folder of Parquet shards"
        ),
    ] = None,
    provider: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    neighbours: Annotated[int, typer.Option(help="nearest reference images to report")] = 5,
    batch_size: Annotated[int, typer.Option(help="images per onnxruntime run")] = 64,
    engine: Annotated[
        str, typer.Option(help="local (this process) or ray (Ray Data: a local Ray or a cluster)")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="--engine ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)")
    ] = None,
    actors: Annotated[int | None, typer.Option(help="--engine ray: at most this many onnxruntime actors")] = None,
    cpus_per_actor: Annotated[float, typer.Option(help="--engine ray: CPUs (and onnxruntime threads) per actor")] = 1.0,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option(help="--engine ray: GPUs per actor (default 1 when the cluster has GPUs and onnxruntime-gpu)"),
    ] = None,
) -> None:
    """Place images on a bundle's map offline (onnxruntime); unreadable files are reported, not fatal."""
    from tsimcne_map.archive import list_images

    if engine not in ("local", "ray"):
        raise UserError(f"--engine {engine!r}: choose local or ray")
    if data is not None and not data.is_dir():
        raise UserError(f"{data}: not a folder")
    files = list_images([*(images or []), *([data] if data is not None else [])])
    if not files:
        raise UserError("no images given: pass image files, folders, a CSV or a file list, or --data FOLDER")
    if engine == "ray":
        if out is None:
            raise UserError("--engine ray writes a folder of Parquet shards: give it with --out DIR")
        _embed_on_ray(
            bundle, files, out, provider, neighbours, batch_size, ray_address, actors, cpus_per_actor, gpus_per_actor
        )
        return
    _embed_here(bundle, files, out or Path("coords.csv"), provider, neighbours, batch_size)


def _embed_here(bundle: Path, files: list[Path], out: Path, provider: str, neighbours: int, batch_size: int) -> None:
    """`tsimcne embed` in this process: Bundle.place, then a CSV or one Parquet file."""
    from training.table import write_table
    from tsimcne_map import Bundle
    from tsimcne_map.placement_table import write_placement_file

    if out.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"{out}: the output must end in .csv or .parquet (a folder of shards: --engine ray)")
    opened = Bundle.open(bundle, provider, neighbours)
    placed = opened.place(files, batch_size=batch_size, skip_unreadable=True, progress=None)
    for skipped in placed.skipped:
        typer.echo(f"skipped: {skipped.error}", err=True)
    if out.suffix.lower() == ".parquet":
        write_placement_file(placed.rows(), out)
    else:
        write_table(placed.rows(), out, columns=CSV_COLUMNS)
    typer.echo(
        f"placed {len(placed)} of {len(files)} image(s) on {bundle} ({opened.provider}); "
        f"{len(placed.skipped)} unreadable; table written to {out}"
    )
    if not placed:
        raise typer.Exit(2)


def _embed_on_ray(
    bundle: Path,
    files: list[Path],
    out: Path,
    provider: str,
    neighbours: int,
    batch_size: int,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
) -> None:
    """`tsimcne embed --engine ray`: the same placing on Ray Data, Parquet shards in the folder `out`."""
    from tsimcne_map.ray_embed import embed_on_ray

    typer.echo(f"placing {len(files):,} image(s) on {bundle} with Ray Data ...")
    summary = embed_on_ray(
        bundle, files, out, provider, neighbours, batch_size, address, actors, cpus_per_actor, gpus_per_actor
    )
    typer.echo(
        f"placed {summary.images - summary.unreadable:,} of {summary.images:,} image(s) on {bundle} on "
        f"{summary.cluster}: {summary.plan}; {summary.unreadable:,} unreadable (rows with an error); "
        f"{summary.images / max(summary.seconds, 1e-9):,.0f} images/s; {summary.shards} Parquet shard(s) in {out}"
    )
    if summary.unreadable == summary.images:
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
    from training.data import parse_size
    from training.synthetic import write_synthetic_cells

    classes = write_synthetic_cells(out, n, parse_size(size), seed=seed)
    typer.echo(f"wrote {n} synthetic images ({classes} classes) to {out}")


app.add_typer(journal_app, name="journal")


def main() -> None:
    _show_library_messages()
    app()


if __name__ == "__main__":
    sys.exit(main())
