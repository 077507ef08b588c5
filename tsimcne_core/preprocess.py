"""Inference preprocessing, defined once: decoded RGB uint8 -> the float32 batch the model takes.

Training feeds the network `uint8 / 255` in NCHW (training/embedding.py `embed_images`); this is the
same arithmetic in numpy, so serving with onnxruntime reproduces the torch embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tsimcne_core.bundle_format import Preprocessing
from tsimcne_core.images import center_crop, read_image, resize_rgb


def fit_image(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """One RGB uint8 image (any size) -> RGB uint8 at the bundle's size (centre crop, then resize).

    The service calls this as soon as an upload is decoded, so a request holds full-size pixels of one
    image at a time; not idempotent when the crop is smaller than the model's size, so call it once."""
    crop = prep.center_crop
    image = np.asarray(image)
    return resize_rgb(center_crop(image, crop) if crop else image, (prep.height, prep.width), prep.resize_method)


def stack_fitted(images: Sequence[np.ndarray] | np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Images already through fit_image (a list, or one uint8 (N, H, W, 3) array) -> float32 (N, 3, H, W) in [0, 1]."""
    batch = np.asarray(images) if isinstance(images, np.ndarray) else np.stack(images)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(prep.divide_by)


def to_model_input(images: np.ndarray | list[np.ndarray], prep: Preprocessing) -> np.ndarray:
    """RGB uint8 images (any size) -> float32 (N, 3, H, W) in [0, 1] at the bundle's size."""
    return stack_fitted([fit_image(image, prep) for image in images], prep)


def load_model_input(paths: list[str | Path], prep: Preprocessing) -> np.ndarray:
    """Read image files and preprocess them as one batch."""
    return to_model_input([read_image(p) for p in paths], prep)
