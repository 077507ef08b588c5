"""Inference preprocessing, defined once: decoded RGB uint8 -> the float32 batch the model takes.

Training feeds the network `uint8 / 255` in NCHW (training/embedding.py `embed_images`); this is the
same arithmetic in numpy, so serving with onnxruntime reproduces the torch embedding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.bundle import Preprocessing
from serving.images import center_crop, read_image, resize_rgb


def to_model_input(images: np.ndarray | list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """RGB uint8 images (any size) -> float32 (N, 3, H, W) in [0, 1] at the bundle's size."""
    size = (prep.height, prep.width)
    crop = prep.center_crop
    batch = np.stack(
        [
            resize_rgb(center_crop(np.asarray(image), crop) if crop else np.asarray(image), size, prep.resize_method)
            for image in images
        ]
    )
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(prep.divide_by)


def load_model_input(paths: list[str | Path], prep: Preprocessing) -> np.ndarray:
    """Read image files and preprocess them as one batch."""
    return to_model_input([read_image(p) for p in paths], prep)
