"""Inference speed: onnxruntime (what `tsimcne embed` and the service run) against eager torch, one run.

    .venv/bin/python -m benchmarks.embed_speed BUNDLE RUN_DIR [--n 2048] [--batch 64]

Both get the same preprocessed float32 batches of the run's training images (PBC 28 px for the
numbers in benchmarks/README.md) and run the same fp32 network on the CPU with the same thread count;
images/s = images / seconds, best of 3 passes. Decoding and resizing are not included (identical code).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.results import SCRATCH as RESULT_SCRATCH
from benchmarks.results import record
from benchmarks.timing import best_of
from training.checkpoint import load_checkpoint
from training.runs import dataset_for_state, final_checkpoint_path, model_from_state
from tsimcne_core.bundle_format import open_bundle
from tsimcne_core.preprocess import to_model_input


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    manifest = open_bundle(args.bundle)
    state = load_checkpoint(final_checkpoint_path(args.run_dir))
    images = dataset_for_state(state).images[: args.n]
    batches = [
        to_model_input(images[i : i + args.batch], manifest.preprocessing) for i in range(0, len(images), args.batch)
    ]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(args.bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    onnx_s = best_of(3, lambda: [session.run(["coords"], {"images": b}) for b in batches])

    model = model_from_state(state)
    tensors = [torch.from_numpy(b) for b in batches]

    def torch_pass() -> None:
        with torch.inference_mode():
            for t in tensors:
                model(t)

    torch_s = best_of(3, torch_pass)
    result = {
        "images": len(images),
        "batch": args.batch,
        "threads": threads,
        "onnxruntime_images_per_s": len(images) / onnx_s,
        "torch_eager_images_per_s": len(images) / torch_s,
        "ratio": torch_s / onnx_s,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        "written to",
        record(result, RESULT_SCRATCH / "embed_speed.json"),
    )
    onnx_first = session.run(["coords"], {"images": batches[0]})[0]
    with torch.inference_mode():
        torch_first = model(tensors[0])[0].numpy()
    print(f"max |onnxruntime - torch| on the first batch: {np.abs(onnx_first - torch_first).max():.2e}")


if __name__ == "__main__":
    main()
