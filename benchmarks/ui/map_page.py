"""The map page with a big map: first drawing and pan/zoom smoothness in headless Chromium.

    .venv/bin/python benchmarks/ui/map_page.py --bundle models/pbc-cpu --points 100000 [--runs 3]

Tiles the bundle's reference map to --points points (each copy jittered by 1 % of the map's extent;
tests/browser.py `tile_bundle`), serves it with a real `bentoml serve`, opens the page in headless
Chromium (the test suite's flags) and, per run, loads the page afresh and measures:
- the first drawing of the map: from navigation start to the end of the first complete drawing of all
  points (HTML and script, /readyz, /info, /map fetch and parse, grid index, drawing);
- a pan/zoom session: 240 animation frames, wheel-zooming in and out around moving points for the
  first half and panning for the second; the redraw time of each frame and the interval between frames.
Writes the figures to benchmarks/scratch/ui/map_page.json and prints them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from tests.browser import (  # noqa: E402
    NEIGHBOUR_THUMBNAILS_LOADED,
    measure_page,
    start_chromium,
    tile_bundle,
    upload_files,
    wait_for,
)
from tests.servers import start_server  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "pbc-cpu")
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scratch" / "ui" / "map_page.json")
    parser.add_argument("--screenshot", type=Path, help="also place --upload images and save a screenshot here")
    parser.add_argument("--upload", type=Path, nargs="*", default=[], help="image files for the screenshot")
    parser.add_argument(
        "--crop", type=int, help="send the uploads' N x N centre (PBC's JPEGs: 200, as pbc_28.npz was made)"
    )
    args = parser.parse_args()
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="map-page-") as scratch:
        root = Path(scratch)
        big = tile_bundle(args.bundle, root / f"{args.bundle.name}-{args.points}", args.points)
        server = start_server(root, {"bundle": str(big)}, home=root / "bentoml", ready_timeout=300)
        driver = start_chromium()
        try:
            runs = []
            for run in range(args.runs):
                figures = measure_page(driver, server.url + "/", frames=args.frames)
                print(f"run {run + 1}: {json.dumps(figures)}", flush=True)
                runs.append(figures)
            if args.screenshot:
                uploads = [centre_crop(p, args.crop, root) for p in args.upload] if args.crop else args.upload
                take_screenshot(driver, uploads, args.screenshot)
        finally:
            driver.quit()
            server.stop()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": str(args.bundle),
        "points": args.points,
        "chromium": chromium,
        "python": platform.python_version(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
