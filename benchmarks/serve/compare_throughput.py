"""Images per second of the service from any checkout's serving/ (to compare code before and after a change).

    .venv/bin/python benchmarks/serve/compare_throughput.py --bundle BUNDLE [--source DIR] [--seconds 30]

Starts `bentoml serve` in --source (default: this checkout; see benchmarks/serve/upload_holes.py for how
the source is chosen) on BUNDLE, then 16 client threads post 8 real PBC images (28 px PNGs from
../shared/data/bloodcells/pbc_28.npz) per request, back to back, for --seconds. Prints one JSON line:
images/s and failed requests. Run the two sources alternately, several times: on a shared machine one
run says little.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.serve.upload_holes import SCRATCH, Service  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--source", type=Path, default=ROOT)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--decode-concurrency", help="TSIMCNE_DECODE_CONCURRENCY for the service (new code only)")
    args = parser.parse_args()
    with np.load(DEFAULT_DATA, allow_pickle=False) as data:
        images = data["images"][np.random.default_rng(0).permutation(len(data["images"]))[:256]]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="throughput-", dir=SCRATCH))
    env = {"TSIMCNE_DECODE_CONCURRENCY": args.decode_concurrency} if args.decode_concurrency else None
    service = Service(args.source.resolve(), args.bundle.resolve(), work / "home", work / "server.log", env=env)
    if not service.wait_ready():
        sys.exit(f"error: the service did not start; see {work / 'server.log'}")
    done = threading.Event()
    placed: list[int] = []
    failed: list[int] = []

    def client(first: int) -> None:
        count, index = 0, first
        with httpx.Client(base_url=service.url, timeout=120) as http:
            while not done.is_set():
                files = [("images", (f"{k}.png", pngs[(index + k) % len(pngs)])) for k in range(args.per_request)]
                reply = http.post("/embed", files=files)
                index += args.per_request
                if reply.status_code == 200:
                    count += args.per_request
                else:
                    failed.append(reply.status_code)
        placed.append(count)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(args.seconds)
    done.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    service.stop()
    result = {"source": str(args.source), "images_per_s": round(sum(placed) / elapsed, 1), "failed": len(failed)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
