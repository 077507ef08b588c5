"""When cell size is the diagnosis: the `microscopy` augmentations (resized crops from 20-100 % of the image)
against `microscopy-keep-size` (no zoom: shifts, rotations, flips, colour), on

- synthetic red cells that differ only in size (micro-, normo-, macrocytes; training/synthetic.py), where a
  network taught to ignore size cannot separate the classes, and
- PBC, where the classes differ in much more than size, to see what dropping the zoom costs there.

    .venv/bin/python -m benchmarks.poster.size [--seeds 0 1 2] [--epochs 12,2,4]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks.poster.common import (
    DOCS,
    SCRATCH,
    Setting,
    arguments,
    load_map,
    markdown_table,
    mean_sd,
    plot_panels,
    write_report,
)
from benchmarks.poster.methods import tsimcne
from training.synthetic import make_red_cell_sizes
from tsimcne_core.files import atomic_savez

PRESETS = ("microscopy", "microscopy-keep-size")
N_RED_CELLS = int(os.environ.get("TSIMCNE_RED_CELLS", "3000"))


def red_cells() -> Path:
    path = SCRATCH / f"red-cell-sizes-{N_RED_CELLS}.npz"
    if not path.is_file():
        images, labels, names = make_red_cell_sizes(N_RED_CELLS, (28, 28), seed=0)
        atomic_savez(path, {"images": images, "labels": labels, "class_names": np.array(names)})
    return path


def main() -> None:
    args = arguments("Size-preserving augmentations").parse_args()
    rows, panels = [], []
    sizes = red_cells()
    for title, data in (("red cells, size only", sizes), (args.data.stem, args.data)):
        setting = Setting(args.epochs, data, args.width, args.lr)
        for preset in PRESETS:
            runs = [tsimcne(preset, seed, setting) for seed in args.seeds]
            knn, silhouette = [r["knn_accuracy"] for r in runs], [r["silhouette"] for r in runs]
            rows.append([title, f"`{preset}`", mean_sd(knn), mean_sd(silhouette), str(len(runs))])
            if data == sizes:  # the pictures: the size-only collection
                coords, labels = load_map(runs[0]["map"])
                panels.append((f"{preset}\nkNN {knn[0]:.3f}, silhouette {silhouette[0]:.3f}", coords, labels))
    note = (
        f"t-SimCNE, `cpu` recipe network, epochs {'/'.join(map(str, args.epochs))}; {N_RED_CELLS} synthetic red "
        f"cells (radius 22/29/36 % of the image, +-12 %) and {args.data.name}; seeds {', '.join(map(str, args.seeds))}"
        ".\n\n"
    )
    write_report("size", note + markdown_table(["data", "--augmentation", "kNN", "silhouette", "seeds"], rows))
    plot_panels(panels, ["microcyte", "normocyte", "macrocyte"], DOCS / "augment-size.png")


if __name__ == "__main__":
    main()
