"""The map page's journal layer, review queue and flagged-share chart (serving/web/map-journal.js) in a real
headless Chromium against a real `bentoml serve` writing a real SQLite journal.

`python -m tests.test_web_journal BUNDLE` takes the docs' screenshots (docs/page-journal.png, docs/page-review.png).
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import sys
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from benchmarks.harness.browser import find_chromium, start_chromium, upload_files, wait_for, wait_until_drawn
from benchmarks.harness.servers import ROOT, Server, start_server
from tsimcne_core.journal import JournalRow, open_journal

pytestmark = pytest.mark.slow
# map-journal.js JOURNAL_COLOURS: in distribution, out of distribution, artefact.
COLOURS = {
    "in_distribution": (0x34, 0x49, 0x5E),
    "out_of_distribution": (0xC2, 0x18, 0x5B),
    "artefact": (0xE0, 0x70, 0x00),
}

if find_chromium() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the page tests: apt-get install chromium chromium-driver")
    pytest.skip(
        "Chromium/chromedriver not installed (apt-get install chromium chromium-driver)", allow_module_level=True
    )


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _days_ago(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")


def _dated(server: Server, row: dict, when: str) -> JournalRow:
    """A copy of placement `row` (its image included) as if placed at `when`."""
    names = [f.name for f in fields(JournalRow) if f.name in row]
    with server.client() as client:
        image = np.asarray(Image.open(io.BytesIO(client.get(f"/placements/{row['id']}/image").content)).convert("RGB"))
    return JournalRow(**{name: row[name] for name in names} | {"time": when, "image": image})


def fill_journal(server: Server, url: str, data: Path, per_class: int = 1, days: int = 3) -> list[dict]:
    """Place training images of every class (sources scope-a, scope-b or none) and three images no cell looks
    like (blank, noise, black: flagged), shuffled, through POST /embed; then write copies of the first
    two thirds into the journal dated back by whole days (as if placed then), as the service writes rows.
    Returns GET /placements' rows."""
    rng = np.random.default_rng(1)
    size = Image.open(next(data.rglob("*.png"))).size
    odd = {
        "blank.png": np.full((*size, 3), 255, np.uint8),
        "noise.png": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
        "black.png": np.zeros((*size, 3), np.uint8),
    }
    uploads = [(name, _png(pixels), "scope-a", None) for name, pixels in odd.items()]
    for k, folder in enumerate(sorted(p for p in data.iterdir() if p.is_dir())):
        for j, path in enumerate(sorted(folder.glob("*.png"))[:per_class]):
            source = None if k % 3 == 2 else ("scope-a" if (k + j) % 2 else "scope-b")  # some sent without one
            uploads.append((path.name, path.read_bytes(), source, f"S{k}-{j}"))
    with server.client() as client:
        for n in rng.permutation(len(uploads)):
            name, content, source, sample = uploads[n]
            params = ({"source": source} if source else {}) | ({"sample_id": sample} if sample else {})
            reply = client.post("/embed", params=params, files=[("images", (name, content))])
            assert reply.status_code == 200, reply.text
        rows = client.get("/placements", params={"limit": 1000}).json()["placements"]
    copies = []
    for k, row in enumerate(rows):
        back = days - 1 - k * days // len(rows)
        if back:
            copies.append(_dated(server, row, _days_ago(back + 0.01)))
    journal = open_journal(url)
    try:
        journal.write(copies)
    finally:
        journal.close()
    with server.client() as client:
        return client.get("/placements", params={"limit": 1000}).json()["placements"]


@pytest.fixture(scope="module")
def journal_server(service_bundle, tmp_path_factory):
    bundle, data = service_bundle
    root = tmp_path_factory.mktemp("journal-page")
    url = f"sqlite:///{root / 'journal.db'}"
    running = start_server(root, {"bundle": str(bundle), "journal": url}, home=root / "bentoml")
    try:
        rows = fill_journal(running, url, data)
        # One more placed 40 days ago: outside the page's default range (7 days).
        journal = open_journal(url)
        journal.write([_dated(running, rows[0], _days_ago(40))])
        journal.close()
    except BaseException:
        running.stop()
        raise
    flags = {row["flag"] for row in rows}
    assert {"out_of_distribution", "artefact"} <= flags and "in_distribution" in flags, flags
    running.database = root / "journal.db"
    yield running
    running.stop_and_check_log()


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def _rows(server: Server, **params: str) -> list[dict]:
    with server.client() as client:
        reply = client.get("/placements", params={"limit": 1000, **params})
        assert reply.status_code == 200, reply.text
        return reply.json()["placements"]


def _journal(driver) -> dict:
    return driver.execute_script("const j = window.tsimcneMap.journal(); delete j.position; return j;")


def _open(driver, server: Server, query: str = "") -> None:
    driver.get(f"{server.url}/?renderer=canvas{query}")
    wait_until_drawn(driver)
    wait_for(
        driver,
        "!window.tsimcneMap.journal().loading && document.getElementById('journal-note').textContent",
        what="the journal layer",
    )


def _choose(driver, select: str, value: str) -> None:
    Select(driver.find_element(By.ID, select)).select_by_value(value)
    wait_for(driver, "!window.tsimcneMap.journal().loading", what="the journal layer again")


def _drawn_ids(driver) -> list[int]:
    return sorted(m["id"] for m in _journal(driver)["markers"])


# The overlay's pixels (r, g, b, a) in the 7 x 7 square around each journal marker's centre, found from the
# row's x, y and the view (a hollow square's edge; markers may overlap: a diamond's white edge can cross
# another's centre). Nothing else is drawn on the overlay there.
MARKER_PIXELS = """window.tsimcneMap.draw();
const rows = arguments[0], view = window.tsimcneMap.view(), top = document.getElementById('map');
const context = top.getContext('2d');
return rows.map(row => {
  const sx = (row.x - view.cx) * view.scale + top.width / 2, sy = top.height / 2 - (row.y - view.cy) * view.scale;
  const d = context.getImageData(Math.round(sx) - 3, Math.round(sy) - 3, 7, 7).data, patch = [];
  for (let i = 0; i < d.length; i += 4) patch.push([d[i], d[i + 1], d[i + 2], d[i + 3]]);
  return patch;
});"""


def test_the_layer_draws_the_journal_where_it_placed_each_image(browser, journal_server) -> None:
    _open(browser, journal_server)
    week = _rows(journal_server, since=_days_ago(7))
    everything = _rows(journal_server)
    assert len(week) == len(everything) - 1  # the 40-day-old one is left out by default
    assert _drawn_ids(browser) == sorted(row["id"] for row in week)
    note = browser.find_element(By.ID, "journal-note").text
    flagged = sum(row["flag"] != "in_distribution" for row in week)
    assert note == f"{len(week)} placed image(s) drawn, {flagged} flagged.", note
    # The pixel at each row's x, y on the overlay is a journal marker's: a flagged one a diamond in a flag's colour.
    for row, patch in zip(week, browser.execute_script(MARKER_PIXELS, week), strict=True):
        assert any(alpha > 0 for *_, alpha in patch), f"no marker at placement {row['id']}"
        if row["flag"] != "in_distribution":
            assert {tuple(p[:3]) for p in patch} & {COLOURS["out_of_distribution"], COLOURS["artefact"]}, row
    assert browser.execute_script("return window.tsimcneMap.journal().position(arguments[0])", week[0]["id"])
    _choose(browser, "journal-range", "")
    assert _drawn_ids(browser) == sorted(row["id"] for row in everything)
    # Unticked: the same overlay holds no journal marker at those places.
    browser.find_element(By.ID, "journal-show").click()
    browser.execute_script("window.tsimcneMap.draw()")
    assert all(pixel[3] == 0 for patch in browser.execute_script(MARKER_PIXELS, everything) for pixel in patch)


# How many of 8 points 13 px around row arguments[0]'s place on the overlay are the highlight ring's blue.
RING_AROUND = """window.tsimcneMap.draw();
const row = arguments[0], view = window.tsimcneMap.view(), top = document.getElementById('map');
const sx = (row.x - view.cx) * view.scale + top.width / 2, sy = top.height / 2 - (row.y - view.cy) * view.scale;
const context = top.getContext('2d'), dpr = window.devicePixelRatio || 1;
let blue = 0;
for (let k = 0; k < 8; k++) {
  const a = k * Math.PI / 4, x = Math.round(sx + 13 * dpr * Math.cos(a)), y = Math.round(sy + 13 * dpr * Math.sin(a));
  const [r, g, b] = context.getImageData(x, y, 1, 1).data;
  blue += Math.abs(r - 59) < 12 && Math.abs(g - 130) < 12 && Math.abs(b - 196) < 12;
}
return blue;"""


def test_source_time_and_flagged_filters_change_what_is_drawn(browser, journal_server) -> None:
    _open(browser, journal_server)
    _choose(browser, "journal-range", "")
    sources = browser.execute_script("return [...document.getElementById('journal-source').options].map(o => o.value)")
    assert sources == ["", "\u0000none", "scope-a", "scope-b"]  # "(no source)" second
    Select(browser.find_element(By.ID, "journal-source")).select_by_visible_text("(no source)")
    wait_for(browser, "!window.tsimcneMap.journal().loading", what="the journal layer again")
    sourceless = _rows(journal_server, source="")
    assert sourceless and all(row["source"] is None for row in sourceless)
    wait_for(browser, f"window.tsimcneMap.journal().markers.length === {len(sourceless)}", what="no source")
    assert _drawn_ids(browser) == sorted(row["id"] for row in sourceless)
    _choose(browser, "journal-source", "scope-b")
    scope_b = _rows(journal_server, source="scope-b")
    assert 0 < len(scope_b) < len(_rows(journal_server))
    assert _drawn_ids(browser) == sorted(row["id"] for row in scope_b)
    _choose(browser, "journal-source", "")
    browser.find_element(By.ID, "journal-flagged").click()
    wait_for(browser, "!window.tsimcneMap.journal().loading")
    flagged = _rows(journal_server, flagged="true")
    wait_for(browser, f"window.tsimcneMap.journal().markers.length === {len(flagged)}", what="flagged only")
    assert _drawn_ids(browser) == sorted(row["id"] for row in flagged)
    assert {m["flag"] for m in _journal(browser)["markers"]} <= {"out_of_distribution", "artefact"}
    browser.find_element(By.ID, "journal-flagged").click()
    _choose(browser, "journal-range", "24")
    today = _rows(journal_server, since=_days_ago(1))
    assert 0 < len(today) < len(_rows(journal_server, since=_days_ago(7)))
    wait_for(browser, f"window.tsimcneMap.journal().markers.length === {len(today)}", what="the last 24 h")
    assert _drawn_ids(browser) == sorted(row["id"] for row in today)


def test_the_layer_pages_along_the_cursor_and_says_when_it_is_capped(browser, journal_server) -> None:
    week = [row["id"] for row in _rows(journal_server, since=_days_ago(7))]  # in the journal's order
    _open(browser, journal_server, "&journal_page=2")  # several pages of 2
    assert _drawn_ids(browser) == sorted(week) and not _journal(browser)["capped"]
    _open(browser, journal_server, "&journal_page=2&journal_cap=3")
    assert _drawn_ids(browser) == sorted(week[:3]) and _journal(browser)["capped"]
    assert "Showing the first 3 placed images only" in browser.find_element(By.ID, "journal-note").text


def test_the_review_queue_stores_verdicts_and_survives_a_reload(browser, journal_server) -> None:
    _open(browser, journal_server)
    browser.execute_script("localStorage.removeItem('tsimcne-reviewer')")
    browser.find_element(By.ID, "tab-review").click()
    waiting = _rows(journal_server, flagged="true", review="unreviewed")
    assert len(waiting) >= 3
    wait_for(browser, f"window.tsimcneMap.journal().queue.length === {len(waiting)}", what="the queue")
    assert _journal(browser)["queue"] == [row["id"] for row in waiting]
    assert browser.find_element(By.ID, "queue-count").text == str(len(waiting))
    # Each with its own image and its neighbours' thumbnails, its flag, score and evidence.
    wait_for(
        browser, "[...document.querySelectorAll('#queue img')].every(img => img.naturalWidth > 0)", what="thumbnails"
    )
    first = browser.find_element(By.CSS_SELECTOR, f".queued[data-id='{waiting[0]['id']}']")
    assert len(first.find_elements(By.CSS_SELECTOR, ".neighbours img")) == len(waiting[0]["neighbours"]) == 5
    assert first.find_element(By.CSS_SELECTOR, ".badge").text == waiting[0]["flag"].replace("_", " ")
    assert (
        f"{waiting[0]['score']:.2f}" in first.text and "pixels" in first.text and waiting[0]["filename"] in first.text
    )
    # Clicking an item rings its marker.
    first.find_element(By.CSS_SELECTOR, ".file-name").click()
    assert _journal(browser)["highlighted"] == waiting[0]["id"]
    assert browser.execute_script(RING_AROUND, waiting[0]) >= 6, "no ring around the clicked image's marker"
    assert "highlighted" in first.get_attribute("class")
    # A verdict with a reviewer (remembered) and a note is stored, and the item leaves the queue.
    reviewer = browser.find_element(By.ID, "reviewer")
    reviewer.send_keys("dr. o'brien")
    first.find_element(By.CSS_SELECTOR, ".verdict-note").send_keys("dust on the slide")
    first.find_element(By.CSS_SELECTOR, ".verdict-artefact").click()
    wait_for(browser, f"!window.tsimcneMap.journal().queue.includes({waiting[0]['id']})", what="the item to leave")
    stored = httpx.get(f"{journal_server.url}/placements/{waiting[0]['id']}", timeout=10).json()
    assert (stored["review"], stored["reviewer"], stored["review_note"]) == (
        "artefact",
        "dr. o'brien",
        "dust on the slide",
    )
    assert browser.execute_script("return localStorage.getItem('tsimcne-reviewer')") == "dr. o'brien"
    # A class label from the select.
    second = browser.find_element(By.CSS_SELECTOR, f".queued[data-id='{waiting[1]['id']}']")
    label = httpx.get(f"{journal_server.url}/info", timeout=10).json()["classes"][0]
    Select(second.find_element(By.CSS_SELECTOR, ".verdict-label")).select_by_value(label)
    wait_for(browser, f"!window.tsimcneMap.journal().queue.includes({waiting[1]['id']})", what="the labelled item")
    assert httpx.get(f"{journal_server.url}/placements/{waiting[1]['id']}", timeout=10).json()["review"] == label
    # A verdict the service refuses (the row is gone from the journal) is shown on the item, which stays.
    third = waiting[2]["id"]
    with contextlib.closing(sqlite3.connect(journal_server.database)) as connection, connection:
        connection.execute("DELETE FROM placements WHERE id = ?", (third,))
    item = browser.find_element(By.CSS_SELECTOR, f".queued[data-id='{third}']")
    item.find_element(By.CSS_SELECTOR, ".verdict-fine").click()
    error = wait_for(
        browser, f"document.querySelector(\".queued[data-id='{third}'] .error-text\")?.textContent", what="error"
    )
    assert "not saved" in error and "no such placement" in error
    assert third in _journal(browser)["queue"]
    # After a reload the queue comes from the journal: the reviewed ones stay out, the reviewer's name is kept.
    _open(browser, journal_server)
    browser.find_element(By.ID, "tab-review").click()
    rest = [row["id"] for row in _rows(journal_server, flagged="true", review="unreviewed")]
    assert waiting[0]["id"] not in rest and waiting[1]["id"] not in rest
    wait_for(browser, "window.tsimcneMap.journal().queueLoaded", what="the queue after a reload")
    assert _journal(browser)["queue"] == rest
    assert browser.find_element(By.ID, "reviewer").get_attribute("value") == "dr. o'brien"


# The fully opaque colours on the chart's canvas as "r,g,b".
CHART_COLOURS = """const c = document.getElementById('drift-chart');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, seen = new Set();
for (let i = 0; i < d.length; i += 4) if (d[i + 3] === 255) seen.add(`${d[i]},${d[i + 1]},${d[i + 2]}`);
return [...seen];"""


def test_the_chart_shows_the_flagged_share_of_each_day_and_the_target(browser, journal_server) -> None:
    _open(browser, journal_server)
    browser.find_element(By.ID, "tab-review").click()
    wait_for(browser, "window.tsimcneMap.journal().chart", what="the chart")
    drift = httpx.get(f"{journal_server.url}/drift", timeout=10).json()["days"]
    days: dict[str, list[int]] = {}
    for entry in drift:
        days.setdefault(entry["day"], [0, 0])
        days[entry["day"]][0] += entry["images"]
        days[entry["day"]][1] += entry["flagged"]
    chart = _journal(browser)["chart"]
    assert len(days) >= 3  # the 40-day-old one and the last three days
    assert [(d["day"], d["images"], d["flagged"]) for d in chart["days"]] == [(k, *v) for k, v in sorted(days.items())]
    assert all(d["share"] == pytest.approx(d["flagged"] / d["images"]) for d in chart["days"])
    assert (
        chart["target"]
        == httpx.get(f"{journal_server.url}/info", timeout=10).json()["calibration"]["target_false_flag_rate"]
    )
    summary = browser.find_element(By.ID, "drift-summary").text
    assert f"({len(days)} day(s), " in summary
    # The canvas holds the bars (flag pink) and the target line (green).
    colours = browser.execute_script(CHART_COLOURS)
    assert "194,24,91" in colours and "46,133,64" in colours


def test_images_placed_on_the_page_join_the_layer(browser, journal_server, service_bundle) -> None:
    _open(browser, journal_server)
    before = len(_journal(browser)["markers"])
    _, data = service_bundle
    upload_files(browser, [next(data.rglob("*.png"))])
    wait_for(browser, "window.tsimcneMap.markers().length === 1 && window.tsimcneMap.markers()[0].flag", what="upload")
    wait_for(browser, f"window.tsimcneMap.journal().markers.length === {before + 1}", what="the layer to grow")


def test_without_a_journal_the_page_works_and_says_the_journal_is_off(browser, service_bundle, tmp_path) -> None:
    bundle, _ = service_bundle
    running = start_server(tmp_path, {"bundle": str(bundle)}, home=tmp_path / "bentoml")
    try:
        browser.get(f"{running.url}/?renderer=canvas")
        stats = wait_until_drawn(browser)
        assert stats["drawnPoints"] > 0
        wait_for(browser, "window.tsimcneMap.journal().off", what="the journal to be off")
        assert "Journal off" in browser.find_element(By.ID, "journal-note").text
        assert browser.find_element(By.ID, "journal-source").get_attribute("disabled")
        browser.find_element(By.ID, "tab-review").click()
        assert "journal=sqlite:///PATH" in browser.find_element(By.ID, "queue-note").text
        assert not browser.find_element(By.ID, "drift").is_displayed()
        assert "Map loaded" in browser.find_element(By.ID, "status").text
    finally:
        running.stop()


def take_screenshots(bundle: Path, data: Path, out: Path = ROOT / "docs") -> None:
    """docs/page-journal.png and docs/page-review.png from a fresh service on `bundle` whose journal holds
    some of `data`'s images placed over the last week."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        url = f"sqlite:///{root / 'journal.db'}"
        running = start_server(root, {"bundle": str(bundle), "journal": url}, home=root / "home")
        driver = start_chromium()
        try:
            fill_journal(running, url, data, per_class=40, days=7)
            driver.set_window_size(1200, 760)
            _open(driver, running)
            driver.save_screenshot(str(out / "page-journal.png"))
            driver.find_element(By.ID, "tab-review").click()
            wait_for(driver, "[...document.querySelectorAll('#queue img')].every(img => img.naturalWidth > 0)")
            driver.find_element(By.CSS_SELECTOR, ".queued .file-name").click()
            driver.find_element(By.ID, "reviewer").send_keys("A. Reviewer")
            driver.save_screenshot(str(out / "page-review.png"))
        finally:
            driver.quit()
            running.stop()


if __name__ == "__main__":
    take_screenshots(Path(sys.argv[1]), Path(sys.argv[2]))
