"""Make an N-image collection of real PNG files from the PBC blood-cell images (issue 14's scale tests).

The 17,092 real images of ../shared/data/bloodcells/pbc_28.npz are tiled (image i is source
i mod 17,092) and each copy after the first is passed through the project's own augmentation
(training/augment.py, preset `microscopy`: crops, flips, rotations, colour jitter), so the collection
holds N distinct real-looking cells, 28x28 RGB, in one folder per class (the source's label), as a
lab's export folder would be laid out. Deterministic for a given N and seed.

    taskset -c 1 nice -n 5 .venv/bin/python -m benchmarks.scale.make_collection --n 20000 --out DIR
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]

from training.augment import BatchAugmenter, get_preset, mean_border_colour  # noqa: E402

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
BLOCK = 4096


def make_collection(out: Path, n: int, source: Path = PBC, seed: int = 0, preset: str = "microscopy") -> int:
    """Write n PNG files under out/<class>/<index>.png; returns the number of classes."""
    with np.load(source, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
        names = [str(name) for name in archive["class_names"]]
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose another --out")
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
    augment = BatchAugmenter(get_preset(preset), mean_border_colour(images))
    generator = torch.Generator().manual_seed(seed)
    with ThreadPoolExecutor(max_workers=4) as pool, tqdm(total=n, desc="writing PNGs", unit="img") as bar:
        for start in range(0, n, BLOCK):
            index = np.arange(start, min(n, start + BLOCK))
            block = images[index % len(images)]
            copies = index >= len(images)  # the first pass is the real images themselves
            if copies.any():
                batch = torch.from_numpy(block[copies]).permute(0, 3, 1, 2)
                views = augment(batch, generator)
                block[copies] = (views * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
            paths = [out / names[labels[i % len(images)]] / f"{i:08d}.png" for i in index]
            list(pool.map(lambda item: Image.fromarray(item[1]).save(item[0]), zip(paths, block, strict=True)))
            bar.update(len(index))
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=PBC, help="the .npz of real images to tile (default: PBC)")
    args = parser.parse_args()
    classes = make_collection(args.out, args.n, source=args.source, seed=args.seed)
    print(f"wrote {args.n:,} PNG files in {classes} class folders under {args.out}")


if __name__ == "__main__":
    main()
