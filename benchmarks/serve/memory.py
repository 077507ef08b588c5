"""Memory of one service worker against the size of the bundle's reference map (for sizing replicas).

    .venv/bin/python -m benchmarks.serve.memory [--bundle models/NAME] [--points 120 20000 100000]

Every worker holds the reference map (coordinates, ids, labels, the flag's projected features, the /map
JSON, and once /thumbnail is used, the thumbnails). For each size, the bundle is tiled to that many
reference points (benchmarks/harness/browser.py tile_bundle), `bentoml serve` started with one worker, and the largest
resident memory of its processes read when ready, after GET /map, after GET /thumbnail and after one
POST /embed. Without --bundle a tiny bundle is made with the project's CLI. Results: printed and written
to benchmarks/scratch/serve_memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.harness.browser import tile_bundle  # noqa: E402
from benchmarks.harness.cli import run_cli  # noqa: E402
from benchmarks.harness.servers import start_server  # noqa: E402
from benchmarks.results import record  # noqa: E402
from tsimcne_core.bundle_format import REFERENCE_FILE  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "scratch"


def largest_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    return max(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def tiny_bundle(work: Path) -> Path:
    data = work / "cells"
    for step in (
        ("synth", str(data), "--n", "120", "--size", "16"),
        ("train", "--data", str(data), "--name", "cells", "--recipe", "tiny", "--epochs", "2,1,1",
         "--runs-dir", str(work / "runs")),
        ("export", str(work / "runs" / "cells"), "--out", str(work / "cells-bundle")),
    ):  # fmt: skip
        result = run_cli(*step)
        if result.returncode != 0:
            sys.exit(f"error: tsimcne {step[0]} failed:\n{result.stderr[-2000:]}")
    return work / "cells-bundle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--points", type=int, nargs="+", default=[120, 20_000, 100_000])
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-memory-", dir=SCRATCH))
    source = args.bundle or tiny_bundle(work)
    rows = []
    for points in args.points:
        bundle = tile_bundle(source, work / f"map-{points}", points)
        with np.load(bundle / REFERENCE_FILE, allow_pickle=False) as reference:
            arrays = {key: reference[key].nbytes for key in reference.files}
        server = start_server(work, {"bundle": str(bundle), "workers": "1"}, home=work / "bentoml")
        try:
            row = {"points": points, "reference_npz_arrays_mb": round(sum(arrays.values()) / 2**20, 1)}
            row["ready_mb"] = largest_rss_mb(server.process.pid)
            with server.client() as client:
                client.get("/map").raise_for_status()
                row["after_map_mb"] = largest_rss_mb(server.process.pid)
                client.get("/thumbnail", params={"index": 0}).raise_for_status()
                row["after_thumbnail_mb"] = largest_rss_mb(server.process.pid)
                image = next((source.parent / "cells").rglob("*.png"), None) if args.bundle is None else None
                if image is not None:
                    client.post("/embed", files=[("images", (image.name, image.read_bytes()))]).raise_for_status()
                    row["after_embed_mb"] = largest_rss_mb(server.process.pid)
        finally:
            server.stop()
        row = {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    first, last = rows[0], rows[-1]
    per_point = {
        key: round((last[key] - first[key]) * 2**20 / (last["points"] - first["points"]))
        for key in ("ready_mb", "after_thumbnail_mb")
    }
    results = {
        "bundle": str(args.bundle or "tiny (16 px thumbnails, 32-d features)"),
        "arrays_per_point_bytes": {k: round(v / last["points"]) for k, v in arrays.items()},
        "rows": rows,
        "bytes_per_reference_point": per_point,
    }
    record(results, SCRATCH / "serve_memory.json")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
