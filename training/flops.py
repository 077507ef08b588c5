"""Model FLOPs per training image, for throughput in TFLOP/s and model FLOP utilisation (MFU).

Counted, not estimated: torch's FlopCounterMode runs the network once on one image and adds up its
convolutions and matrix products (the operations that matter; BatchNorm, ReLU and the loss are left
out, as MFU conventionally does). A training step costs about three forward passes per view (forward,
then backward for activations and weights) and sees two views per image; stage 2 runs the frozen trunk
forward only, so it costs about two forwards per image.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.network import TSimCNENet

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU on known GPUs.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def forward_flops_per_image(model: TSimCNENet, image_size: tuple[int, int]) -> int:
    """FLOPs of one forward pass of one image (counted on a CPU copy of the network)."""
    probe = copy.deepcopy(model).float().cpu().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros(1, 3, *image_size))
    return int(counter.get_total_flops())


def training_flops_per_image(forward_flops: int, stage: int) -> int:
    """FLOPs one training image costs in a stage: 2 views x (3 forwards, or 1 with a frozen trunk)."""
    return 2 * forward_flops * (1 if stage == 2 else 3)


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU named like 'NVIDIA H200', or None when unknown."""
    for name, peak in BF16_PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return peak
    return None
