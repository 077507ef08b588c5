"""Inference with a trained torch network: 2-D coordinates and backbone features of uint8 images.

The same arithmetic as serving's preprocessing (uint8 / 255, NCHW, fp32), which the export parity check
relies on (serving/preprocess.py).
"""

from __future__ import annotations

import numpy as np
import torch

from training.network import TSimCNENet


def embed_images(
    model: TSimCNENet, images: np.ndarray, device: torch.device, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates and backbone features of uint8 (N, H, W, 3) images, eval mode, fp32."""
    model.eval()
    coords, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(images[start : start + batch_size]).to(device)
            x = chunk.permute(0, 3, 1, 2).float() / 255.0
            z, h = model(x)
            coords.append(z.float().cpu().numpy())
            features.append(h.float().cpu().numpy())
    return np.concatenate(coords), np.concatenate(features)
