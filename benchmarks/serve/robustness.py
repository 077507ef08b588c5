"""Robustness of the service (issue 4): schemathesis against its OpenAPI spec, then a corpus of broken files.

    .venv/bin/python -m benchmarks.serve.robustness --bundle models/pbc-cpu

1. Starts `bentoml serve` on loopback with the bundle.
2. schemathesis (`st run .../docs.json -c not_a_server_error`, --examples per operation, fixed seed):
   only server errors count as failures (the default checks would also fail undocumented 4xx codes).
3. Posts every file of a broken-file corpus alone and all of them in one request: truncated JPEG,
   zero bytes, text, a PNG header claiming 30000x30000, animated GIF, CMYK JPEG, 16-bit TIFF, plus a
   truncated PNG, random bytes, a TIFF header claiming 100000x100000, and a file with a .png name
   holding a JPEG.
4. Checks that the server is still ready and still places a good image, and counts 5xx in its log.
Results: printed and written to benchmarks/scratch/serve_robustness.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.harness.servers import start_server, write_broken_files  # noqa: E402
from benchmarks.results import record  # noqa: E402

SCRATCH = ROOT / "benchmarks" / "scratch"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"


def _tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF header + one IFD claiming width x height 8-bit gray pixels (and no data)."""
    entries = [
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, width * height % 2**32),
    ]  # fmt: skip
    ifd = len(entries).to_bytes(2, "little")
    for tag, kind, value in entries:
        ifd += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little")
        ifd += value.to_bytes(4, "little")
    return b"II*\x00" + (8).to_bytes(4, "little") + ifd + (0).to_bytes(4, "little")


def corpus(folder: Path, cell: np.ndarray) -> dict[str, Path]:
    files = write_broken_files(folder, cell)
    tifffile.imwrite(folder / "cell16.tif", cell.astype(np.uint16) * 257)
    files["cell16.tif"] = folder / "cell16.tif"
    Image.fromarray(cell).save(folder / "whole.png")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:60])
    files["truncated.png"] = folder / "truncated.png"
    (folder / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    files["random.bin"] = folder / "random.bin"
    (folder / "huge.tif").write_bytes(_tiff_claiming(100_000, 100_000))
    files["huge.tif"] = folder / "huge.tif"
    jpeg_named_png = folder / "actually-jpeg.png"
    Image.fromarray(cell).save(jpeg_named_png, format="JPEG")
    files["actually-jpeg.png"] = jpeg_named_png
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "models" / "pbc-cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--examples", type=int, default=500, help="schemathesis examples per operation")
    args = parser.parse_args()

    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-robustness-", dir=SCRATCH))
    with np.load(args.data) as data:
        cell = data["images"][0]
    files = corpus(work / "corpus", cell)
    server = start_server(work, {"bundle": str(args.bundle.resolve())}, home=work / "bentoml")
    try:
        st = Path(sys.executable).with_name("st")
        command = [str(st), "run", f"{server.url}/docs.json", "--seed", "1", "--max-examples", str(args.examples),
                   "-c", "not_a_server_error", "--no-color"]  # fmt: skip
        fuzz = subprocess.run(command, cwd=work, capture_output=True, text=True)
        summary = [line for line in fuzz.stdout.splitlines() if "generated" in line or "passed" in line][-2:]
        answers = {}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for name, path in sorted(files.items()):
                reply = client.post("/embed", files=[("images", (name, path.read_bytes()))])
                body = reply.json()
                answers[name] = {
                    "status": reply.status_code,
                    "answer": body["detail"][0]["error"] if "detail" in body else "placed",
                }
            together = client.post("/embed", files=[("images", (n, p.read_bytes())) for n, p in files.items()])
            still_ready = client.get("/readyz").status_code == 200
            good = client.post("/embed", files=[("images", ("good.png", (work / "corpus" / "whole.png").read_bytes()))])
    finally:
        server.stop()
    results = {
        "bundle": str(args.bundle),
        "schemathesis": {"exit_code": fuzz.returncode, "summary": summary, "examples_per_operation": args.examples},
        "corpus": answers,
        "corpus_in_one_request": {"status": together.status_code, "error": together.json().get("error")},
        "still_ready": still_ready,
        "good_image_after": good.status_code,
        "server_5xx_in_log": server.log_text().count("status=5"),
        "tracebacks_in_log": server.log_text().count("Traceback"),
    }
    record(results, SCRATCH / "serve_robustness.json")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
