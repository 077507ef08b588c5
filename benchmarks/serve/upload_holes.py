"""The upload holes of issue 12 tried against a real `bentoml serve`: what the service answered, before and after.

    .venv/bin/python -m benchmarks.serve.upload_holes --label after
    git archive 83aacb2 serving | tar -x -C benchmarks/scratch/before      # the code before the fixes
    .venv/bin/python -m benchmarks.serve.upload_holes --label before --source benchmarks/scratch/before

--source is the folder `bentoml serve` runs in: its serving/ package is the one served (it comes first on
sys.path; /info's limits tell which code answered). A tiny bundle is made with the project's CLI,
calibrated on a folder of its own images (so bundle.json records that folder's path). The service runs
with its default limits. Each attack is sent while a probe posts one small image every 0.25 s; recorded:
status, seconds, the answer, the largest resident memory of any service process during the attack
(sampled every 20 ms) over its value before, and the probe's answers. Results: printed and written to
benchmarks/scratch/upload_holes-<label>.json.

The attacks are scaled to fit a 23 GB machine shared with others: the TIFF is 3 planes of 20000x10000
(the issue's was 20000x100000: ~6 GB for the old code) and the many-pixel request 16 images of 40 Mpx
(the issue's was 64); the full-size TIFF header is sent too (233 bytes, corrupt data: the old code
failed on it only after its guard had let it through).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.harness.attack_files import planar_tiff, solid_png, stored_pixels, tiff_claiming, with_orientation  # noqa: E402
from benchmarks.harness.cli import run_cli  # noqa: E402
from benchmarks.harness.servers import BENTOML, free_port, server_env  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "scratch"
TOKEN = "s3cret-token-for-the-lab-0123456789"


def make_bundle(work: Path) -> tuple[Path, Path]:
    data = work / "lab-share" / "cells"
    steps = [
        ("synth", str(data), "--n", "120", "--size", "16"),
        ("train", "--data", str(data), "--name", "cells", "--recipe", "tiny", "--epochs", "2,1,1",
         "--runs-dir", str(work / "runs")),
        ("export", str(work / "runs" / "cells"), "--out", str(work / "bundle"), "--calibration-data", str(data)),
    ]  # fmt: skip
    for step in steps:
        result = run_cli(*step)
        if result.returncode != 0:
            sys.exit(f"error: tsimcne {step[0]} failed:\n{result.stderr[-2000:]}")
    return work / "bundle", data


class Service:
    """`bentoml serve` from `source`, on a free port; ready or exited."""

    def __init__(self, source: Path, bundle: Path, home: Path, log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(BENTOML), "serve", "serving.service:MapService", "--host", "127.0.0.1", "--port", str(self.port),
                   "--arg", f"bundle={bundle}"]  # fmt: skip
        self.log = log
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                command, cwd=source, env=server_env(home, **(env or {})), stdout=handle, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        return False

    def largest_rss(self) -> int:
        try:
            root = psutil.Process(self.process.pid)
            return max(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def attack(service: Service, probe_file: bytes, send) -> dict:
    """Run send(client) while sampling memory and probing with a small image; what happened."""
    baseline = service.largest_rss()
    peak = baseline
    probes: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, service.largest_rss())
            time.sleep(0.02)

    def probe() -> None:
        with httpx.Client(base_url=service.url, timeout=300) as client:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    status = client.post("/embed", files=[("images", ("probe.png", probe_file))]).status_code
                except httpx.HTTPError:
                    status = 0
                probes.append((status, time.perf_counter() - started))
                done.wait(0.25)

    threads = [threading.Thread(target=sample), threading.Thread(target=probe)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=service.url, timeout=600) as client:
            response = send(client)
        seconds = time.perf_counter() - started
    finally:
        done.set()
        for thread in threads:
            thread.join()
    body = _json(response)
    answer = body.get("error") if isinstance(body, dict) and "error" in body else "placed"
    if isinstance(body, dict) and body.get("detail"):
        answer = body["detail"][0]["error"]
    return {
        "status": response.status_code,
        "seconds": round(seconds, 2),
        "answer": answer,
        "peak_rss_above_idle_mb": round((peak - baseline) / 2**20),
        "probes": {
            "sent": len(probes),
            "ok": sum(s == 200 for s, _ in probes),
            "slowest_s": round(max((t for _, t in probes), default=0.0), 2),
        },
        "body": body,
    }


def _json(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return response.text[:300]


def _files(named: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (name, data)) for name, data in named]


def upload_attacks(service: Service, cell: np.ndarray, work: Path) -> dict:
    probe_file = (work / "probe.png").read_bytes()
    tiff = planar_tiff(20_000, 10_000)
    sideways = with_orientation(np.ascontiguousarray(np.rot90(cell, 1)), 6)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored_pixels(sideways), -1))).save(work / "upright.png")
    big = solid_png(8000, 5000)  # 40 Mpx, the default max_pixels
    attacks = {
        "tiff_3_planes_20000x10000": [("planes.tif", tiff)],
        "tiff_header_3_planes_100000x20000": [("bomb.tif", tiff_claiming(100_000, 20_000))],
        "16_images_of_40_mpx": [(f"big{i}.png", big) for i in range(16)],
        "8_images_of_40_mpx": [(f"big{i}.png", big) for i in range(8)],
        "65_files": [(f"{i}.png", probe_file) for i in range(65)],
        "66_files": [(f"{i}.png", probe_file) for i in range(66)],
        "200_files": [(f"{i}.png", probe_file) for i in range(200)],
        "exif_orientation_6": [("sideways.jpg", sideways), ("upright.png", (work / "upright.png").read_bytes())],
    }
    sizes = {"tiff_3_planes_20000x10000": len(tiff), "16_images_of_40_mpx": 16 * len(big)}
    results = {}
    for name, files in attacks.items():
        outcome = attack(service, probe_file, lambda client, files=files: client.post("/embed", files=_files(files)))
        if name == "exif_orientation_6" and outcome["status"] == 200:
            placed = outcome["body"]["images"]
            outcome["answer"] = {p["filename"]: [round(p["x"], 3), round(p["y"], 3)] for p in placed}
        outcome.pop("body")
        outcome["body_bytes"] = sizes.get(name, sum(len(data) for _, data in files))
        results[name] = outcome
        print(name, json.dumps(outcome), flush=True)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        info = client.get("/info").json()
        results["after_all"] = {
            "readyz": client.get("/readyz").status_code,
            "small_image": client.post("/embed", files=[("images", ("probe.png", probe_file))]).status_code,
        }
    results["info"] = {"calibration_source": info["calibration"].get("source"), "limits": info["limits"]}
    return results


def token_attack(source: Path, bundle: Path, work: Path) -> dict:
    env = {"TSIMCNE_API_TOKEN": f"  {TOKEN}\n"}
    service = Service(source, bundle, work / "home-token", work / "token.log", env=env)
    try:
        if not service.wait_ready():
            return {"started": False, "log": service.log.read_text()[-500:]}
        with httpx.Client(base_url=service.url, timeout=60) as client:
            reply = client.get("/info", headers={"Authorization": f"Bearer {TOKEN}"})
        return {"setting": "TSIMCNE_API_TOKEN='  <token>\\n'", "status_with_token": reply.status_code}
    finally:
        service.stop()


def bundle_name_attack(source: Path, bundle: Path, work: Path) -> dict:
    """A bundle whose bundle.json lists '../../../NAME' (checksum right): served? copied into the store, and
    where did the copy write? (Files the old code wrote outside the store are found and removed again.)"""
    copy = work / "names" / "a" / "b" / "bundle"
    shutil.copytree(bundle, copy)
    name = f"planted-{os.getpid()}-{time.time_ns()}.bin"
    planted = work / "names" / name
    planted.write_bytes(b"a file elsewhere on the machine")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"][f"../../../{name}"] = hashlib.sha256(planted.read_bytes()).hexdigest()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    service = Service(source, copy, work / "home-names", work / "names.log")
    try:
        served = service.wait_ready()
    finally:
        service.stop()
    home = work / "home-store"
    register = "import sys; from serving.model_store import register_bundle; print(register_bundle(sys.argv[1]))"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "PYTHONPATH": str(source)}
    store = subprocess.run(
        [sys.executable, "-c", register, str(copy)], cwd=source, env=env, capture_output=True, text=True
    )
    found = subprocess.run(["find", "/", "-xdev", "-maxdepth", "8", "-name", name], capture_output=True, text=True)
    written = [line for line in found.stdout.splitlines() if Path(line) != planted]
    for path in written:
        Path(path).unlink()
    last_line = (service.log.read_text().strip().splitlines() or [""])[-1]
    return {
        "served": served,
        "serve_log_last_line": last_line if not served else "",
        "store_copy_exit_code": store.returncode,
        "store_copy_error": store.stderr.strip().splitlines()[-1] if store.returncode else "",
        "files_written_outside_the_model": written,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="before or after: names the results file")
    parser.add_argument("--source", type=Path, default=ROOT, help="the folder whose serving/ package is served")
    args = parser.parse_args()
    source = args.source.resolve()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"upload-holes-{args.label}-", dir=SCRATCH))
    bundle, data = make_bundle(work)
    cell = np.asarray(Image.open(sorted(data.glob("erythroid/*.png"))[0]).convert("RGB"))
    Image.fromarray(cell).save(work / "probe.png")
    service = Service(source, bundle, work / "home", work / "server.log")
    if not service.wait_ready():
        sys.exit(f"error: the service did not start:\n{(work / 'server.log').read_text()[-2000:]}")
    try:
        uploads = upload_attacks(service, cell, work)
    finally:
        service.stop()
    log = (work / "server.log").read_text(errors="replace")
    results = {
        "label": args.label,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; pinned to "
        f"{len(os.sched_getaffinity(0))} core(s) beside other load",
        "uploads": uploads,
        "token_with_whitespace": token_attack(source, bundle, work),
        "bundle_json_names": bundle_name_attack(source, bundle, work),
        "server_log": {"tracebacks": log.count("Traceback"), "status_5xx": log.count("status=5")},
    }
    out = SCRATCH / f"upload_holes-{args.label}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "uploads"}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
