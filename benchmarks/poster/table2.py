"""Poster Table 2 on real blood cells: which augmentations the map needs. t-SimCNE with all augmentations (the
`microscopy` chain), without the resized crops, without colour jitter, without random grayscale.

    .venv/bin/python -m benchmarks.poster.table2 [--seeds 0 1 2] [--epochs 12,2,4]

The poster's ImageNet-pretrained ResNet baselines are not run: their weights cannot be downloaded here.
"""

from __future__ import annotations

from benchmarks.poster.common import Setting, arguments, markdown_table, mean_sd, write_report
from benchmarks.poster.methods import tsimcne

VARIANTS = {  # column -> augmentation, with the poster's BloodMNIST figures (kNN %, silhouette)
    "all augmentations": ("microscopy", "92.9 / 0.50"),
    "no crops": ("microscopy,no-crop", "76.0 / 0.20"),
    "no colour jitter": ("microscopy,no-jitter", "90.0 / 0.45"),
    "no grayscale": ("microscopy,no-grayscale", "92.1 / 0.44"),
}


def main() -> None:
    args = arguments("Poster Table 2 on PBC").parse_args()
    setting = Setting.from_args(args)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        for name, (augmentation, _) in VARIANTS.items():
            results[name].append(tsimcne(augmentation, seed, setting))
    rows = [
        [
            name,
            f"`{VARIANTS[name][0]}`",
            mean_sd([r["knn_accuracy"] for r in runs]),
            mean_sd([r["silhouette"] for r in runs]),
            str(len(runs)),
            VARIANTS[name][1],
        ]
        for name, runs in results.items()
    ]
    header = ["t-SimCNE with", "--augmentation", "kNN accuracy", "silhouette", "seeds", "poster kNN % / silhouette"]
    note = (
        f"{args.data.name}; `cpu` recipe network, epochs {'/'.join(map(str, args.epochs))}; mean ± sd over seeds "
        f"{', '.join(map(str, args.seeds))}. ImageNet-pretrained baselines: not run (no weights offline).\n\n"
    )
    write_report("table2", note + markdown_table(header, rows))


if __name__ == "__main__":
    main()
