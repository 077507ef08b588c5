"""The map picture: every image a dot at its 2-D position, coloured by label, with a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tsimcne_core.files import atomic_write


def plot_map(
    coords: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str],
    path: Path,
    title: str = "",
    subtitle: str = "",
) -> None:
    """Write a PNG scatter of the map; dot size adapts to the number of points.

    Drawn on a Figure of its own, not through pyplot: the caller's matplotlib backend (a notebook's
    inline plots) is left as it was."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(coords)
    size = float(np.clip(3000 / max(n, 1), 0.5, 20))
    fig = Figure(figsize=(8, 7), dpi=120)
    ax = fig.subplots()
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, c="#444444", alpha=0.6, linewidths=0, rasterized=True)
    else:
        cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
        order = np.random.default_rng(0).permutation(n)  # no class hides under another
        colours = np.array([cmap(i % cmap.N) for i in range(max(len(class_names), int(labels.max()) + 1))])
        ax.scatter(
            coords[order, 0],
            coords[order, 1],
            s=size,
            c=colours[labels[order]],
            alpha=0.7,
            linewidths=0,
            rasterized=True,
        )
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colours[i], label=name) for i, name in enumerate(class_names)
        ]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.5)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw a finished run's map (embedding.npz) to `out` (default RUN_DIR/map.png), with the kNN accuracy
    and silhouette in the subtitle once `evaluate` wrote metrics.json; returns the PNG's path."""
    import json

    from training.runs import read_embedding, require_run_dir
    from tsimcne_core.errors import UserError

    run_dir = require_run_dir(run_dir)
    saved = read_embedding(run_dir)
    if saved is None:
        raise UserError(f"{run_dir}: no embedding.npz yet; it is written when training finishes")
    coords = saved["coords"]
    if coords.shape[1] < 2:
        raise UserError(f"{run_dir}: the map is {coords.shape[1]}-D; plotting needs 2-D")
    metrics_file = run_dir / "metrics.json"
    subtitle = ""
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        subtitle = f"kNN accuracy {metrics['knn_accuracy']:.3f}, silhouette {metrics['silhouette']:.3f}"
    target = Path(out) if out is not None else run_dir / "map.png"
    plot_map(
        coords[:, :2],
        saved.get("labels"),
        [str(c) for c in saved["class_names"]],
        target,
        title=f"t-SimCNE map of {run_dir.name} ({len(coords):,} images)",
        subtitle=subtitle,
    )
    return target
