"""Inference with a trained torch network: 2-D coordinates and backbone features of uint8 images.

The same arithmetic as serving's preprocessing (uint8 / 255, NCHW, fp32), which the export parity check
relies on (serving/preprocess.py). The images are read a batch at a time (training/chunks.py), so a
memory-mapped store of any size needs one batch of pixels in memory; the outputs (N x 2 and N x D
floats) are held whole.
"""

from __future__ import annotations

import numpy as np
import torch

from training.chunks import iter_chunks
from training.network import TSimCNENet


def embed_images(
    model: TSimCNENet,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
    progress: bool | None = None,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates and backbone features of uint8 (N, H, W, 3) images, eval mode, fp32; a progress
    bar on a terminal (progress None) or when asked (True)."""
    model.eval()
    coords, features = [], []
    with torch.inference_mode():
        for _, block in iter_chunks(images, batch_size, desc=desc, progress=progress):
            chunk = torch.from_numpy(block).to(device)
            x = chunk.permute(0, 3, 1, 2).float() / 255.0
            z, h = model(x)
            coords.append(z.float().cpu().numpy())
            features.append(h.float().cpu().numpy())
    return np.concatenate(coords), np.concatenate(features)
