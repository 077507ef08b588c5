"""What `TSimCNE.transform` and `Bundle.place` accept as images, brought to one list (torch-free).

A list of file paths and/or arrays (any sizes), one (N, H, W[, C]) array, a folder (its image files,
searched recursively, sorted), one image file, or a data spec the CLI reads (.npz, .csv, synthetic[:N],
a store folder from `tsimcne prepare`, whose rows stay memory-mapped until their batch comes).
Files are decoded only when their batch comes, so a long list of large files is never all in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tsimcne_core.errors import DataError
from tsimcne_core.images import IMAGE_SUFFIXES, as_rgb, read_image


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: Path | None = None
    array: np.ndarray | None = None

    def decode(self) -> np.ndarray:
        """RGB uint8 (H, W, 3); ImageDecodeError naming the file when it cannot be read."""
        return read_image(self.path) if self.path is not None else as_rgb(self.array, self.id)


def _is_spec(text: str) -> bool:
    return text == "synthetic" or text.startswith("synthetic:") or Path(text).suffix.lower() in (".npz", ".csv")


def collect_images(images: object, ids: Iterable[str] | None = None) -> list[ImageItem]:
    """The images as ImageItems, in order; DataError for anything else (naming what was given)."""
    if isinstance(images, str | Path):
        text = str(images)
        path = Path(text).expanduser()
        if path.is_dir() and (path / "meta.json").is_file():  # a store from `tsimcne prepare`
            from training.datasets import load_dataset

            dataset = load_dataset(path)
            items = [ImageItem(i, array=image) for i, image in zip(dataset.ids, dataset.images, strict=True)]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            items = [ImageItem(str(p), path=p) for p in files]
        elif _is_spec(text):
            from training.datasets import load_dataset

            dataset = load_dataset(text)
            items = [ImageItem(i, array=image) for i, image in zip(dataset.ids, dataset.images, strict=True)]
        elif path.is_file():
            items = [ImageItem(str(path), path=path)]
        else:
            raise DataError(f"{path}: no such file or folder")
    elif isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise DataError(
                f"an array of shape {images.shape}: give a batch (N, H, W) or (N, H, W, C), or a list of images"
            )
        items = [ImageItem(str(i), array=image) for i, image in enumerate(images)]
    elif isinstance(images, Iterable):
        items = list(_items(images))
    else:
        raise DataError(f"images of type {type(images).__name__}: give arrays, file paths, a folder or a data spec")
    if not items:
        raise DataError("no images given")
    if ids is not None:
        names = [str(i) for i in ids]
        if len(names) != len(items):
            raise DataError(f"{len(items)} images but {len(names)} ids")
        items = [ImageItem(name, item.path, item.array) for name, item in zip(names, items, strict=True)]
    return items


def _items(images: Iterable[object]) -> Iterator[ImageItem]:
    for index, image in enumerate(images):
        if isinstance(image, str | Path):
            yield ImageItem(str(image), path=Path(image).expanduser())
        elif isinstance(image, np.ndarray):
            yield ImageItem(str(index), array=image)
        else:
            raise DataError(f"image {index} is a {type(image).__name__}: give file paths or arrays")
