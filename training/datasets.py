"""Opening any data source by its spec: the dispatcher above the sources (training/data.py) and the store
(training/image_store.py), which itself reads through the sources."""

from __future__ import annotations

from pathlib import Path

from training.data import ImageDataset, assemble, checked, list_csv, list_folder, read_npz, read_synthetic
from training.image_store import is_store, open_store
from tsimcne_core.errors import DataError


def load_dataset(
    spec: str | Path,
    size: tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    skip_bad: bool = False,
    allow_upscale: bool = False,
    progress: bool | None = None,
) -> ImageDataset:
    """Read any supported source; raises DataError with the file and reason on bad input. A store
    (`tsimcne prepare`) is opened memory-mapped; `size`, when given, must be its size."""
    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        dataset = read_synthetic(text, size)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir() and is_store(path):
            dataset = open_store(path, size)
        elif path.is_dir():
            dataset = assemble(list_folder(path), size, resize_method, skip_bad, allow_upscale, progress)
        elif path.suffix.lower() == ".npz":
            dataset = read_npz(path, size, resize_method, allow_upscale)
        elif path.suffix.lower() == ".csv":
            dataset = assemble(list_csv(path, skip_bad), size, resize_method, skip_bad, allow_upscale, progress)
        else:
            raise DataError(
                f"{path}: unsupported data source; give a folder, a .npz, a .csv manifest, a store made by "
                "`tsimcne prepare` or 'synthetic'"
            )
    return checked(dataset)
