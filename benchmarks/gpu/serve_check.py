"""The service on a GPU: `bentoml serve` with provider=cuda, checked and put under load, in one run.

    python benchmarks/gpu/serve_check.py BUNDLE --data pbc_28.npz [--seconds 20] [--out result.json]

For each configuration (provider, workers, images per request) it starts a real `bentoml serve`,
checks that /info reports the provider asked for, then runs `--clients` concurrent clients (asyncio +
httpx in this process) that POST real PNGs of the data to /embed for `--seconds` seconds and counts
images placed per second and request latencies. No locust here: the GPU machine has none; the load
generator shares the machine's cores with the service, which the figures include.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.harness.servers import start_server

DEFAULT_CONFIGURATIONS = "cuda:1:8,cuda:1:64,cuda:4:64,cpu:4:64"  # provider:workers:images per request


def png_files(npz: Path, count: int) -> list[tuple[str, bytes]]:
    with np.load(npz) as data:
        images = data["images"][-count:]
    files = []
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append((f"cell_{i:04d}.png", buffer.getvalue()))
    return files


async def load(url: str, files: list[tuple[str, bytes]], per_request: int, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    placed = 0
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(worker: int, session: httpx.AsyncClient) -> None:
        nonlocal placed, failures
        position = worker * per_request
        while time.perf_counter() < deadline:
            chosen = [files[(position + k) % len(files)] for k in range(per_request)]
            position += clients * per_request
            started = time.perf_counter()
            reply = await session.post("/embed", files=[("images", item) for item in chosen])
            latencies.append(time.perf_counter() - started)
            if reply.status_code == 200:
                placed += len(reply.json()["images"])
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, session) for w in range(clients)))
        elapsed = time.perf_counter() - started
    array = np.array(latencies) * 1000
    return {
        "images_per_s": round(placed / elapsed, 1),
        "requests": len(latencies),
        "failures": failures,
        "latency_ms_p50": round(float(np.percentile(array, 50)), 1),
        "latency_ms_p99": round(float(np.percentile(array, 99)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--configurations", default=DEFAULT_CONFIGURATIONS, help="provider:workers:images,...")
    args = parser.parse_args()
    configurations = [(p, int(w), int(n)) for p, w, n in (c.split(":") for c in args.configurations.split(","))]
    files = png_files(args.data, 1024)
    report = {"bundle": str(args.bundle), "clients": args.clients, "seconds": args.seconds, "runs": []}
    for provider, workers, per_request in configurations:
        with tempfile.TemporaryDirectory(prefix="serve-gpu-") as scratch:
            root = Path(scratch)
            settings = {"bundle": str(args.bundle.resolve()), "provider": provider, "workers": str(workers)}
            server = start_server(root, settings, home=root / "bentoml", ready_timeout=180)
            try:
                info = httpx.get(server.url + "/info", timeout=30).json()
                result = {"provider": info["provider"], "workers": workers, "per_request": per_request}
                expected = "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
                if info["provider"] != expected:
                    raise SystemExit(f"asked for {provider}, /info says {info['provider']}")
                asyncio.run(load(server.url, files, per_request, args.clients, 3))  # warm-up
                result.update(asyncio.run(load(server.url, files, per_request, args.clients, args.seconds)))
            finally:
                server.stop()
                log = server.log_text()
            result["tracebacks_in_log"] = log.count("Traceback")
            print(json.dumps(result), flush=True)
            report["runs"].append(result)
    report["cpu_cores"] = os.cpu_count()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
