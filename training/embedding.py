"""Inference with a trained torch network: 2-D coordinates and backbone features of uint8 images.

The same arithmetic as serving's preprocessing (uint8 / 255, NCHW, fp32), which the export parity check
relies on (tsimcne_core/preprocess.py). The images are read a batch at a time (training/chunks.py), so a
memory-mapped store of any size needs one batch of pixels in memory; `embed_images` holds the outputs (N x 2 and N x D
floats) whole; `iter_embeddings` hands them over a batch at a time.

Outputs are copied into arrays allocated once: keeping each batch's small output tensors in a list
interleaves long-lived small blocks with the network's large, freed activations on glibc's heap, which
then cannot shrink: at 10^6 images that grew the process by ~1 KB an image (measured while exporting).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from training.chunks import iter_chunks
from training.network import TSimCNENet
from tsimcne_core.bundle_format import PIXEL_DIVISOR


def iter_embeddings(
    model: TSimCNENet,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
    progress: bool | None = None,
    desc: str = "embedding",
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, coords, features) of images[start:start + batch_size], batch by batch, eval mode, fp32:
    for callers that keep only what they derive from the features (export at 10^6 images)."""
    model.eval()
    with torch.inference_mode():
        for start, block in iter_chunks(images, batch_size, desc=desc, progress=progress):
            chunk = torch.from_numpy(block).to(device)
            x = chunk.permute(0, 3, 1, 2).float() / PIXEL_DIVISOR
            z, h = model(x)
            yield start, z.float().cpu().numpy(), h.float().cpu().numpy()


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
    coords = features = None
    for start, z, h in iter_embeddings(model, images, device, batch_size, progress, desc):
        if coords is None:  # filled in place: a list of per-batch arrays fragments the heap (module docstring)
            coords = np.empty((len(images), z.shape[1]), dtype=np.float32)
            features = np.empty((len(images), h.shape[1]), dtype=np.float32)
        coords[start : start + len(z)] = z
        features[start : start + len(h)] = h
    if coords is None:
        raise ValueError("no images to embed")
    return coords, features
