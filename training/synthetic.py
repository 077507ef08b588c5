"""A synthetic blood-smear-like dataset, made here, so the demo and the tests need no download.

Six classes of "cells" that differ the way real blood-cell classes do: cell size and outline, nucleus
shape (round, kidney, two or three lobes, none), cytoplasm texture (smooth or granular) and stain
colour. Position, size, orientation, stain intensity and noise vary inside each class, so the classes
overlap somewhat and a map has something to learn. Rendered with 2x supersampling for smooth edges.
Numpy only: serving tests may use it too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASS_NAMES = ("lymphoid", "neutroid", "eosinoid", "monoid", "erythroid", "thromboid")

# RGB in [0, 1]: cytoplasm, nucleus, granule colour; cell radius (fraction of the image); granularity.
_CLASS_STYLE = {
    "lymphoid": ((0.72, 0.78, 0.93), (0.33, 0.18, 0.52), (0.60, 0.60, 0.85), 0.26, 0.0),
    "neutroid": ((0.90, 0.80, 0.86), (0.42, 0.20, 0.55), (0.75, 0.55, 0.75), 0.33, 0.35),
    "eosinoid": ((0.95, 0.70, 0.60), (0.38, 0.18, 0.50), (0.90, 0.40, 0.25), 0.34, 0.75),
    "monoid": ((0.74, 0.74, 0.86), (0.48, 0.30, 0.62), (0.70, 0.68, 0.85), 0.40, 0.15),
    "erythroid": ((0.92, 0.55, 0.58), (0.92, 0.55, 0.58), (0.92, 0.55, 0.58), 0.30, 0.0),
    "thromboid": ((0.65, 0.45, 0.75), (0.45, 0.25, 0.60), (0.45, 0.25, 0.60), 0.0, 0.0),
}
_BACKGROUND = np.array([0.94, 0.87, 0.84])


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Blocky noise upsampled and averaged: a cheap granular texture in [0, 1]."""
    coarse = rng.random((cells + 1, cells + 1))
    rows = np.linspace(0, cells, height)
    cols = np.linspace(0, cells, width)
    r0, c0 = np.floor(rows).astype(int).clip(0, cells - 1), np.floor(cols).astype(int).clip(0, cells - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def _nucleus_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Nucleus shape in cell-aligned coordinates (u, v), cell radius r."""
    if kind == "lymphoid":
        return (u / (0.8 * r)) ** 2 + (v / (0.75 * r)) ** 2 <= 1
    if kind == "monoid":
        outer = (u / (0.62 * r)) ** 2 + (v / (0.52 * r)) ** 2 <= 1
        bite = ((u - 0.45 * r) / (0.38 * r)) ** 2 + (v / (0.30 * r)) ** 2 <= 1
        return outer & ~bite
    if kind in ("neutroid", "eosinoid"):
        lobes = 3 if kind == "neutroid" else 2
        lobe_r = (0.27 if lobes == 3 else 0.33) * r
        phase = rng.uniform(0, 2 * np.pi)
        mask = np.zeros(u.shape, dtype=bool)
        for i in range(lobes):
            angle = phase + 2 * np.pi * i / lobes
            cu, cv = 0.38 * r * np.cos(angle), 0.38 * r * np.sin(angle)
            mask |= (u - cu) ** 2 + (v - cv) ** 2 <= lobe_r**2
        return mask
    return np.zeros(u.shape, dtype=bool)


def render_cell(
    kind: str, height: int, width: int, rng: np.random.Generator, radius: float | None = None
) -> np.ndarray:
    """One RGB uint8 image of class `kind` (cell radius as a fraction of the image: the class's, or `radius`)."""
    cyto, nucleus, granule, class_radius, granularity = _CLASS_STYLE[kind]
    radius = class_radius if radius is None else radius
    sh, sw = 2 * height, 2 * width
    yy, xx = np.mgrid[0:sh, 0:sw]
    y = (yy + 0.5) / sh - 0.5 - rng.normal(0, 0.04)
    x = (xx + 0.5) / sw - 0.5 - rng.normal(0, 0.04)
    theta = rng.uniform(0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    stain = np.clip(rng.normal(1.0, 0.05, size=3), 0.8, 1.2)
    image = np.broadcast_to(_BACKGROUND * np.clip(rng.normal(1.0, 0.02, 3), 0.9, 1.1), (sh, sw, 3)).copy()

    if kind == "thromboid":  # a small cluster of dark granular fragments, no big cell
        for _ in range(int(rng.integers(2, 5))):
            cu, cv, fr = rng.normal(0, 0.08), rng.normal(0, 0.08), rng.uniform(0.04, 0.08)
            blob = (u - cu) ** 2 + ((v - cv) / rng.uniform(0.6, 1.0)) ** 2 <= fr**2
            image[blob] = np.array(nucleus) * stain
    else:
        r = radius * rng.uniform(0.88, 1.12)
        aspect = rng.uniform(0.88, 1.12)
        cell = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
        colour = np.array(cyto) * stain
        if kind == "erythroid":  # biconcave disc: paler centre
            centre = np.clip(1 - np.sqrt(u**2 + v**2) / (0.55 * r), 0, 1)[..., None]
            body = colour + (1 - colour) * 0.45 * centre
        else:
            body = np.broadcast_to(colour, (sh, sw, 3))
        if granularity > 0:
            texture = _smooth_noise(rng, sh, sw, max(4, width // 2))
            grains = (texture > 1 - 0.5 * granularity)[..., None]
            body = np.where(grains, np.array(granule) * stain, body)
        image[cell] = body[cell]
        nuc = _nucleus_mask(kind, u, v, r, rng) & cell
        shade = 0.85 + 0.3 * _smooth_noise(rng, sh, sw, max(3, width // 4))[..., None]
        image[nuc] = (np.array(nucleus) * stain * shade)[nuc]

    image = image.reshape(height, 2, width, 2, 3).mean(axis=(1, 3))
    image += rng.normal(0, 0.015, image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def make_synthetic_cells(
    n_images: int = 2400, size: tuple[int, int] = (32, 32), seed: int = 0, n_classes: int = len(CLASS_NAMES)
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 (N, H, W, 3), labels int64 (N,), class names); balanced classes, fixed by `seed`."""
    if not 1 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes must be between 1 and {len(CLASS_NAMES)}, got {n_classes}")
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images, dtype=np.int64) % n_classes
    rng.shuffle(labels)
    height, width = size
    images = np.empty((n_images, height, width, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render_cell(CLASS_NAMES[label], height, width, rng)
    return images, labels, CLASS_NAMES[:n_classes]


RED_CELL_SIZES = {"microcyte": 0.22, "normocyte": 0.29, "macrocyte": 0.36}


def make_red_cell_sizes(
    n_images: int = 1800, size: tuple[int, int] = (28, 28), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Red cells that differ only in size (micro-, normo-, macrocytes: radius 22, 29, 36 % of the image,
    each +-12 %), as in anaemia work where cell size is the diagnosis. Stain, position, shape and noise
    vary as in `make_synthetic_cells`. For measuring whether augmentations teach a network to ignore size."""
    rng = np.random.default_rng(seed)
    names = tuple(RED_CELL_SIZES)
    labels = np.arange(n_images, dtype=np.int64) % len(names)
    rng.shuffle(labels)
    images = np.empty((n_images, *size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i] = render_cell("erythroid", size[0], size[1], rng, radius=RED_CELL_SIZES[names[label]])
    return images, labels, names


def write_synthetic_cells(out: Path, n: int, size: tuple[int, int], seed: int = 0) -> int:
    """Write `n` synthetic cells to `out`: an .npz (images, labels, class_names), or a new folder with one
    sub-folder of PNGs per class; returns the number of classes. UserError for a bad count or a folder
    that already holds files."""
    from PIL import Image

    from tsimcne_core.errors import UserError
    from tsimcne_core.files import atomic_savez

    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be positive, got {n}")
    if out.suffix != ".npz" and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another folder")
    images, labels, names = make_synthetic_cells(n, size, seed=seed)
    if out.suffix == ".npz":
        arrays = {"images": images, "labels": labels, "class_names": np.array(names)}
        atomic_savez(out, arrays, compressed=True)
        return len(names)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    return len(names)
