"""Poster Fig. 5 on real blood cells: where near-duplicates and artefacts land on a t-SimCNE map.

The collection: all 17,092 PBC images, plus 100 perturbed copies of one PBC image (re-acquisitions: +-1 px shift
and sensor noise) and 50 PBC images carrying one artefact kind (default: a pen mark across the field; any kind of
benchmarks/flagging/artefacts.py with --artefact). t-SimCNE with the `microscopy` augmentations is trained on it
as a user would (nobody tells it what was injected). For each injected group: the share of its images' 15 nearest
map neighbours that belong to the same group, against the share expected if the group were scattered at random.

    .venv/bin/python -m benchmarks.poster.fig5 [--seeds 0] [--epochs 12,2,4] [--lr 0.06] [--artefact "pen mark"]

Another artefact kind, other epochs or another rate than the tables' (pen mark, 12/2/4, lr 0.06) write their report
and picture under a name that says so (e.g. fig5-blur-defocus-e33-5-8-lr0.12.md,
docs/poster-fig5-pbc-blur-defocus-e33-5-8-lr0.12.png), beside the tables' own.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from benchmarks.flagging import artefacts
from benchmarks.flagging.poster import plot
from benchmarks.poster.common import (
    DOCS,
    SCRATCH,
    TABLE_EPOCHS,
    TABLE_LR,
    Setting,
    arguments,
    class_names,
    markdown_table,
    write_report,
)
from benchmarks.poster.methods import tsimcne
from tsimcne_core.files import atomic_savez

K = 15
DEFAULT_ARTEFACT = "pen mark"
N_DUPLICATES, N_ARTEFACTS = 100, 50


def make_collection(data: Path, artefact: str, seed: int = 0) -> Path:
    """PBC + injected groups as one labelled npz (labels: the PBC classes, then the two groups)."""
    rng = np.random.default_rng(seed)
    with np.load(data, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
        names = [str(n) for n in archive["class_names"]]
    source, *damaged_from = rng.choice(len(images), size=1 + N_ARTEFACTS, replace=False)
    duplicates = np.stack([artefacts.near_duplicate(images[source], rng) for _ in range(N_DUPLICATES)])
    damaged = np.stack([artefacts.STRONG[artefact](images[i], rng) for i in damaged_from])
    groups = [f"copies of one image ({N_DUPLICATES})", f"{artefact} ({N_ARTEFACTS})"]
    collection = {
        "images": np.concatenate([images, duplicates, damaged]),
        "labels": np.concatenate(
            [labels, np.full(N_DUPLICATES, len(names)), np.full(N_ARTEFACTS, len(names) + 1)]
        ).astype(np.int64),
        "class_names": np.array([*names, *groups]),
    }
    path = SCRATCH / f"fig5-{data.stem}-{artefact.replace(' ', '_')}.npz"
    atomic_savez(path, collection)
    return path


def group_shares(coords: np.ndarray, labels: np.ndarray, group: int) -> tuple[float, float]:
    """(share of the group's K nearest map neighbours inside the group, that share for a random scatter)."""
    from sklearn.neighbors import NearestNeighbors

    members = np.flatnonzero(labels == group)
    _, neighbours = NearestNeighbors(n_neighbors=K + 1).fit(coords).kneighbors(coords[members])
    share = float((labels[neighbours[:, 1:]] == group).mean())
    return share, (len(members) - 1) / (len(labels) - 1)


def main() -> None:
    parser = arguments("Poster Fig. 5 on PBC")
    parser.add_argument("--artefact", default=DEFAULT_ARTEFACT, choices=sorted(artefacts.STRONG))
    args = parser.parse_args()
    data = make_collection(args.data, args.artefact)
    setting = Setting(args.epochs, data, args.width, args.lr)
    names = class_names(data)
    n_types = len(names) - 2
    rows, first = [], None
    for seed in args.seeds:
        result = tsimcne("microscopy", seed, setting)
        with np.load(SCRATCH / "maps" / f"{result['map']}.npz") as saved:
            coords, labels = saved["coords"], saved["labels"]
        first = first or (coords, labels, result)
        for group in (n_types, n_types + 1):
            share, chance = group_shares(coords, labels, group)
            rows.append([names[group], str(seed), f"{share:.1%}", f"{chance:.2%}", f"{share / chance:.0f}x"])
    schedule = f"epochs {'/'.join(map(str, args.epochs))}, lr {args.lr:g}"
    tables_schedule = (tuple(args.epochs), args.lr) == (TABLE_EPOCHS, TABLE_LR)
    kind = re.sub(r"[^a-z0-9]+", "-", args.artefact.lower()).strip("-")
    suffix = "" if args.artefact == DEFAULT_ARTEFACT else f"-{kind}"
    suffix += "" if tables_schedule else f"-e{'-'.join(map(str, args.epochs))}-lr{args.lr:g}"
    header = ["injected group", "seed", f"share of its {K} map neighbours in the group", "random scatter", "ratio"]
    coords, labels, result = first
    note = (
        f"{args.data.name} + {N_DUPLICATES} perturbed copies of one image + {N_ARTEFACTS} images with "
        f"'{args.artefact}'; t-SimCNE, `microscopy` augmentations, {schedule}; "
        f"map kNN {result['knn_accuracy']:.3f}, silhouette {result['silhouette']:.3f} (all labels).\n\n"
    )
    write_report(f"fig5{suffix}", note + markdown_table(header, rows))
    title = (
        f"PBC with {N_DUPLICATES} copies of one image and {N_ARTEFACTS} images with '{args.artefact}'\n"
        f"t-SimCNE, microscopy augmentations, {schedule} (benchmarks/poster/fig5.py)"
    )
    plot(coords, labels, names, n_types, DOCS / f"poster-fig5-pbc{suffix}.png", title=title)


if __name__ == "__main__":
    main()
