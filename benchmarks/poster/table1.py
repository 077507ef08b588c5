"""Poster Table 1 on real blood cells: pixel-space t-SNE, SimCLR + t-SNE and t-SimCNE, each with the reference
augmentations, + 90° rotations, + 90° and arbitrary rotations; kNN accuracy and silhouette, mean ± sd over seeds,
and the three maps side by side.

    .venv/bin/python -m benchmarks.poster.table1 [--seeds 0 1 2] [--epochs 12,2,4]

~18 training runs; cached, so a stopped run continues (benchmarks/poster/common.py).
"""

from __future__ import annotations

from benchmarks.poster.common import (
    AUGMENTATIONS,
    DOCS,
    Setting,
    arguments,
    class_names,
    load_map,
    markdown_table,
    mean_sd,
    plot_panels,
    write_report,
)
from benchmarks.poster.methods import pixel_tsne, simclr, tsimcne

# Nwabufo et al., BloodMNIST, full GPU schedule (silhouette per augmentation; kNN with all augmentations)
POSTER = {
    ("pixel t-SNE", "-"): "silhouette 0.07",
    ("t-SimCNE", "reference augmentations"): "silhouette 0.40",
    ("t-SimCNE", "+ 90° rotations"): "silhouette 0.44",
    ("t-SimCNE", "+ 90° and arbitrary rotations"): "kNN 0.929, silhouette 0.50",
}


def main() -> None:
    args = arguments("Poster Table 1 on PBC").parse_args()
    setting = Setting.from_args(args)
    results: dict[tuple[str, str], list[dict]] = {("pixel t-SNE", "-"): []}
    for method in ("SimCLR + t-SNE", "t-SimCNE"):  # rows in the poster's order
        results.update({(method, column): [] for column in AUGMENTATIONS})
    for seed in args.seeds:  # seed by seed, so a partial run already has one full table
        results[("pixel t-SNE", "-")].append(pixel_tsne(seed, setting))
        for column, augmentation in AUGMENTATIONS.items():
            results[("SimCLR + t-SNE", column)].append(simclr(augmentation, seed, setting))
            results[("t-SimCNE", column)].append(tsimcne(augmentation, seed, setting))

    rows = []
    for (method, column), runs in results.items():
        rows.append(
            [
                method,
                column,
                mean_sd([r["knn_accuracy"] for r in runs]),
                mean_sd([r["silhouette"] for r in runs]),
                str(len(runs)),
                POSTER.get((method, column), ""),
            ]
        )
    header = ["method", "augmentations", "kNN accuracy", "silhouette", "seeds", "poster (BloodMNIST, GPU)"]
    note = (
        f"{args.data.name}; networks: `cpu` recipe (width {args.width or 16}, stem stride 2, batch 512), t-SimCNE "
        f"epochs {'/'.join(map(str, args.epochs))}, SimCLR {args.epochs[0]} epochs; mean ± sd over seeds "
        f"{', '.join(map(str, args.seeds))}.\n\n"
    )
    write_report("table1", note + markdown_table(header, rows))

    seed = args.seeds[0]
    panels = []
    for title, (method, column) in (
        ("pixel t-SNE", ("pixel t-SNE", "-")),
        ("SimCLR + t-SNE (+ all rotations)", ("SimCLR + t-SNE", "+ 90° and arbitrary rotations")),
        ("t-SimCNE (+ all rotations)", ("t-SimCNE", "+ 90° and arbitrary rotations")),
    ):
        result = results[(method, column)][0]
        coords, labels = load_map(result["map"])
        scores = f"kNN {result['knn_accuracy']:.3f}, silhouette {result['silhouette']:.3f}"
        panels.append((f"{title}, seed {seed}\n{scores}", coords, labels))
    plot_panels(panels, class_names(args.data), DOCS / "poster-table1-maps.png")


if __name__ == "__main__":
    main()
