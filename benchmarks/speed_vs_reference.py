"""Training speed and map quality: this project against the reference package, side by side, one run.

    .venv/bin/python -m benchmarks.speed_vs_reference [--n-speed 2048] [--n-quality 2048]

1. Installs the reference (tsimcne==0.3.12, the last release whose three-stage `fit` works) into
   benchmarks/.venv-ref if it is not there yet (pip, so torch comes from the local wheel store).
2. Speed: both train the full-size ResNet-18 (width 64) stage 1 for the same epochs, batch and images
   (PBC 28 px, ../shared/data/bloodcells/pbc_28.npz); images/s = images x epochs / training seconds.
3. Quality at equal epochs: both run all three stages with the same schedule on the same images; the two
   maps are scored with the same kNN accuracy / silhouette code (training/evaluate.py).
Results are printed and written to benchmarks/scratch/speed_vs_reference.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.results import record  # noqa: E402
from training.config import build_config  # noqa: E402
from training.datasets import load_dataset  # noqa: E402
from training.device import resolve_runtime  # noqa: E402
from training.embedding import embed_images  # noqa: E402
from training.evaluate import map_quality  # noqa: E402
from training.trainer import StagedTrainer  # noqa: E402

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
SCRATCH = ROOT / "benchmarks" / "scratch"
REF_VENV = ROOT / "benchmarks" / ".venv-ref"
REF_PYTHON = REF_VENV / "bin" / "python"


def ensure_reference() -> None:
    if (
        REF_PYTHON.exists()
        and subprocess.run([REF_PYTHON, "-c", "import tsimcne"], capture_output=True).returncode == 0
    ):
        return
    print("installing the reference tsimcne==0.3.12 into benchmarks/.venv-ref (once, ~2 min) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", REF_VENV], check=True)
    subprocess.run(
        [REF_PYTHON, "-m", "pip", "install", "-q", "tsimcne==0.3.12", "torch==2.14.1", "torchvision==0.29.1"],
        check=True,
    )


def subset(n: int, seed: int = 0) -> Path:
    """A stratified-by-chance random subset of PBC written as npz for both sides."""
    with np.load(PBC, allow_pickle=False) as archive:
        images, labels, names = archive["images"], archive["labels"], archive["class_names"]
    index = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    path = SCRATCH / f"pbc_subset_{n}.npz"
    np.savez(path, images=images[index], labels=labels[index], class_names=names)
    return path


def run_reference(data: Path, epochs: str, batch: int) -> dict:
    out = SCRATCH / f"reference_{epochs.replace(',', '-')}.npz"
    # cwd=SCRATCH: Lightning writes lightning_logs/ (a checkpoint per stage) into the working folder.
    runner = ROOT / "benchmarks" / "reference_runner.py"
    subprocess.run([REF_PYTHON, runner, data, epochs, str(batch), out], check=True, cwd=SCRATCH)
    with np.load(out) as result:
        return {"seconds": float(result["seconds"]), "coords": result["coords"]}


def run_ours(data: Path, epochs: tuple[int, int, int], batch: int, name: str) -> dict:
    config = build_config(
        "reference", {"data": str(data), "epochs": epochs, "batch_size": batch, "checkpoint_every": 10_000}
    )
    dataset = load_dataset(config.data)
    runtime = resolve_runtime(config.device, config.precision, config.channels_last)
    run_dir = SCRATCH / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    trainer = StagedTrainer(config, dataset, run_dir, runtime, show_progress=False, echo=lambda _m: None)
    started = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - started
    coords, _ = embed_images(trainer.model, dataset.images, runtime.device) if epochs[1] or epochs[2] else (None, None)
    return {"seconds": seconds, "coords": coords, "runtime": runtime.describe(), "labels": dataset.labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-speed", type=int, default=2048)
    parser.add_argument("--speed-epochs", type=int, default=2)
    parser.add_argument("--n-quality", type=int, default=2048)
    parser.add_argument("--quality-epochs", default="6,2,4")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--quality-batch", type=int, default=256)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    ensure_reference()
    results: dict = {
        "torch_threads": torch.get_num_threads(),
    }

    data = subset(args.n_speed)
    images = args.n_speed * args.speed_epochs
    print(f"speed: stage 1, width-64 ResNet-18, {args.n_speed} images x {args.speed_epochs} epochs, batch {args.batch}")
    reference = run_reference(data, str(args.speed_epochs), args.batch)
    ours = run_ours(data, (args.speed_epochs, 0, 0), args.batch, "speed")
    results["speed"] = {
        "reference_images_per_s": images / reference["seconds"],
        "ours_images_per_s": images / ours["seconds"],
        "speedup": reference["seconds"] / ours["seconds"],
        "reference_seconds": reference["seconds"],
        "ours_seconds": ours["seconds"],
        "ours_runtime": ours["runtime"],
        "n_images": args.n_speed,
        "epochs": args.speed_epochs,
        "batch": args.batch,
    }
    print(json.dumps(results["speed"], indent=2), flush=True)

    if not args.skip_quality:
        epochs = tuple(int(e) for e in args.quality_epochs.split(","))
        data = subset(args.n_quality, seed=1)
        print(f"quality: all stages {epochs}, {args.n_quality} images, batch {args.quality_batch}", flush=True)
        reference = run_reference(data, args.quality_epochs, args.quality_batch)
        ours = run_ours(data, epochs, args.quality_batch, "quality")
        ref_quality = map_quality(reference["coords"], ours["labels"])
        our_quality = map_quality(ours["coords"], ours["labels"])
        results["quality"] = {
            "epochs": list(epochs),
            "n_images": args.n_quality,
            "batch": args.quality_batch,
            "reference": {**ref_quality.as_dict(), "seconds": reference["seconds"]},
            "ours": {**our_quality.as_dict(), "seconds": ours["seconds"]},
        }
        print(json.dumps(results["quality"], indent=2), flush=True)
    record(results, SCRATCH / "speed_vs_reference.json")


if __name__ == "__main__":
    main()
