"""Poster Table 3 on real blood cells: linear evaluation of the learned representation. A logistic-regression
probe on the frozen backbone features (stratified 70/10/20 % split: trained on 70 %, C chosen on 10 %, scored on
the held-out 20 %; training/probe.py), beside kNN on the same features, for SimCLR with and without rotations and
for t-SimCNE's backbone (after stage 1, and after the whole run).

    .venv/bin/python -m benchmarks.poster.table3 [--seeds 0 1 2] [--epochs 12,2,4]

Reuses Table 1's runs (cached); trains what is missing.
"""

from __future__ import annotations

from benchmarks.poster.common import AUGMENTATIONS, Setting, arguments, markdown_table, mean_sd, write_report
from benchmarks.poster.methods import simclr, tsimcne


def main() -> None:
    args = arguments("Poster Table 3 on PBC").parse_args()
    setting = Setting.from_args(args)
    rows = []
    for column, augmentation in AUGMENTATIONS.items():
        runs = [simclr(augmentation, seed, setting) for seed in args.seeds]
        rows.append(_row("SimCLR", column, [r["linear_probe"] for r in runs]))
    for column, augmentation in AUGMENTATIONS.items():
        runs = [tsimcne(augmentation, seed, setting) for seed in args.seeds]
        rows.append(_row("t-SimCNE after stage 1", column, [r["linear_probe_stage1"] for r in runs]))
        rows.append(_row("t-SimCNE final", column, [r["linear_probe"] for r in runs]))
    header = ["backbone", "augmentations", "linear probe accuracy", "kNN accuracy (k=15)", "features", "seeds"]
    note = (
        f"{args.data.name}; `cpu` recipe network (t-SimCNE epochs {'/'.join(map(str, args.epochs))}, SimCLR "
        f"{args.epochs[0]}); frozen backbone features, stratified 70/10/20 % split (seed 0); mean ± sd over seeds "
        f"{', '.join(map(str, args.seeds))}. Poster (BloodMNIST, GPU, SimCLR): 94.5 % -> 96.5 % with rotations.\n\n"
    )
    write_report("table3", note + markdown_table(header, rows))


def _row(backbone: str, column: str, probes: list[dict]) -> list[str]:
    return [
        backbone,
        column,
        mean_sd([p["linear_accuracy"] for p in probes]),
        mean_sd([p["knn_accuracy"] for p in probes]),
        str(probes[0]["n_features"]),
        str(len(probes)),
    ]


if __name__ == "__main__":
    main()
