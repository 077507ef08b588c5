"""What scripts/container-check asks the service running in the container; prints the answers as JSON.

    python scripts/container_probe.py --url http://127.0.0.1:PORT --images ../shared/data/bloodcells/jpg_sample

Posts one real JPEG of each class folder in one request (200, each placed), checks that /metrics counts
them, that the page at / is the map page, and that a truncated JPEG gets a 4xx naming it. Exit code 1
when any check fails (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import httpx


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, flags=re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def probe(url: str, images: Path) -> dict:
    jpegs = [sorted(folder.glob("*.jpg"))[0] for folder in sorted(p for p in images.iterdir() if p.is_dir())]
    results: dict = {}
    checks: dict[str, bool] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        before = _metric(client.get("/metrics").text, "tsimcne_images_embedded_total")
        reply = client.post("/embed", files=[("images", (p.name, p.read_bytes())) for p in jpegs])
        placed = reply.json().get("images", []) if reply.status_code == 200 else []
        results["embed"] = {
            "status": reply.status_code,
            "images_sent": [f"{p.parent.name}/{p.name}" for p in jpegs],
            "placed": [
                {"file": i["filename"], "x": round(i["x"], 3), "y": round(i["y"], 3), "flag": i["flag"]} for i in placed
            ],
        }
        checks["embed: 200, every image placed"] = reply.status_code == 200 and len(placed) == len(jpegs)
        metrics = client.get("/metrics")
        counted = _metric(metrics.text, "tsimcne_images_embedded_total") - before
        results["metrics"] = {
            "status": metrics.status_code,
            "tsimcne_images_embedded_total_increase": counted,
            "bentoml_request_metrics": "bentoml_service_request_total" in metrics.text,
        }
        checks["metrics: counts the placed images"] = metrics.status_code == 200 and counted == len(jpegs)
        page = client.get("/")
        results["page"] = {"status": page.status_code, "title": _title(page.text)}
        checks["page: the map page at /"] = page.status_code == 200 and "tsimcne map" in page.text
        broken = jpegs[0].read_bytes()[:2000]
        bad = client.post("/embed", files=[("images", ("truncated.jpg", broken))])
        results["broken_file"] = {"status": bad.status_code, "answer": bad.json()}
        checks["broken file: 4xx naming it"] = 400 <= bad.status_code < 500 and "truncated.jpg" in bad.text
        info = client.get("/info").json()
        results["info"] = {k: info[k] for k in ("bundle", "provider", "limits")}
        checks["still ready"] = client.get("/readyz").status_code == 200
    results["checks"] = checks
    return results


def _title(html: str) -> str:
    found = re.search(r"<title>(.*?)</title>", html, flags=re.IGNORECASE | re.DOTALL)
    return found.group(1).strip() if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder with one sub-folder of JPEGs per class")
    args = parser.parse_args()
    results = probe(args.url, args.images)
    print(json.dumps(results, indent=2))
    sys.exit(0 if all(results["checks"].values()) else 1)


if __name__ == "__main__":
    main()
