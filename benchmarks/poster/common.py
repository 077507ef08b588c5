"""Shared parts of the poster's experiments (Nwabufo, Böhm, Berens, Kobak: "Self-supervised visualisation of
microscopy datasets") on the real PBC blood cells: training runs, t-SNE, scores, caching, tables, figures.

Every training run goes through the `tsimcne` CLI (the product, not a copy of it) into
benchmarks/scratch/poster/runs/, and every score is cached as JSON in benchmarks/scratch/poster/results/:
a table script that is stopped (or a machine that reboots) continues where it was, and a second table that
needs the same run (Table 3 reads Table 1's SimCLR runs) reuses it.

The budget: every network is the `cpu` recipe's (ResNet-18 width 16, stem stride 2, batch 512) trained for
a fixed number of epochs, `TABLE_EPOCHS`, so the tables do not depend on the machine's speed or load, at
the reference's learning-rate rule (0.06 at batch 512, as the paper trains and as the cached tables were
measured; the `cpu` recipe's own default became 0.12 later).
SimCLR gets the stage-1 epochs (the paper: SimCLR 1000 epochs, t-SimCNE 1000 + 50 + 450).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from training.evaluate import knn_accuracy  # noqa: E402
from tsimcne_core.files import atomic_savez, atomic_write, atomic_write_json  # noqa: E402

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
SCRATCH = Path(os.environ.get("TSIMCNE_POSTER_SCRATCH", ROOT / "benchmarks" / "scratch" / "poster"))
DOCS = Path(os.environ.get("TSIMCNE_POSTER_DOCS", ROOT / "docs"))
TABLE_EPOCHS = (12, 2, 4)  # ~10 minutes of the 2-core AVX2 machine per t-SimCNE run (benchmarks/README.md)
TABLE_LR = 0.06  # the rate the tables were run at (the reference rule at batch 512; the cpu recipe now uses 0.12)
NETWORK = ["--recipe", "cpu", "--stem-stride", "2"]
AUGMENTATIONS = {  # the poster's three columns
    "reference augmentations": "default",
    "+ 90° rotations": "default,rot90",
    "+ 90° and arbitrary rotations": "microscopy",
}


@dataclass(frozen=True)
class Setting:
    """What every run of a table shares: t-SimCNE epochs, data, network width (None = the cpu recipe's), lr."""

    epochs: tuple[int, int, int] = TABLE_EPOCHS
    data: Path = PBC
    width: int | None = None
    lr: float = TABLE_LR

    def run_name(self, method: str, augmentation: str, seed: int, epochs: tuple[int, int, int]) -> str:
        """Named by everything that decides the result, so a cached result is never another setting's."""
        tag = ("" if self.data == PBC else f"-{self.data.stem}") + (f"-w{self.width}" if self.width else "")
        tag += "" if self.lr == TABLE_LR else f"-lr{self.lr:g}"
        return f"{method}-{augmentation.replace(',', '+')}-e{'-'.join(map(str, epochs))}-s{seed}{tag}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Setting:
        return cls(args.epochs, args.data, args.width, args.lr)


def train(
    name: str,
    augmentation: str,
    seed: int,
    epochs: tuple[int, int, int],
    setting: Setting,
    metric: str = "cauchy",
) -> Path:
    """Train (or finish) a run through the CLI; returns its folder. Stage 1 only when epochs[1:] are 0."""
    runs = SCRATCH / "runs"
    run = runs / name
    final = run / ("stage1.pt" if epochs[1] == epochs[2] == 0 else "stage3.pt")
    if final.is_file():
        return run
    cli = [sys.executable, "-m", "tsimcne_cli", "train", "--no-progress"]
    if (run / "last.pt").is_file():
        command = [*cli, "--resume", str(run)]
    else:
        command = [*cli, "--data", str(setting.data), "--name", name, "--runs-dir", str(runs), "--overwrite"]
        command += [*NETWORK, "--augmentation", augmentation, "--seed", str(seed), "--metric", metric]
        command += ["--epochs", ",".join(map(str, epochs)), "--lr", f"{setting.lr:g}"]
        command += ["--width", str(setting.width)] if setting.width else []
    print(f"training {name} ...", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return run


def network_outputs(run: Path, checkpoint: str) -> dict[str, np.ndarray]:
    """Output (z), backbone features (h), labels and ids of every image, from one checkpoint of a run."""
    import torch

    from training.checkpoint import load_checkpoint
    from training.embedding import embed_images
    from training.runs import dataset_for_state, model_from_state

    state = load_checkpoint(run / checkpoint)
    dataset = dataset_for_state(state)
    with torch.inference_mode():
        z, h = embed_images(model_from_state(state), dataset.images, torch.device("cpu"))
    return {"z": z, "h": h, "labels": dataset.labels, "ids": np.array(dataset.ids)}


def tsne(x: np.ndarray, seed: int, metric: str = "euclidean") -> np.ndarray:
    """openTSNE with its defaults (perplexity 30, PCA initialisation, FFT gradients), one thread."""
    from openTSNE import TSNE

    return np.asarray(TSNE(metric=metric, random_state=seed, n_jobs=1, verbose=False).fit(x), dtype=np.float32)


def map_scores(coords: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The papers' scores of a 2-D map: kNN accuracy (k=15, 10 % hold-out) and silhouette (class labels)."""
    from sklearn.metrics import silhouette_score

    return {
        "knn_accuracy": knn_accuracy(coords, labels),
        "silhouette": float(silhouette_score(coords, labels, metric="euclidean")),
    }


def cached(key: str, compute: Callable[[], dict]) -> dict:
    """The JSON result stored under `key`, computed (and stored atomically) the first time."""
    path = SCRATCH / "results" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result


def save_map(key: str, coords: np.ndarray, labels: np.ndarray) -> None:
    path = SCRATCH / "maps" / f"{key}.npz"
    atomic_savez(path, {"coords": coords, "labels": labels})


def load_map(key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(SCRATCH / "maps" / f"{key}.npz") as saved:
        return saved["coords"], saved["labels"]


def mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_panels(panels: list[tuple[str, np.ndarray, np.ndarray]], class_names: list[str], path: Path) -> None:
    """Maps side by side, one colour per class, the scores in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), dpi=120)
    cmap = plt.get_cmap("tab10")
    for ax, (title, coords, labels) in zip(np.atleast_1d(axes), panels, strict=True):
        order = np.random.default_rng(0).permutation(len(coords))
        ax.scatter(coords[order, 0], coords[order, 1], s=0.6, c=[cmap(i) for i in labels[order]], linewidths=0,
                   rasterized=True)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=cmap(i), label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(class_names), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    print(f"figure written to {path}")


def write_report(name: str, text: str) -> Path:
    """Print a table and keep it in benchmarks/scratch/poster/NAME.md (copied into benchmarks/README.md)."""
    path = SCRATCH / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return path


def class_names(data: Path = PBC) -> list[str]:
    with np.load(data, allow_pickle=False) as archive:
        return [str(name) for name in archive["class_names"]]


def parse_epochs(text: str) -> tuple[int, int, int]:
    first, second, third = (int(part) for part in text.split(","))
    return first, second, third


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every poster script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=parse_epochs, default=TABLE_EPOCHS, help="t-SimCNE epochs per stage")
    parser.add_argument("--data", type=Path, default=PBC, help="labelled .npz (default: PBC)")
    parser.add_argument("--width", type=int, default=None, help="network width (default: the cpu recipe's)")
    parser.add_argument("--lr", type=float, default=TABLE_LR, help=f"stage-1/2 learning rate (default {TABLE_LR:g})")
    return parser
