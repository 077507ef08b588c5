"""The two bundles the /embed benchmark serves: the PBC map (17,092 reference images) and the same network
with a 1,000,000-image reference map. Each step is skipped when its output exists, so a second call is free.

    .venv/bin/python -m benchmarks.serve.bundles            # -> benchmarks/scratch/serve/bundles/{pbc-17k,pbc-1m}

1. `tsimcne train --recipe cpu --epochs 2,1,1` on all of PBC (../shared/data/bloodcells/pbc_28.npz): the `cpu`
   recipe's network (ResNet-18 width 16, stride-2 stem), which is what a user serves; a few epochs only,
   because serving speed depends on the network's shape and the reference size, not on its weights;
2. `tsimcne export` -> pbc-17k (FAISS flat feature index);
3. a 1,000,000-image collection as an .npz: PBC's images tiled, every copy after the first turned by a
   multiple of 90 degrees, flipped and scaled in brightness (distinct images in the real images' region of
   the map), then `tsimcne prepare` and `tsimcne export --reference --calibration-data PBC` -> pbc-1m
   (FAISS IVF, tuned by export).
Minutes for the first two steps on 2 cores, ~30 minutes for the third.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
WORK = ROOT / "benchmarks" / "scratch" / "serve"
CLI = [sys.executable, "-m", "tsimcne_cli"]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([*CLI, *args], cwd=ROOT, check=True)


def small_bundle(work: Path, epochs: str) -> Path:
    runs, bundle = work / "runs", work / "bundles" / "pbc-17k"
    if not (runs / "pbc-serve" / "stage3.pt").exists() and not bundle.exists():
        run("train", "--data", str(PBC), "--name", "pbc-serve", "--runs-dir", str(runs), "--recipe", "cpu",
            "--epochs", epochs, "--overwrite")  # fmt: skip
    if not bundle.exists():
        run("export", str(runs / "pbc-serve"), "--out", str(bundle))
    return bundle


def million_images(path: Path, n: int, seed: int = 0) -> None:
    """PBC tiled to n images; copy c of image i is turned c mod 4 quarter turns, flipped when (c // 4) is
    odd and scaled in brightness by a seeded factor in [0.85, 1.15]; written as an uncompressed .npz."""
    with np.load(PBC, allow_pickle=False) as data:
        images, labels, names = data["images"], data["labels"], data["class_names"]
    rng = np.random.default_rng(seed)
    out = np.empty((n, *images.shape[1:]), dtype=np.uint8)
    block = len(images)
    for start in range(0, n, block):
        stop = min(start + block, n)
        copy = start // block
        tile = images[: stop - start]
        if copy:
            tile = np.rot90(tile, copy % 4, axes=(1, 2))
            if (copy // 4) % 2:
                tile = tile[:, :, ::-1]
            gain = rng.uniform(0.85, 1.15, size=(len(tile), 1, 1, 1))
            tile = np.clip(tile * gain, 0, 255)
        out[start:stop] = tile
    tiled_labels = labels[np.arange(n) % block]
    staging = path.with_suffix(".partial.npz")
    np.savez(staging, images=out, labels=tiled_labels, class_names=names)
    staging.rename(path)


def large_bundle(work: Path, n: int) -> Path:
    bundle = work / "bundles" / f"pbc-{n // 1000}k" if n < 1_000_000 else work / "bundles" / "pbc-1m"
    if bundle.exists():
        return bundle
    source, store = work / f"collection-{n}.npz", work / f"store-{n}"
    if not store.exists() and not source.exists():
        print(f"writing {n:,} images to {source} ...", flush=True)
        million_images(source, n)
    if not store.exists():
        run("prepare", str(source), "--out", str(store))
        source.unlink()
    # PBC's images calibrate the flag, so that all n images are the reference (without calibration images,
    # export would hold 10 % of them out to calibrate on).
    run("export", str(work / "runs" / "pbc-serve"), "--out", str(bundle), "--reference", str(store),
        "--calibration-data", str(PBC))  # fmt: skip
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--epochs", default="2,1,1")
    parser.add_argument("--large", type=int, default=1_000_000, help="reference size of the large bundle (0: none)")
    args = parser.parse_args()
    print(small_bundle(args.work, args.epochs))
    if args.large:
        print(large_bundle(args.work, args.large))


if __name__ == "__main__":
    main()
