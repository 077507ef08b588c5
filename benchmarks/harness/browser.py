"""Headless Chromium for the map page's tests and benchmark, and a bundle whose map has many points.

Chromium and its driver come from the system (Debian: `apt-get install chromium chromium-driver`;
scripts/test installs them when missing and it can); selenium drives them without downloading anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tsimcne_core.bundle_format import (
    COORDS_FILE,
    FEATURE_INDEX_FILE,
    FEATURES_FILE,
    MANIFEST,
    REFERENCE_FILE,
    sha256_file,
)

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--window-size=1280,800",
)


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = os.environ.get("TSIMCNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("TSIMCNE_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium() -> webdriver.Chrome:
    found = find_chromium()
    if found is None:
        raise RuntimeError("Chromium or chromedriver not found (apt-get install chromium chromium-driver)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(driver: webdriver.Chrome, script: str, timeout: float = 30, what: str = "condition"):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        time.sleep(0.05)
    status = driver.execute_script("return document.getElementById('status')?.textContent")
    raise AssertionError(f"timed out waiting for {what} ({script}); page status: {status!r}")


# True once every neighbour thumbnail in the side panel has loaded.
NEIGHBOUR_THUMBNAILS_LOADED = "[...document.querySelectorAll('.neighbours img')].every(img => img.naturalWidth > 0)"


def upload_files(driver: webdriver.Chrome, paths: list[Path]) -> None:
    """Choose `paths` in the page's file picker (a real file input, as a user's selection)."""
    driver.find_element(By.ID, "file-input").send_keys("\n".join(str(Path(p).resolve()) for p in paths))


def wait_until_drawn(driver: webdriver.Chrome, timeout: float = 60) -> dict:
    wait_for(driver, "window.tsimcneMap && window.tsimcneMap.stats.ready", timeout, "the map's first drawing")
    return driver.execute_script("return window.tsimcneMap.stats")


SERVING_ARRAYS = (COORDS_FILE, FEATURES_FILE, FEATURE_INDEX_FILE)


def tile_bundle(source: Path, target: Path, points: int, seed: int = 0, thumbnails: bool = True) -> Path:
    """A copy of bundle `source` whose reference map holds `points` points: the original map repeated,
    each copy jittered by 1 % of the map's extent (so it looks like a big collection, not stacked points),
    with ids, labels, thumbnails and features repeated alike. The flag's calibration is the original's,
    so flags on this bundle mean nothing; it is for measuring the page and the map endpoints.
    thumbnails=False leaves them out (10,000,000 28 px thumbnails would take 23 GB). The copy has the
    older layout (reference.npz only; serving builds the feature index from bundle.json's record)."""
    target.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with np.load(source / REFERENCE_FILE, allow_pickle=False) as reference:
        data = {key: reference[key] for key in reference.files}
    n = len(data["coords"])
    take = np.arange(points) % n
    extent = data["coords"].max(0) - data["coords"].min(0)
    coords = data["coords"][take] + rng.normal(0, 0.01, (points, data["coords"].shape[1])) * extent
    data["coords"] = coords.astype(np.float32)
    data["ids"] = np.array([f"{data['ids'][i]}#{k // n}" for k, i in enumerate(take)])
    if not thumbnails:
        data.pop("thumbnails", None)
    for key in ("labels", "thumbnails", "features"):
        if key in data:
            data[key] = data[key][take]
    with open(target / REFERENCE_FILE, "wb") as handle:
        np.savez(handle, **data)
    manifest = json.loads((source / MANIFEST).read_text())
    for name in SERVING_ARRAYS:  # the untiled arrays and index: left out, so serving reads reference.npz
        manifest["files"].pop(name, None)
    for name in manifest["files"]:
        if name != REFERENCE_FILE:
            shutil.copy2(source / name, target / name)
        manifest["files"][name] = sha256_file(target / name)
    manifest["name"] = target.name
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return target


# Runs in the page: wheel-zooms in and out around moving points, then pans, one step per animation frame,
# and reports the time each redraw took and the interval between frames.
INTERACTION_SCRIPT = """
const done = arguments[arguments.length - 1];
const frames = arguments[0];
const canvas = document.getElementById('map');
const rect = canvas.getBoundingClientRect();
const map = window.tsimcneMap;
const draws = [], intervals = [];
let last = null, step = 0;
function frame(now) {
  if (last !== null) { intervals.push(now - last); draws.push(map.stats.lastDrawMs); }
  last = now;
  if (step >= frames) { done({draws, intervals}); return; }
  const phase = step / frames;
  if (phase < 0.5) {
    const zoomIn = step % 60 < 30;
    canvas.dispatchEvent(new WheelEvent('wheel', {
      deltaY: zoomIn ? -40 : 40, deltaMode: 0, bubbles: true, cancelable: true,
      clientX: rect.left + rect.width * (0.3 + 0.4 * Math.sin(step / 17)),
      clientY: rect.top + rect.height * (0.5 + 0.3 * Math.cos(step / 23)),
    }));
  } else {
    map.panBy(6 * Math.cos(step / 20), 4 * Math.sin(step / 15));
  }
  step++;
  requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
"""


def summarise(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {
        "median": round(float(np.median(array)), 2),
        "p95": round(float(np.percentile(array, 95)), 2),
        "max": round(float(array.max()), 2),
    }


def measure_page(driver: webdriver.Chrome, url: str, frames: int = 240) -> dict:
    """Load the page at `url` and measure its first drawing of the map and a pan-and-zoom session."""
    driver.get(url)
    stats = wait_until_drawn(driver, timeout=300)
    shown = wait_for(driver, "performance.getEntriesByName('tsimcne-map-shown')[0]?.startTime", 300, "the shown map")
    wait_for(driver, "window.tsimcneMap.stats.idsReady", 600, "the ids")
    stats = driver.execute_script("return window.tsimcneMap.stats")
    driver.set_script_timeout(600)
    session = driver.execute_async_script(INTERACTION_SCRIPT, frames)
    intervals = session["intervals"]
    timings = stats["timings"]
    return {
        "points": stats["drawnPoints"],
        "renderer": stats["renderer"],
        "map_bytes": timings["bytes"],
        "map_wire_bytes": timings.get("wireBytes"),
        "first_map_drawing_ms": round(shown, 1),
        "page_to_map_request_ms": round(timings["loadStartMs"], 1),
        "fetch_info_and_points_ms": round(timings["fetchMs"], 1),
        "index_ms": round(timings["indexMs"], 1),
        "first_draw_ms": round(timings["firstDrawMs"], 1),
        "ids_arrived_ms": round(timings["loadStartMs"] + timings["idsMs"], 1),
        "frames": len(intervals),
        "redraw_ms": summarise(session["draws"]),
        "frame_interval_ms": summarise(intervals),
        "frames_per_s": round(1000 * len(intervals) / sum(intervals), 1),
        "frames_over_33ms": int(sum(i > 33.4 for i in intervals)),
    }
