"""Summarise a reference run for benchmarks/README.md: time, images/s, model TFLOP/s, MFU, quality vs targets.

    python -m benchmarks.gpu.summarize RESULTS_DIR --train-seconds S --gpu "NVIDIA H200, ..."

Reads log.jsonl, metrics.json and config.json from RESULTS_DIR; writes summary.json and summary.md there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from training.flops import peak_flops

TARGETS = {"train_seconds": 600, "knn_accuracy": 0.93, "silhouette": 0.50}


def summarise(results: Path, train_seconds: float, gpu: str) -> dict:
    records = [json.loads(line) for line in (results / "log.jsonl").read_text().splitlines() if line.strip()]
    metrics_file = results / "metrics.json"  # absent when training was stopped before the end
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    config = json.loads((results / "config.json").read_text())
    peak = peak_flops(gpu)
    stages = {}
    for stage in (1, 2, 3):
        rows = [r for r in records if r["stage"] == stage]
        if not rows:
            continue
        steady = rows[1:] or rows  # the first epoch carries start-up and compilation
        tflops = statistics.median(r.get("model_tflop_s", 0.0) for r in steady)
        stages[stage] = {
            "epochs": len(rows),
            "seconds": round(sum(r["seconds"] for r in rows), 1),
            "first_epoch_seconds": rows[0]["seconds"],
            "images_per_s": round(statistics.median(r["images_per_s"] for r in steady)),
            "model_tflop_s": round(tflops, 2),
            "mfu": round(tflops * 1e12 / peak, 3) if peak else None,
        }
    probe = metrics.get("linear_probe") or {}
    planned = config["epochs"]
    per_epoch = {stage: row["seconds"] / row["epochs"] for stage, row in stages.items()}
    if 1 in per_epoch:  # stages that did not run: stage 3 costs what stage 1 does, stage 2 about half
        per_epoch.setdefault(3, per_epoch[1])
        per_epoch.setdefault(2, 0.5 * per_epoch[1])
    projected = sum(per_epoch.get(stage, 0.0) * planned[stage - 1] for stage in (1, 2, 3))
    knn, silhouette = metrics.get("knn_accuracy"), metrics.get("silhouette")
    summary = {
        "gpu": gpu,
        "peak_bf16_flops": peak,
        "config": {k: config[k] for k in ("width", "epochs", "batch_size", "augmentation", "compile", "seed")},
        "train_seconds": round(train_seconds),
        "finished": bool(metrics),
        "projected_train_seconds": round(projected),  # the planned epochs at the measured (or estimated) times
        "stages": stages,
        "knn_accuracy": knn,
        "silhouette": silhouette,
        "linear_probe": probe.get("linear_accuracy"),
        "targets": TARGETS,
        "met": {
            "train_seconds": bool(metrics) and train_seconds < TARGETS["train_seconds"],
            "knn_accuracy": knn is not None and knn >= TARGETS["knn_accuracy"],
            "silhouette": silhouette is not None and silhouette >= TARGETS["silhouette"],
        },
    }
    return summary


def as_markdown(summary: dict) -> str:
    def score(key: str) -> str:
        return "not evaluated (training did not finish)" if summary[key] is None else f"{summary[key]:.3f}"

    lines = [
        f"GPU: {summary['gpu']}; config {summary['config']}",
        f"training wall clock {summary['train_seconds']} s, finished: {summary['finished']}; the planned schedule "
        f"at the measured epoch times: {summary['projected_train_seconds']} s (target < {TARGETS['train_seconds']} s)",
        f"kNN {score('knn_accuracy')} (>= {TARGETS['knn_accuracy']}), silhouette {score('silhouette')} "
        f"(>= {TARGETS['silhouette']}), linear probe {summary['linear_probe']}",
        "",
        "| stage | epochs | seconds | first epoch s | images/s | model TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, row in summary["stages"].items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        lines.append(
            f"| {stage} | {row['epochs']} | {row['seconds']} | {row['first_epoch_seconds']} | {row['images_per_s']:,} "
            f"| {row['model_tflop_s']} | {mfu} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--train-seconds", type=float, required=True)
    parser.add_argument("--gpu", default="cpu")
    args = parser.parse_args()
    summary = summarise(args.results, args.train_seconds, args.gpu)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = as_markdown(summary)
    (args.results / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
