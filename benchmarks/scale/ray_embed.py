"""Batch embedding: `tsimcne embed --engine ray` against the one-process `tsimcne embed`, same files.

    taskset -c 1 .venv/bin/python -m benchmarks.scale.ray_embed BUNDLE [--images 5000] [--ray-address ADDR]

Writes N PNG files from ../shared/data/bloodcells/pbc_28.npz (real PBC cells at 28 px, cycled when N is
larger than the 17,092 images; kept in --workdir for the next run), then runs both commands as a user
would, each as its own process, and times them end to end (process start, Ray's start, listing, reading,
decoding, placing, writing). Reported per engine: wall seconds and images/s; for Ray also the job's own
seconds from its summary line (without starting Ray and importing the CLI). Both outputs are read back
and compared (rows, errors, largest coordinate difference), so a fast wrong answer does not count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.results import SCRATCH as RESULT_SCRATCH
from benchmarks.results import record

ROOT = Path(__file__).resolve().parents[2]
PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"


def write_pngs(folder: Path, count: int) -> list[Path]:
    """`count` PBC cells as PNG files (reused when the folder already holds them)."""
    from PIL import Image
    from tqdm import tqdm

    files = [folder / f"{i // 1000:04d}" / f"cell{i:07d}.png" for i in range(count)]
    if all(f.exists() for f in files[-3:]) and len(list(folder.rglob("*.png"))) == count:
        return files
    with np.load(PBC, allow_pickle=False) as data:
        images = data["images"]
    for i, path in enumerate(tqdm(files, desc="writing PNGs", unit="file")):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(path)
    return files


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def compare(local: Path, shards: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    one = pq.read_table(local).sort_by("index")
    other = pq.read_table(shards).sort_by("index")
    same_ids = one.column("id").to_pylist() == other.column("id").to_pylist()
    same_flags = one.column("flag").to_pylist() == other.column("flag").to_pylist()
    coords = [np.array([t.column(c).to_numpy() for c in ("x", "y")], dtype=np.float64) for t in (one, other)]
    return {
        "rows": other.num_rows,
        "same_ids": same_ids,
        "same_flags": same_flags,
        "max_coordinate_difference": float(np.nanmax(np.abs(coords[0] - coords[1]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ray-address", default=None, help="a cluster to use (default: a local Ray)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "scratch" / "ray-embed")
    args = parser.parse_args()
    files = write_pngs(args.workdir / f"pngs-{args.images}", args.images)
    folder = files[0].parent.parent
    cli = [sys.executable, "-m", "tsimcne_cli", "embed", str(args.bundle), str(folder), "--provider", "cpu"]
    cli += ["--batch-size", str(args.batch_size)]
    local_out, ray_out = args.workdir / "local.parquet", args.workdir / "ray-shards"

    local_s, _ = timed([*cli, "--out", str(local_out)])
    ray_cli = [*cli, "--engine", "ray", "--out", str(ray_out)]
    if args.ray_address:
        ray_cli += ["--ray-address", args.ray_address]
    ray_s, printed = timed(ray_cli)
    job = re.search(r"([\d,]+) images/s", printed)
    report = {
        "images": args.images,
        "batch_size": args.batch_size,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "one_process": {"seconds": round(local_s, 1), "images_per_s": round(args.images / local_s)},
        "ray": {
            "seconds": round(ray_s, 1),
            "images_per_s": round(args.images / ray_s),
            "job_images_per_s": int(job.group(1).replace(",", "")) if job else None,
            "summary": printed.strip().splitlines()[-1],
        },
        "agreement": compare(local_out, ray_out),
    }
    print(json.dumps(report, indent=2))
    print("written to", record(report, RESULT_SCRATCH / "ray_embed.json"))


if __name__ == "__main__":
    main()
