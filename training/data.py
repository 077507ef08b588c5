"""Dataset readers: everything becomes RGB uint8 (N, H, W, 3) at one chosen (H, W), held in memory.

Sources (`load_dataset(spec, ...)`):
- a folder of class sub-folders (labels = sub-folder names, sorted), or a flat folder (no labels);
- a MedMNIST-style .npz: `images` (+ optional `labels`, `class_names`, `filenames`), or the official
  `train_images`/`val_images`/`test_images` layout (concatenated train, test, val as the papers do);
- a CSV manifest with a header: a `path` column (relative to the CSV's folder) and an optional `label`;
- `synthetic` or `synthetic:N`: the project's own synthetic cells (training/synthetic.py).

From Python (tsimcne_map.TSimCNE.fit) also: arrays (`dataset_from_arrays`) and lists of files
(`dataset_from_files`); such a dataset is kept in the run folder with `save_dataset` (an .npz this
module reads back), so the run resumes, evaluates and exports like any other.

Files are decoded by serving/images.py, the same code the service uses, so training and serving see the
same pixels. Holding the set in memory as uint8 is what lets augmentation run batched on the device
(17,092 images at 28 px are 40 MB; 100,000 at 64 px are 1.2 GB).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from serving.images import IMAGE_SUFFIXES, ImageDecodeError, read_image, resize_rgb, to_uint8
from training.errors import DataError
from training.files import atomic_write
from training.synthetic import make_synthetic_cells

MIN_SIDE = 8
DEFAULT_SYNTHETIC_SIZE = (32, 32)
DEFAULT_SYNTHETIC_COUNT = 2400
NPZ_SPLITS = ("train", "test", "val")  # order used by the medical t-SimCNE scripts


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray | None  # int64 (N,) or None
    class_names: list[str]
    ids: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # messages for files skipped with --skip-bad

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def fingerprint(self) -> str:
        """sha256 of pixels and labels: identifies the training data in checkpoints and bundles."""
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).data)
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels.astype(np.int64)).data)
        return digest.hexdigest()


def parse_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """'28' -> (28, 28); '64x48' -> (height 64, width 48)."""
    if text is None or isinstance(text, tuple):
        return text
    if isinstance(text, int):
        return (text, text)
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError as exc:
        raise DataError(f"image size {text!r}: expected N or HxW, e.g. 28 or 64x48") from exc
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < MIN_SIDE:
        raise DataError(f"image size {text!r}: need N or HxW with both sides >= {MIN_SIDE}")
    return values[0], values[1]


def _check_not_upscaled(image: np.ndarray, size: tuple[int, int], source: str, allow_upscale: bool) -> None:
    if allow_upscale:
        return
    if image.shape[0] < size[0] or image.shape[1] < size[1]:
        raise DataError(
            f"{source}: image is {image.shape[0]}x{image.shape[1]} (HxW), smaller than the training size "
            f"{size[0]}x{size[1]}; choose a smaller --image-size or pass --allow-upscale"
        )


def _as_rgb_array(images: np.ndarray, source: str) -> np.ndarray:
    """npz arrays: (N, H, W) gray, (N, H, W, 1|3|4), uint8 or 16-bit -> uint8 (N, H, W, 3)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(f"{source}: 'images' must have shape (N, H, W) or (N, H, W, 1|3|4), got {images.shape}")
    images = to_uint8(images)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images[..., :3])


def _resize_all(images: np.ndarray, size: tuple[int, int] | None, method: str, source: str, allow_upscale: bool):
    if size is None or images.shape[1:3] == size:
        return images
    _check_not_upscaled(images[0], size, source, allow_upscale)
    return np.stack([resize_rgb(im, size, method) for im in tqdm(images, desc="resizing", leave=False, disable=None)])


def _read_npz(path: Path, size, method: str, allow_upscale: bool) -> ImageDataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile/pickle/value errors: all mean "not a usable npz"
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from exc
    with archive:
        keys = set(archive.files)
        if "images" in keys:
            parts = [("", "images", "labels")]
        elif any(f"{s}_images" in keys for s in NPZ_SPLITS):
            parts = [(s, f"{s}_images", f"{s}_labels") for s in NPZ_SPLITS if f"{s}_images" in keys]
        else:
            raise DataError(
                f"{path}: no 'images' array (nor train_images/val_images/test_images); found {sorted(keys)}"
            )
        images, labels, ids = [], [], []
        has_labels = all(label_key in keys for _, _, label_key in parts)
        for split, image_key, label_key in parts:
            block = archive[image_key]
            images.append(_as_rgb_array(block, f"{path}[{image_key}]"))
            if has_labels:
                lab = np.asarray(archive[label_key]).reshape(len(archive[label_key]), -1)[:, 0]
                if len(lab) != len(block):
                    raise DataError(
                        f"{path}: '{image_key}' has {len(block)} images but '{label_key}' has {len(lab)} labels"
                    )
                labels.append(lab.astype(np.int64))
            prefix = f"{split}/" if split else ""
            ids.extend(f"{prefix}{i}" for i in range(len(block)))
        stacked = np.concatenate(images)
        names = [str(n) for n in archive["class_names"]] if "class_names" in keys else []
        if "filenames" in keys and len(parts) == 1:
            filenames = archive["filenames"]
            if len(filenames) != len(stacked):
                raise DataError(f"{path}: 'images' has {len(stacked)} entries but 'filenames' has {len(filenames)}")
            ids = [str(f) for f in filenames]
    label_array = np.concatenate(labels) if has_labels else None
    if label_array is not None and not names:
        names = [str(i) for i in range(int(label_array.max()) + 1)] if len(label_array) else []
    stacked = _resize_all(stacked, size, method, str(path), allow_upscale)
    return ImageDataset(stacked, label_array, names, ids, str(path))


def _decode_files(
    paths: list[Path], size, method: str, skip_bad: bool, allow_upscale: bool
) -> tuple[list[np.ndarray | None], list[str]]:
    """Decode and resize files in parallel threads (Pillow releases the GIL), keeping order."""

    def load(path: Path) -> np.ndarray | str:
        try:
            image = read_image(path)
            if size is not None:
                _check_not_upscaled(image, size, str(path), allow_upscale)
                image = resize_rgb(image, size, method)
            return image
        except (ImageDecodeError, DataError) as exc:
            return str(exc)

    results: list[np.ndarray | None] = []
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for result in tqdm(pool.map(load, paths), total=len(paths), desc="reading images", disable=None):
            if isinstance(result, str):
                if not skip_bad:
                    raise DataError(f"{result} (pass --skip-bad to skip unreadable images)")
                problems.append(result)
                results.append(None)
            else:
                results.append(result)
    return results, problems


def _assemble(
    paths: list[Path],
    raw_labels: list[str] | None,
    root: Path,
    size,
    method: str,
    skip_bad: bool,
    allow_upscale: bool,
    source: str,
    label_sorter: Callable[[Iterable[str]], list[str]] = sorted,
) -> ImageDataset:
    if not paths:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    decoded, problems = _decode_files(paths, size, method, skip_bad, allow_upscale)
    keep = [i for i, image in enumerate(decoded) if image is not None]
    if not keep:
        raise DataError(f"{source}: none of the {len(paths)} images could be read; first problem: {problems[0]}")
    shapes = {decoded[i].shape for i in keep}
    if len(shapes) > 1:
        raise DataError(
            f"{source}: images have different sizes ({len(shapes)} distinct, e.g. "
            f"{', '.join(f'{s[0]}x{s[1]}' for s in list(shapes)[:3])}); pass --image-size to resize them all"
        )
    images = np.stack([decoded[i] for i in keep])
    labels, names = None, []
    if raw_labels is not None:
        kept = [raw_labels[i] for i in keep]
        names = label_sorter(set(kept))
        index = {name: i for i, name in enumerate(names)}
        labels = np.array([index[name] for name in kept], dtype=np.int64)
    ids = []
    for i in keep:
        try:
            ids.append(str(paths[i].relative_to(root)))
        except ValueError:
            ids.append(str(paths[i]))
    return ImageDataset(images, labels, names, ids, source, skipped=problems)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_folder(root: Path, size, method: str, skip_bad: bool, allow_upscale: bool) -> ImageDataset:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        paths, labels = [], []
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.rglob("*") if _is_image(p))
            paths.extend(files)
            labels.extend([class_dir.name] * len(files))
        return _assemble(paths, labels, root, size, method, skip_bad, allow_upscale, str(root))
    paths = sorted(p for p in root.iterdir() if _is_image(p))
    return _assemble(paths, None, root, size, method, skip_bad, allow_upscale, str(root))


def _label_indices(labels: Iterable[object], n: int, source: str) -> tuple[np.ndarray, list[str]]:
    """Labels given with arrays or files (ints, or names) -> int64 indices and the class names."""
    values = np.asarray(list(labels))
    if values.ndim != 1 or len(values) != n:
        raise DataError(f"{source}: {n} images but {values.size} labels; give one label per image")
    if np.issubdtype(values.dtype, np.integer) and (n == 0 or values.min() >= 0):
        return values.astype(np.int64), [str(i) for i in range(int(values.max()) + 1 if n else 0)]
    names = _natural_label_order({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[str(v)] for v in values], dtype=np.int64), names


def dataset_from_arrays(
    images: np.ndarray,
    labels: Iterable[object] | None = None,
    ids: Iterable[str] | None = None,
    size: tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    allow_upscale: bool = False,
) -> ImageDataset:
    """Images in memory: (N, H, W) grayscale or (N, H, W, 1|3|4), uint8 (16-bit and float in [0, 1] are
    scaled as the .npz reader does); labels: ints or class names; ids: one name per image (default: the
    index). Resized to `size` when given."""
    source = f"an array of {len(images)} images"
    images = np.asarray(images)
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise DataError(f"{source}: pixel type {images.dtype} is not numeric; give uint8 images (N, H, W, 3)")
    rgb = _as_rgb_array(images, source)
    if len(rgb) == 0:
        raise DataError(f"{source}: the dataset is empty")
    ids_list = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(rgb))]
    if len(ids_list) != len(rgb):
        raise DataError(f"{source}: {len(rgb)} images but {len(ids_list)} ids")
    label_array, names = _label_indices(labels, len(rgb), source) if labels is not None else (None, [])
    rgb = _resize_all(rgb, size, resize_method, source, allow_upscale)
    return _checked(ImageDataset(rgb, label_array, names, ids_list, source))


def dataset_from_files(
    paths: Iterable[str | Path],
    labels: Iterable[object] | None = None,
    size: tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    skip_bad: bool = False,
    allow_upscale: bool = False,
) -> ImageDataset:
    """Image files given one by one (any format serving/images.py reads); labels: one per file. Ids are
    the paths relative to the files' common folder."""
    files = [Path(p).expanduser() for p in paths]
    source = f"a list of {len(files)} files"
    missing = [str(p) for p in files if not p.is_file()]
    if missing and not skip_bad:
        raise DataError(f"{source}: {len(missing)} file(s) do not exist, first: {missing[0]}")
    raw = None
    if labels is not None:
        raw = [str(v) for v in labels]
        if len(raw) != len(files):
            raise DataError(f"{source}: {len(files)} files but {len(raw)} labels; give one label per file")
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files])) if files else Path()
    files = [p.resolve() for p in files]
    return _checked(
        _assemble(files, raw, root, size, resize_method, skip_bad, allow_upscale, source, _natural_label_order)
    )


def save_dataset(dataset: ImageDataset, path: Path) -> None:
    """Write `dataset` as an .npz that load_dataset reads back identically (same fingerprint)."""
    arrays = {
        "images": dataset.images,
        "class_names": np.array(dataset.class_names, dtype=str),
        "filenames": np.array(dataset.ids, dtype=str),
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def _natural_label_order(names: Iterable[str]) -> list[str]:
    """Integer labels sort numerically (so '10' follows '9'), others alphabetically."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _read_csv(path: Path, size, method: str, skip_bad: bool, allow_upscale: bool) -> ImageDataset:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV manifest ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    columns = {c.strip().lower(): c for c in rows[0] if c}
    path_column = next((columns[c] for c in ("path", "file", "filename", "image", "img") if c in columns), None)
    if path_column is None:
        raise DataError(f"{path}: needs a 'path' column (found columns: {', '.join(columns.values())})")
    label_column = next((columns[c] for c in ("label", "labels", "class") if c in columns), None)
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        entry = (row.get(path_column) or "").strip()
        if not entry:
            raise DataError(f"{path}, line {line}: empty '{path_column}'")
        file = Path(entry)
        paths.append(file if file.is_absolute() else path.parent / file)
        if label_column is not None:
            label = (row.get(label_column) or "").strip()
            if not label:
                raise DataError(f"{path}, line {line}: empty '{label_column}'")
            labels.append(label)
    missing = [str(p) for p in paths if not p.exists()]
    if missing and not skip_bad:
        raise DataError(f"{path}: {len(missing)} listed file(s) do not exist, first: {missing[0]}")
    return _assemble(
        paths,
        labels if label_column else None,
        path.parent,
        size,
        method,
        skip_bad,
        allow_upscale,
        str(path),
        label_sorter=_natural_label_order,
    )


def _read_synthetic(spec: str, size) -> ImageDataset:
    _, _, count = spec.partition(":")
    try:
        n = int(count) if count else DEFAULT_SYNTHETIC_COUNT
    except ValueError as exc:
        raise DataError(f"data {spec!r}: expected 'synthetic' or 'synthetic:N' with N an integer") from exc
    if n < 2:
        raise DataError(f"data {spec!r}: need at least 2 images")
    images, labels, names = make_synthetic_cells(n, size or DEFAULT_SYNTHETIC_SIZE, seed=0)
    return ImageDataset(images, labels, list(names), [str(i) for i in range(n)], spec)


def load_dataset(
    spec: str | Path,
    size: tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    skip_bad: bool = False,
    allow_upscale: bool = False,
) -> ImageDataset:
    """Read any supported source; raises DataError with the file and reason on bad input."""
    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        dataset = _read_synthetic(text, size)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            dataset = _read_folder(path, size, resize_method, skip_bad, allow_upscale)
        elif path.suffix.lower() == ".npz":
            dataset = _read_npz(path, size, resize_method, allow_upscale)
        elif path.suffix.lower() == ".csv":
            dataset = _read_csv(path, size, resize_method, skip_bad, allow_upscale)
        else:
            raise DataError(f"{path}: unsupported data source; give a folder, a .npz, a .csv manifest or 'synthetic'")
    return _checked(dataset)


def _checked(dataset: ImageDataset) -> ImageDataset:
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: the dataset is empty")
    if min(dataset.size) < MIN_SIDE:
        raise DataError(f"{dataset.source}: images are {dataset.size[0]}x{dataset.size[1]}; need sides >= {MIN_SIDE}")
    return dataset
