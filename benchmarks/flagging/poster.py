"""The poster's experiment as a recipe: train a map on a collection with injected artefacts and
near-duplicates, and see where they land.

    .venv/bin/python -m benchmarks.flagging.poster            # ~3 minutes on 2 CPU cores

Collection: 2,400 synthetic cells (the project's generator, 32 px, 6 types), plus 100 near-duplicate
copies of one cell (+-1 px shift, sensor noise: re-acquisitions of the same field) and 50 cells with
strong artefacts drawn on (dust, bubbles, pen marks, borders, over-exposure). Trained with the `demo`
recipe and the `microscopy` augmentations (rotations, as in Nwabufo et al.). Writes
docs/poster-experiment.png and prints how clustered each injected group is: the share of each injected
image's 15 nearest map neighbours that belong to the same group (for a group scattered at random among
the 2,550 images this would be ~4 % for the duplicates and ~2 % for the artefacts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.flagging import artefacts  # noqa: E402
from training.synthetic import make_synthetic_cells  # noqa: E402
from tsimcne_core.neighbours import pairwise_distances  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "scratch" / "poster"
KINDS = ["dust and debris", "bubble", "pen mark", "black border", "over-exposure"]


def main() -> None:
    rng = np.random.default_rng(0)
    images, labels, names = make_synthetic_cells(2400, (32, 32), seed=0)
    duplicates = np.stack([artefacts.near_duplicate(images[7], rng) for _ in range(100)])
    damaged = np.stack([artefacts.STRONG[KINDS[i % len(KINDS)]](images[2000 + i], rng) for i in range(50)])
    all_images = np.concatenate([images, duplicates, damaged])
    class_names = [*names, "near-duplicates (100)", "artefacts (50)"]
    all_labels = np.concatenate([labels, np.full(100, len(names)), np.full(50, len(names) + 1)])
    SCRATCH.mkdir(parents=True, exist_ok=True)
    data = SCRATCH / "collection.npz"
    np.savez(data, images=all_images, labels=all_labels, class_names=np.array(class_names))

    embedding_file = SCRATCH / "runs" / "poster" / "embedding.npz"
    if "--plot-only" not in sys.argv or not embedding_file.exists():
        command = [
            *(sys.executable, "-m", "tsimcne_cli", "train", "--data", str(data), "--name", "poster"),
            *("--runs-dir", str(SCRATCH / "runs"), "--recipe", "demo", "--augmentation", "microscopy", "--overwrite"),
        ]
        subprocess.run(command, cwd=ROOT, check=True)
    with np.load(embedding_file) as embedding:
        coords = embedding["coords"]

    distances = pairwise_distances(coords, coords)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :15]
    for group in (len(names), len(names) + 1):
        members = np.flatnonzero(all_labels == group)
        share = (all_labels[nearest[members]] == group).mean()
        print(f"{class_names[group]}: {share:.0%} of their 15 nearest map neighbours are in the same group")
    kind_of = np.full(len(all_images), -1)
    kind_of[2500:] = np.arange(50) % len(KINDS)
    for k, kind in enumerate(KINDS):
        members = np.flatnonzero(kind_of == k)
        share = (kind_of[nearest[members]] == k).mean()
        print(f"  artefact kind {kind!r} (10 images): {share:.0%} of their 15 nearest neighbours have the same kind")
    plot(coords, all_labels, class_names, len(names), ROOT / "docs" / "poster-experiment.png")


def plot(
    coords: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    n_types: int,
    target: Path,
    title: str = "Synthetic cells with injected near-duplicates and artefacts\n"
    "demo recipe, microscopy augmentations (benchmarks/flagging/poster.py)",
) -> None:
    """The collection in light colours, the injected images drawn large on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tsimcne_core.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    cmap = plt.get_cmap("tab10")
    base = labels < n_types
    ax.scatter(
        coords[base, 0],
        coords[base, 1],
        s=min(3.0, 6000 / max(1, int(base.sum()))),
        c=[cmap(i) for i in labels[base]],
        alpha=0.35,
        linewidths=0,
    )
    for i in range(n_types):
        ax.scatter([], [], s=20, color=cmap(i), label=class_names[i])
    for group, marker, colour in ((n_types, "P", "#d6007a"), (n_types + 1, "X", "black")):
        members = labels == group
        ax.scatter(coords[members, 0], coords[members, 1], s=36, marker=marker, c=colour, linewidths=0.3,
                   edgecolors="white", label=class_names[group])  # fmt: skip
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    print(f"map written to {target}")


if __name__ == "__main__":
    main()
