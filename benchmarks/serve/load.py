"""Load benchmark of the service (issue 4): locust against a real `bentoml serve`, beside raw onnxruntime.

    .venv/bin/pip install -e ".[bench]"      # locust (kept out of the dev install: it patches networking)
    .venv/bin/python benchmarks/serve/load.py --bundle models/pbc-cpu --per-request 1,8

1. Writes real PBC images (28x28, from ../shared/data/bloodcells/pbc_28.npz, a seeded random sample)
   as PNG files.
2. Raw onnxruntime: the bundle's model alone on already-prepared batches of 64, same threads as the
   service, for --raw-seconds (before and after the load runs; the mean is reported).
3. Starts `bentoml serve` on loopback and runs locust headless with --users clients for --seconds,
   once per images-per-request value; 0 failures expected. Then reads the service's own metrics
   (images embedded, model runs, mean batch).
Results: printed and written to benchmarks/scratch/serve_load.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "scale"))  # worker_memory.rollup

from benchmarks.harness.servers import metric_value, start_server  # noqa: E402
from tsimcne_core.placing import Placer  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
SCRATCH = ROOT / "benchmarks" / "scratch"


def write_images(npz: Path, out: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    with np.load(npz) as data:
        images = data["images"]
        chosen = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
        picked = [images[i] for i in sorted(chosen)]
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(picked):
        Image.fromarray(image).save(out / f"pbc-{i:04d}.png")
    return picked


def raw_onnxruntime(bundle: Path, images: list[np.ndarray], seconds: float, threads: int, batch: int = 64) -> float:
    """Images per second of the model alone (input already prepared), as the service would run it."""
    embedder = Placer(bundle, provider="cpu", threads=threads)
    prepared = embedder.prepare(images[:batch])
    feed = {embedder.manifest.input_name: prepared}
    embedder.session.run(None, feed)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.session.run(None, feed)  # the ONNX model alone, both outputs
        done += len(prepared)
    return done / (time.perf_counter() - started)


def run_locust(url: str, images_dir: Path, users: int, seconds: int, per_request: int, prefix: Path) -> dict:
    env = {**os.environ, "LOAD_IMAGES_DIR": str(images_dir), "LOAD_IMAGES_PER_REQUEST": str(per_request)}
    command = [
        str(Path(sys.executable).with_name("locust")),
        "-f", str(Path(__file__).with_name("locustfile.py")),
        "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        "--host", url, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    with open(f"{prefix}_stats.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "/embed")
    requests, failures = int(row["Request Count"]), int(row["Failure Count"])
    return {
        "images_per_request": per_request,
        "users": users,
        "seconds": seconds,
        "requests": requests,
        "failures": failures,
        "locust_exit_code": result.returncode,
        "requests_per_s": float(row["Requests/s"]),
        "images_per_s": float(row["Requests/s"]) * per_request,
        "latency_ms": {"p50": float(row["50%"]), "p90": float(row["90%"]), "p99": float(row["99%"])},
    }


def service_memory(pid: int) -> list[dict[str, object]]:
    """RSS and PSS (MiB) of `bentoml serve` and each of its children (benchmarks/scale/worker_memory.py)."""
    import psutil
    from worker_memory import rollup

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [{"pid": p.pid, "command": " ".join(p.cmdline()[:4]), **rollup(p.pid)} for p in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "pbc-cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--per-request", default="1,8", help="images per request, comma-separated runs")
    parser.add_argument("--raw-seconds", type=float, default=15)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads, service and raw alike")
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()

    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-load-", dir=SCRATCH))
    images = write_images(args.data, work / "images", args.images)
    raw_before = raw_onnxruntime(args.bundle, images, args.raw_seconds, args.threads)
    print(f"raw onnxruntime (batch 64): {raw_before:,.0f} images/s", flush=True)

    server = start_server(
        work, {"bundle": str(args.bundle.resolve()), "threads": str(args.threads)}, home=work / "bentoml"
    )
    runs = []
    try:
        for per_request in [int(v) for v in args.per_request.split(",")]:
            import httpx

            before = httpx.get(server.url + "/metrics").text
            run = run_locust(
                server.url, work / "images", args.users, args.seconds, per_request, work / f"locust{per_request}"
            )
            after = httpx.get(server.url + "/metrics").text
            delta = {
                name: metric_value(after, name) - metric_value(before, name)
                for name in ("tsimcne_images_embedded_total", "tsimcne_batch_images_sum", "tsimcne_batch_images_count")
            }
            run["service_images_embedded"] = delta["tsimcne_images_embedded_total"]
            run["mean_model_batch"] = delta["tsimcne_batch_images_sum"] / max(1.0, delta["tsimcne_batch_images_count"])
            runs.append(run)
            print(json.dumps(run), flush=True)
        assert httpx.get(server.url + "/readyz").status_code == 200
        worker_memory = service_memory(server.process.pid)
    finally:
        server.stop()
    server_errors = server.log_text().count("status=5")
    raw_after = raw_onnxruntime(args.bundle, images, args.raw_seconds, args.threads)
    raw = (raw_before + raw_after) / 2
    for run in runs:
        run["share_of_raw_onnxruntime"] = run["images_per_s"] / raw
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "bundle": str(args.bundle),
        "raw_onnxruntime_images_per_s": {"before": raw_before, "after": raw_after, "mean": raw},
        "server_5xx_in_log": server_errors,
        "service_memory_mib": worker_memory,  # per process: rss, pss, ... in MiB
        "runs": runs,
    }
    (SCRATCH / "serve_load.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
