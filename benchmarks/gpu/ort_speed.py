"""onnxruntime on the GPU against the CPU for one bundle, in one run (the service's model step).

    python -m benchmarks.gpu.ort_speed BUNDLE --data pbc_28.npz [--n 4096] [--out result.json]

For each provider: raw `session.run` images/s at batch 1, 8, 64 and 256 (best of 3 passes over the same
preprocessed float32 images), then `Placer.place` (what the service does per model batch:
preprocessing, the network, neighbours and the flag) at batch 64. The CUDA run goes through
Placer(provider="cuda"), so it also checks that the shipped code finds the CUDA libraries and gets
the CUDA execution provider (it raises when it does not). Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from benchmarks.results import record
from benchmarks.timing import best_of
from tsimcne_core.placing import Placer


def measure(embedder: Placer, images: np.ndarray, batches: tuple[int, ...]) -> dict:
    model_input = embedder.prepare(list(images))
    result: dict = {"provider": embedder.provider, "raw_images_per_s": {}}
    for batch in batches:
        chunks = [model_input[i : i + batch] for i in range(0, len(model_input), batch)]
        embedder.model.run(embedder.outputs, chunks[0])  # warm-up: CUDA kernels are chosen on first use of a shape
        seconds = best_of(3, lambda chunks=chunks: [embedder.model.run(embedder.outputs, c) for c in chunks])
        result["raw_images_per_s"][str(batch)] = round(len(model_input) / seconds, 1)
    rgb = [images[i : i + 64] for i in range(0, len(images), 64)]
    embedder.place_images(list(rgb[0]))
    seconds = best_of(3, lambda: [embedder.place_images(list(c)) for c in rgb])
    result["place_images_per_s_batch64"] = round(len(images) / seconds, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True, help=".npz with an `images` uint8 array (N, H, W, 3)")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with np.load(args.data) as data:
        key = "images" if "images" in data.files else data.files[0]
        images = data[key][: args.n]
    batches = (1, 8, 64, 256)
    report = {
        "bundle": str(args.bundle),
        "images": len(images),
        "image_size": list(images.shape[1:3]),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    import onnxruntime as ort

    report["onnxruntime"] = ort.__version__
    report["cpu"] = measure(Placer(args.bundle, provider="cpu"), images, batches)
    print(json.dumps(report["cpu"]), flush=True)
    report["cuda"] = measure(Placer(args.bundle, provider="cuda"), images, batches)
    print(json.dumps(report["cuda"]), flush=True)
    if args.out:
        record(report, args.out)


if __name__ == "__main__":
    main()
