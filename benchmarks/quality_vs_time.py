"""What a longer CPU run buys: the `cpu` recipe with --time-budget 10, 30 and 120 minutes on all of PBC,
each scored (kNN accuracy, silhouette) and plotted against its wall clock.

    .venv/bin/python -m benchmarks.quality_vs_time [--minutes 10 30 120]

Timed work: run it alone on the machine (another heavy process would change the epochs each budget plans).
Under `taskset` it trains on the cores it is given. Results and runs are kept per budget, core count and
learning rate (benchmarks/scratch/quality_vs_time/*.json; a finished one is not trained again); the plot
(docs/quality-vs-time.png) draws one curve for each core count and learning rate measured so far, and the
table of the budgets asked for is printed for benchmarks/README.md (`--plot-only`: trains nothing, tables
and plots what is cached). Options it does not know (`--lr 0.06`) go to `tsimcne train`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tsimcne_core.cores import usable_cores  # noqa: E402
from tsimcne_core.files import atomic_write, atomic_write_json  # noqa: E402

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
SCRATCH = Path(os.environ.get("TSIMCNE_QVT_SCRATCH", ROOT / "benchmarks" / "scratch" / "quality_vs_time"))
TARGETS = {"knn_accuracy": 0.85, "silhouette": 0.35}
PAPER_GPU = {"knn_accuracy": 0.929, "silhouette": 0.50}  # BloodMNIST, full schedule (Nwabufo et al.)


def planned_lr(recipe: str, extra: list[str]) -> float:
    """The stage-1 learning rate `tsimcne train --recipe RECIPE EXTRA...` will use (part of a result's key)."""
    from training.config import build_config

    overrides: dict = {"data": "-"}
    if "--lr" in extra:
        overrides["base_lr"] = float(extra[extra.index("--lr") + 1])
    if "--batch-size" in extra:
        overrides["batch_size"] = int(extra[extra.index("--batch-size") + 1])
    config = build_config(recipe, overrides)
    return round(config.lr_for_stage(1, config.batch_size), 6)


def run_budget(minutes: float, data: Path, recipe: str, extra: list[str]) -> dict:
    cores, lr = usable_cores(), planned_lr(recipe, extra)
    name = f"{recipe}-{minutes:g}min-{cores}core-lr{lr:g}"
    result_file = SCRATCH / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cli = [sys.executable, "-m", "tsimcne_cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = [*cli, "train", "--data", str(data), "--name", name, "--runs-dir", str(SCRATCH / "runs"), "--overwrite"]
    train += ["--recipe", recipe, "--time-budget", f"{minutes:g}m", "--no-progress", *extra]
    started = time.perf_counter()
    subprocess.run(train, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - started
    run = SCRATCH / "runs" / name
    subprocess.run([*cli, "evaluate", str(run), "--linear"], cwd=ROOT, env=env, check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    plan = json.loads((run / "budget.json").read_text())
    result = {
        "budget_minutes": minutes,
        "wall_minutes": round(wall / 60, 2),
        "epochs": plan["epochs"],
        "step_s": plan["step_s"],
        "knn_accuracy": metrics["knn_accuracy"],
        "silhouette": metrics["silhouette"],
        "linear_probe": metrics["linear_probe"]["linear_accuracy"],
        "cores": cores,
        "lr": lr,
    }
    atomic_write_json(result_file, result)
    return result


def curves(recipe: str) -> dict[tuple[int, float], list[dict]]:
    """Every result measured so far for `recipe`, by (cores, lr), each curve in order of time."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for path in sorted(SCRATCH.glob(f"{recipe}-*min-*core-lr*.json")):
        result = json.loads(path.read_text())
        groups.setdefault((result["cores"], result["lr"]), []).append(result)
    return {key: sorted(group, key=lambda r: r["wall_minutes"]) for key, group in sorted(groups.items())}


def plot(groups: dict[tuple[int, float], list[dict]], recipe: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    all_minutes = sorted({r["budget_minutes"] for group in groups.values() for r in group})
    for ax, key, label in ((axes[0], "knn_accuracy", "kNN accuracy"), (axes[1], "silhouette", "silhouette")):
        for colour, ((cores, lr), results) in zip(colours, groups.items(), strict=False):
            line = f"{recipe} recipe, lr {lr:g}, {cores} CPU core{'s' if cores > 1 else ''}"
            minutes = [r["wall_minutes"] for r in results]
            ax.plot(minutes, [r[key] for r in results], "o-", color=colour, label=line)
        ax.axhline(TARGETS[key], color="#d62728", linestyle="--", linewidth=1, label=f"target {TARGETS[key]}")
        ax.axhline(PAPER_GPU[key], color="#7f7f7f", linestyle=":", linewidth=1, label=f"paper, GPU {PAPER_GPU[key]}")
        ax.set_xscale("log")
        ax.minorticks_off()  # only the measured budgets are labelled
        ax.set_xticks(all_minutes, [f"{m:.0f}" for m in all_minutes])
        ax.set_xlabel("training wall clock (minutes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="center left")
    fig.suptitle("PBC (17,092 images, 28 px): map quality against training time", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 30, 120])
    parser.add_argument("--data", type=Path, default=PBC)
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "quality-vs-time.png")
    parser.add_argument("--plot-only", action="store_true", help="train nothing: table and plot of what is cached")
    args, extra = parser.parse_known_args()
    if args.plot_only:
        groups = curves(args.recipe)
    else:
        results = [run_budget(m, args.data, args.recipe, extra) for m in args.minutes]
        groups = {(results[0]["cores"], results[0]["lr"]): results}
    print("| cores | lr | budget | wall clock | epochs | kNN accuracy | silhouette | linear probe |")
    print("|---|---|---|---|---|---|---|---|")
    for (cores, lr), results in groups.items():
        for r in results:
            print(
                f"| {cores} | {lr:g} | {r['budget_minutes']:g} min | {r['wall_minutes']:.1f} min "
                f"| {'/'.join(map(str, r['epochs']))} | {r['knn_accuracy']:.3f} | {r['silhouette']:.3f} "
                f"| {r['linear_probe']:.3f} |"
            )
    plot(curves(args.recipe), args.recipe, args.plot)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
