"""What a longer CPU run buys: the `cpu` recipe with --time-budget 10, 30 and 120 minutes on all of PBC,
each scored (kNN accuracy, silhouette) and plotted against its wall clock.

    .venv/bin/python benchmarks/quality_vs_time.py [--minutes 10 30 120]

Timed work: run it alone on the machine (another heavy process would change the epochs each budget plans).
Under `taskset` it trains on the cores it is given (each result records how many; results and runs are
kept per core count).
Results: benchmarks/scratch/quality_vs_time/*.json (a finished budget is not trained again),
docs/quality-vs-time.png, and the table printed for benchmarks/README.md.
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
sys.path.insert(0, str(ROOT))

from training.files import atomic_write, atomic_write_json  # noqa: E402

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
SCRATCH = Path(os.environ.get("TSIMCNE_QVT_SCRATCH", ROOT / "benchmarks" / "scratch" / "quality_vs_time"))
TARGETS = {"knn_accuracy": 0.85, "silhouette": 0.35}
PAPER_GPU = {"knn_accuracy": 0.929, "silhouette": 0.50}  # BloodMNIST, full schedule (Nwabufo et al.)


def usable_cores() -> int:
    """CPU cores this process may run on (taskset / a container's cpuset), not the machine's count."""
    return len(os.sched_getaffinity(0))


def run_budget(minutes: float, data: Path, recipe: str, extra: list[str]) -> dict:
    cores = usable_cores()
    result_file = SCRATCH / f"{recipe}-{minutes:g}min-{cores}core.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    name = f"{recipe}-{minutes:g}min-{cores}core"
    cli = [sys.executable, "-m", "training.cli"]
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
    }
    atomic_write_json(result_file, result)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    minutes = [r["wall_minutes"] for r in results]
    for ax, key, label in ((axes[0], "knn_accuracy", "kNN accuracy"), (axes[1], "silhouette", "silhouette")):
        cores = results[0]["cores"]
        line = f"cpu recipe, {cores} CPU core{'s' if cores > 1 else ''}"
        ax.plot(minutes, [r[key] for r in results], "o-", color="#1f77b4", label=line)
        ax.axhline(TARGETS[key], color="#d62728", linestyle="--", linewidth=1, label=f"target {TARGETS[key]}")
        ax.axhline(PAPER_GPU[key], color="#7f7f7f", linestyle=":", linewidth=1, label=f"paper, GPU {PAPER_GPU[key]}")
        ax.set_xscale("log")
        ax.minorticks_off()  # only the measured budgets are labelled
        ax.set_xticks(minutes, [f"{m:.0f}" for m in minutes])
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
    args, extra = parser.parse_known_args()
    results = [run_budget(m, args.data, args.recipe, extra) for m in args.minutes]
    print("| budget | wall clock | epochs | kNN accuracy | silhouette | linear probe |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['budget_minutes']:g} min | {r['wall_minutes']:.1f} min | {'/'.join(map(str, r['epochs']))} "
            f"| {r['knn_accuracy']:.3f} | {r['silhouette']:.3f} | {r['linear_probe']:.3f} |"
        )
    plot(results, args.plot)
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
