"""Memory of each serving worker with a large reference set: the bundle's feature index and arrays
memory-mapped and shared between workers (bundles exported since issue 14) against each worker
building and holding its own copies (the older bundle layout).

    taskset -c 1 nice -n 5 .venv/bin/python -m benchmarks.scale.worker_memory --points 200000 --workers 2

A bundle with a large reference set is made from a small real one (--bundle; without it a tiny width-16
bundle, 128-D features, is made with the project's CLI): its model, preprocessing and calibration are
kept, its reference is replaced by --points synthetic points (2-D map positions in 8 Gaussian clusters,
labels by cluster, ids "synthetic-<i>"; projected features from benchmarks/scale/synthetic_features.py
in the bundle's feature dimensions), and the feature index is planned over them as export plans it
(training/index_building.py `plan_feature_index`: FAISS flat up to 200,000 points, IVF above). Two copies:
- "shared": the layout `tsimcne export` writes now: reference.npz plus reference_coords.npy,
  reference_features.npy and reference_features.faiss, which the workers memory-map;
- "own copies": reference.npz only (bundles exported before): every worker decompresses the
  features and builds the index from bundle.json's record.
Each is served by a real `bentoml serve` with --workers workers; after /readyz and one POST /embed, the
RSS and PSS (/proc/PID/smaps_rollup: resident memory with each shared page divided among the processes
sharing it) of every worker are read. Written to benchmarks/scratch/scale_worker_memory.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.harness.cli import run_cli  # noqa: E402
from benchmarks.harness.servers import start_server  # noqa: E402
from benchmarks.results import record  # noqa: E402
from benchmarks.scale.synthetic_features import clustered_unit_features  # noqa: E402
from training.index_building import plan_feature_index  # noqa: E402
from tsimcne_core.bundle_format import (  # noqa: E402
    COORDS_FILE,
    FEATURE_INDEX_FILE,
    FEATURES_FILE,
    MANIFEST,
    REFERENCE_FILE,
    open_bundle,
    sha256_file,
)

SCRATCH = ROOT / "benchmarks" / "scratch"
ROLLUP_FIELDS = ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty")


def make_base_bundle(folder: Path) -> Path:
    """A tiny real bundle with 128-D features: 120 synthetic 16 px cells, a width-16 network, 2/1/1 epochs."""
    steps = [
        ("synth", str(folder / "cells"), "--n", "120", "--size", "16"),
        ("train", "--data", str(folder / "cells"), "--name", "base", "--recipe", "tiny", "--width", "16",
         "--epochs", "2,1,1", "--runs-dir", str(folder / "runs")),
        ("export", str(folder / "runs" / "base"), "--out", str(folder / "base")),
    ]  # fmt: skip
    for step in steps:
        result = run_cli(*step, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"tsimcne {step[0]} failed:\n{result.stderr[-3000:]}")
    return folder / "base"


def make_large_bundles(base: Path, points: int, folder: Path) -> dict[str, Path]:
    """The "shared" and "own copies" bundles with `points` synthetic reference points (module docstring)."""
    manifest = json.loads((base / MANIFEST).read_text())
    with np.load(base / REFERENCE_FILE, allow_pickle=False) as reference:
        kept = {key: reference[key] for key in ("class_names", "feature_mean", "feature_components")}
    dims = kept["feature_components"].shape[0]
    rng = np.random.default_rng(0)
    classes = len(kept["class_names"])
    labels = rng.integers(0, classes, points)
    centres = rng.normal(0, 20, (classes, 2))
    coords = (centres[labels] + rng.normal(0, 3, (points, 2))).astype(np.float32)
    features = clustered_unit_features(points, seed=1, dims=dims)
    print(f"planning the feature index over {points:,} x {dims} features ...", flush=True)
    index, record = plan_feature_index(features, clustered_unit_features(500, seed=2, dims=dims), 15, sample=500)
    print(f"feature index: {record.model_dump()}", flush=True)
    manifest["calibration"]["features"]["index"] = record.model_dump(mode="json")
    arrays = {
        "coords": coords,
        "ids": np.array([f"synthetic-{i}" for i in range(points)]),
        "labels": labels,
        "features": features,
        **kept,
    }
    bundles = {}
    for layout in ("shared", "own copies"):
        target = folder / layout.replace(" ", "-")
        target.mkdir(parents=True)
        shutil.copy2(base / "model.onnx", target / "model.onnx")
        shutil.copy2(base / "map.png", target / "map.png")
        with open(target / REFERENCE_FILE, "wb") as handle:
            np.savez(handle, **arrays)
        names = ["model.onnx", "map.png", REFERENCE_FILE]
        if layout == "shared":
            np.save(target / COORDS_FILE, coords)
            np.save(target / FEATURES_FILE, features)
            index.save(target / FEATURE_INDEX_FILE)
            names += [COORDS_FILE, FEATURES_FILE, FEATURE_INDEX_FILE]
        manifest["files"] = {name: sha256_file(target / name) for name in names}
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        open_bundle(target)  # verifies
        bundles[layout] = target
    return bundles


def rollup(pid: int) -> dict[str, float]:
    """MiB of each ROLLUP_FIELDS line of /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ROLLUP_FIELDS:
            values[key.lower()] = round(int(rest.split()[0]) / 1024, 1)
    return values


def workers(pid: int) -> list[psutil.Process]:
    """The service worker processes of a `bentoml serve` (the descendants that opened the bundle)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "serve_http" in " ".join(child.cmdline()) or "worker" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def measure(bundle: Path, layout: str, args: argparse.Namespace, folder: Path) -> dict:
    started = time.monotonic()
    server = start_server(
        folder, {"bundle": str(bundle), "workers": str(args.workers)}, home=folder / f"home-{bundle.name}",
        ready_timeout=3600,
    )  # fmt: skip
    ready_s = time.monotonic() - started
    try:
        manifest = open_bundle(bundle)
        side = manifest.preprocessing.height
        png = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(png, "PNG")
        for _ in range(4 * args.workers):  # reach every worker (requests are spread between them)
            response = httpx.post(server.url + "/embed", files=[("images", ("x.png", png.getvalue()))], timeout=120)
            response.raise_for_status()
        info = httpx.get(server.url + "/info", timeout=30).json()
        time.sleep(2)
        processes = workers(server.process.pid)
        rows = [{"pid": p.pid, **rollup(p.pid)} for p in processes]
        everything = [server.process.pid, *(c.pid for c in psutil.Process(server.process.pid).children(recursive=True))]
        total_pss = round(sum(rollup(pid)["pss"] for pid in everything), 1)
    finally:
        server.stop()
    result = {
        "layout": layout,
        "points": args.points,
        "ready_s": round(ready_s, 1),
        "feature_index": info.get("neighbour_index"),
        "workers": rows,
        "all_processes_pss_mib": total_pss,
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a real exported bundle (default: make a tiny one)")
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=SCRATCH / "scale_worker_memory.json")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="worker-memory-", dir=SCRATCH) as scratch:
        folder = Path(scratch)
        base = args.bundle or make_base_bundle(folder / "base-bundle")
        bundles = make_large_bundles(base, args.points, folder)
        results = [measure(path, layout, args, folder) for layout, path in bundles.items()]
    summary = {
        "results": results,
    }
    record(summary, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
