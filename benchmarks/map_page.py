"""The map page with millions of points (issue 14): first drawing and pan/zoom frame times in headless Chromium.

    .venv/bin/python -m benchmarks.map_page --bundle models/pbc-tiny --points 1000000 10000000 [--runs 2]
    .venv/bin/python -m benchmarks.map_page --bundle models/pbc-cpu --points 100000 --runs 3 \
        --crop 200 --screenshot docs/page.png --upload <image files>   (the picture in the README)

For each --points: tiles the bundle's reference map to that many points (benchmarks/harness/browser.py `tile_bundle`:
each copy jittered by 1 % of the map's extent; thumbnails left out, since 1,000,000 of them take 2.4 GB
and the page only fetches the one under the cursor), serves it with a real `bentoml serve` (the page
reads GET /map?format=binary, gzip-compressed), opens the page in headless Chromium (the test suite's
flags) and, per run, loads it afresh and measures:
- the first full drawing: from navigation start to the animation frame after all points were drawn
  (HTML and scripts, /readyz, /info, the binary /map's points, the grid index, the drawing);
- when the ids (for hover) have arrived, after the drawing;
- a pan/zoom session: --frames animation frames, wheel-zooming in and out around a moving cursor for
  the first half and panning for the second; each frame's redraw time and the interval between frames.
--renderer picks the page's renderer (auto: WebGL on a graphics card, the 2-D canvas where WebGL is
missing or a software emulation, as in headless Chromium without a GPU; webgl forces WebGL).
--screenshot: after the runs (of the last --points), place the --upload images (their --crop x --crop
centre, as PBC's JPEGs were cropped for pbc_28.npz) and save a screenshot of the page.
Writes benchmarks/scratch/map_page.json and prints each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from benchmarks.harness.browser import (  # noqa: E402
    NEIGHBOUR_THUMBNAILS_LOADED,
    measure_page,
    start_chromium,
    tile_bundle,
    upload_files,
    wait_for,
)
from benchmarks.harness.servers import start_server  # noqa: E402
from benchmarks.results import record  # noqa: E402


def centre_crop(path: Path, side: int, folder: Path) -> Path:
    image = Image.open(path)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    out = folder / f"{path.stem}.png"
    image.crop((left, top, left + side, top + side)).save(out)
    return out


def take_screenshot(driver, uploads: list[Path], path: Path) -> None:
    driver.find_element(By.ID, "fit").click()
    if uploads:
        upload_files(driver, uploads)
        wait_for(driver, f"window.tsimcneMap.markers().length === {len(uploads)}", what="the markers")
        wait_for(driver, NEIGHBOUR_THUMBNAILS_LOADED, what="the neighbours' thumbnails")
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` and all its descendants (the service's workers), in MiB."""
    pids, total = [pid], 0
    while pids:
        current = pids.pop()
        try:
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pids += [int(c) for c in children]
    return round(total / 2**20, 1)


def measure(bundle: Path, points: int, args: argparse.Namespace, scratch: Path, screenshot: bool = False) -> dict:
    started = time.monotonic()
    big = tile_bundle(bundle, scratch / f"{bundle.name}-{points}", points, thumbnails=screenshot)
    tiled_s = time.monotonic() - started
    started = time.monotonic()
    server = start_server(scratch, {"bundle": str(big)}, home=scratch / f"bentoml-{points}", ready_timeout=1800)
    ready_s = time.monotonic() - started
    driver = start_chromium()
    runs = []
    try:
        url = f"{server.url}/?renderer={args.renderer}"
        for run in range(args.runs):
            figures = measure_page(driver, url, frames=args.frames)
            print(f"{points:,} points, run {run + 1}: {json.dumps(figures)}", flush=True)
            runs.append(figures)
        service_rss = rss_mib(server.process.pid)
        if screenshot:
            uploads = [centre_crop(p, args.crop, scratch) for p in args.upload] if args.crop else args.upload
            take_screenshot(driver, uploads, args.screenshot)
    finally:
        driver.quit()
        server.stop()
    return {
        "points": points,
        "tile_bundle_s": round(tiled_s, 1),
        "service_ready_s": round(ready_s, 1),
        "service_rss_mib": service_rss,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "pbc-tiny")
    parser.add_argument("--points", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--renderer", choices=("auto", "webgl", "canvas"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scratch" / "map_page.json")
    parser.add_argument("--screenshot", type=Path, help="also place --upload images and save a screenshot here")
    parser.add_argument("--upload", type=Path, nargs="*", default=[], help="image files for the screenshot")
    parser.add_argument(
        "--crop", type=int, help="send the uploads' N x N centre (PBC's JPEGs: 200, as pbc_28.npz was made)"
    )
    args = parser.parse_args()
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    results = []
    for points in args.points:
        with tempfile.TemporaryDirectory(prefix="map-page-") as scratch:
            last = points == args.points[-1] and args.screenshot is not None
            results.append(measure(args.bundle, points, args, Path(scratch), screenshot=last))
    report = {
        "bundle": str(args.bundle),
        "renderer": args.renderer,
        "chromium": chromium,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record(report, args.out)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
