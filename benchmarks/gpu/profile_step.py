"""Where a training step's time goes, on the device it runs on: the first thing to run on a lent GPU.

    python -m benchmarks.gpu.profile_step PBC_NPZ [--steps 20] [--width 64] [--batch 1024] [--device cuda]
    python -m benchmarks.gpu.profile_step PBC_NPZ --device cpu --width 16 --stem-stride 2 --batch 512 \
        --augmentation microscopy --skip-compile --steps 5     # the `cpu` recipe's step

Times the trainer's own step (augmentation, forward, loss, backward, optimiser) eagerly and with
torch.compile, then profiles the eager step with torch.profiler: the share of each named part, the top
kernels, images/s and model TFLOP/s. Writes profile.json (and a Chrome trace with --trace) beside --out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import record
from training.config import build_config
from training.datasets import load_dataset
from training.device import resolve_runtime
from training.flops import peak_flops, training_flops_per_image
from training.trainer import StagedTrainer

PARTS = ("augment", "forward", "loss", "backward", "optimizer")


def steps_per_second(trainer: StagedTrainer, compiled: bool, steps: int) -> float:
    trainer.runtime = trainer.runtime.__class__(**{**trainer.runtime.__dict__, "compile": compiled})
    model = trainer.wrap_model(trainer.model)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)
    batch = trainer.timing_batch()
    for step in range(3):  # warm-up (and compilation)
        trainer.train_step(model, optimizer, trainable, batch, 1, 0, step)
    synchronise(trainer)
    started = time.perf_counter()
    for step in range(steps):
        trainer.train_step(model, optimizer, trainable, batch, 1, 1, step)
    synchronise(trainer)
    return steps / (time.perf_counter() - started)


def synchronise(trainer: StagedTrainer) -> None:
    if trainer.runtime.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stem-stride", type=int, choices=(1, 2), default=1)
    parser.add_argument("--augmentation", default="default")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("profile.json"))
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace beside --out")
    args = parser.parse_args()

    config = build_config(
        "reference",
        {
            "data": args.data,
            "width": args.width,
            "stem_stride": args.stem_stride,
            "batch_size": args.batch,
            "augmentation": args.augmentation,
        },
    )
    runtime = resolve_runtime(args.device, config.precision, config.channels_last)
    dataset = load_dataset(config.data)
    trainer = StagedTrainer(config, dataset, Path(tempfile.mkdtemp()), runtime, show_progress=False)
    images_per_step = trainer.batch_sizes()[1]
    flops = training_flops_per_image(trainer.forward_flops, 1)
    device_name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
    report: dict = {
        "device": device_name,
        "width": args.width,
        "stem_stride": args.stem_stride,
        "batch": images_per_step,
        "variants": {},
    }
    for compiled in (False, True) if not args.skip_compile else (False,):
        rate = steps_per_second(trainer, compiled, args.steps) * images_per_step
        tflops = rate * flops / 1e12
        peak = peak_flops(device_name)
        report["variants"]["compiled" if compiled else "eager"] = {
            "images_per_s": round(rate, 1),
            "model_tflop_s": round(tflops, 3),
            "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
        }
        print(f"{'compiled' if compiled else 'eager'}: {rate:,.0f} images/s, {tflops:.2f} model TFLOP/s", flush=True)

    trainer.runtime = trainer.runtime.__class__(**{**trainer.runtime.__dict__, "compile": False})
    model = trainer.wrap_model(trainer.model)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for step in range(min(args.steps, 10)):
            trainer.train_step(model, optimizer, trainable, trainer.timing_batch(), 1, 2, step)
        synchronise(trainer)
    events = profiler.key_averages()
    device_key = "device_time_total" if runtime.device.type == "cuda" else "cpu_time_total"
    parts = {e.key: getattr(e, device_key, 0) / 1e3 for e in events if e.key in PARTS}
    cpu_parts = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in PARTS}
    report["parts_ms_device"] = {k: round(v, 2) for k, v in parts.items()}
    report["parts_ms_cpu"] = {k: round(v, 2) for k, v in cpu_parts.items()}
    table = events.table(sort_by="self_" + device_key, row_limit=25)
    print(table)
    report["top_ops"] = table.splitlines()[:30]
    record(report, args.out)
    if args.trace:
        profiler.export_chrome_trace(str(args.out.with_suffix(".trace.json")))
    print(f"profile written to {args.out}")


if __name__ == "__main__":
    main()
