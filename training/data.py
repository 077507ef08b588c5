"""Dataset readers: everything becomes RGB uint8 (N, H, W, 3) at one chosen (H, W), held in memory
(or memory-mapped from a prepared store, training/image_store.py).

Sources (`load_dataset(spec, ...)`):
- a folder of class sub-folders (labels = sub-folder names, sorted), or a flat folder (no labels);
- a MedMNIST-style .npz: `images` (+ optional `labels`, `class_names`, `filenames`), or the official
  `train_images`/`val_images`/`test_images` layout (concatenated train, test, val as the papers do);
- a CSV manifest with a header: a `path` column (relative to the CSV's folder) and an optional `label`;
- `synthetic` or `synthetic:N`: the project's own synthetic cells (training/synthetic.py);
- a store folder written by `tsimcne prepare` (training/image_store.py): its images are a read-only np.memmap,
  so a collection larger than memory is read piece by piece (training/chunks.py) and never held whole.

From Python (tsimcne_map.TSimCNE.fit) also: arrays (`dataset_from_arrays`) and lists of files
(`dataset_from_files`); such a dataset is kept in the run folder with `save_dataset` (an .npz this
module reads back), so the run resumes, evaluates and exports like any other.

Files are decoded by tsimcne_core/images.py, the same code the service uses, so training and serving see the
same pixels. Holding the set in memory as uint8 is what lets augmentation run batched on the device
(17,092 images at 28 px are 40 MB; 100,000 at 64 px are 1.2 GB). Files are decoded straight into one
preallocated array (training/file_decoding.py), and a folder or CSV whose decoded images would exceed
`max_in_memory_bytes()` (4 GiB unless TSIMCNE_MAX_IN_MEMORY_BYTES says otherwise) is refused with the
way out: a smaller --image-size, or `tsimcne prepare` to an on-disk store.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.chunks import iter_chunks
from training.file_decoding import check_not_upscaled, decode_into
from training.npz_stream import iter_member_rows, member_shape
from training.synthetic import make_synthetic_cells
from tsimcne_core.errors import DataError
from tsimcne_core.files import atomic_savez
from tsimcne_core.images import IMAGE_SUFFIXES, resize_rgb, to_uint8

MIN_SIDE = 8
DEFAULT_SYNTHETIC_SIZE = (32, 32)
DEFAULT_SYNTHETIC_COUNT = 2400
NPZ_SPLITS = ("train", "test", "val")  # order used by the medical t-SimCNE scripts
MAX_IN_MEMORY_BYTES = 4 << 30  # decoded folder/CSV images held in memory at most (see max_in_memory_bytes)
MAX_IN_MEMORY_ENV = "TSIMCNE_MAX_IN_MEMORY_BYTES"


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray | None  # int64 (N,) or None
    class_names: list[str]
    ids: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # messages for files skipped with --skip-bad
    known_fingerprint: str | None = None  # a store's, computed while it was written
    resize_method: str | None = None  # how a store's images were resized (None: not a store)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def fingerprint(self) -> str:
        """sha256 of pixels and labels: identifies the training data in checkpoints and bundles.

        A store's comes from its meta.json; otherwise it is computed piece by piece (the same digest)."""
        if self.known_fingerprint is not None:
            return self.known_fingerprint
        digest = fingerprint_start(self.images.shape)
        for _, block in iter_chunks(self.images):
            digest.update(np.ascontiguousarray(block).data)
        return fingerprint_finish(digest, self.labels)


def fingerprint_start(shape: tuple[int, ...]) -> hashlib._Hash:
    """The dataset digest before its pixels (fed in row order) and labels (fingerprint_finish)."""
    digest = hashlib.sha256()
    digest.update(str(tuple(shape)).encode())
    return digest


def fingerprint_finish(digest: hashlib._Hash, labels: np.ndarray | None) -> str:
    if labels is not None:
        digest.update(np.ascontiguousarray(labels.astype(np.int64)).data)
    return digest.hexdigest()


def max_in_memory_bytes() -> int:
    """The most decoded bytes a folder or CSV is read into memory with: TSIMCNE_MAX_IN_MEMORY_BYTES
    (bytes, or with a K/M/G/T suffix) or 4 GiB. Why a fixed cap: the trainer copies the images once more
    for the device, and a fixed number gives the same answer on every machine (no surprise on a busy one)."""
    text = os.environ.get(MAX_IN_MEMORY_ENV, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return MAX_IN_MEMORY_BYTES
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1], 1)
    try:
        return int(float(text.rstrip("KMGT")) * scale)
    except ValueError as exc:
        raise DataError(f"{MAX_IN_MEMORY_ENV}={os.environ[MAX_IN_MEMORY_ENV]!r}: give bytes, e.g. 8G") from exc


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.1f} TiB"


class _MemorySink:
    """Decoded rows into one preallocated array, refused above max_in_memory_bytes()."""

    def __init__(self, rows: int, size: tuple[int, int], source: str, native: bool) -> None:
        needed, limit = rows * size[0] * size[1] * 3, max_in_memory_bytes()
        if needed > limit:
            way = (
                "pass --image-size (e.g. --image-size 64) to decode them at the training size, or "
                if native
                else "choose a smaller --image-size, or "
            )
            raise DataError(
                f"{source}: {rows:,} images of {size[0]}x{size[1]} would decode to {format_bytes(needed)} in "
                f"memory, over the limit of {format_bytes(limit)} ({MAX_IN_MEMORY_ENV}); {way}write an on-disk "
                f"store once with `tsimcne prepare {source} --image-size N --out STORE` and use STORE as the data"
            )
        self.array = np.empty((rows, size[0], size[1], 3), dtype=np.uint8)

    def write(self, start: int, block: np.ndarray) -> None:
        self.array[start : start + len(block)] = block


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
    check_not_upscaled(images[0], size, source, allow_upscale)
    resized = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)  # one array, no list of images
    for i, image in enumerate(tqdm(images, desc="resizing", leave=False, disable=None)):
        resized[i] = resize_rgb(image, size, method)
    return resized


@dataclass
class NpzPlan:
    """What an .npz holds, read without its pixels: image arrays (key, count) in order, labels, ids."""

    path: Path
    image_keys: list[tuple[str, int]]
    native_size: tuple[int, int]
    labels: np.ndarray | None
    class_names: list[str]
    ids: list[str]

    @property
    def count(self) -> int:
        return sum(count for _, count in self.image_keys)

    def blocks(
        self, size: tuple[int, int] | None, method: str, allow_upscale: bool, rows: int = 4096
    ) -> Iterator[np.ndarray]:
        """RGB uint8 blocks of the images in order, resized to `size` when given (bounded memory)."""
        for key, _ in self.image_keys:
            for block in iter_member_rows(self.path, key, rows):
                rgb = _as_rgb_array(block, f"{self.path}[{key}]")
                if size is not None and rgb.shape[1:3] != tuple(size):
                    check_not_upscaled(rgb[0], size, str(self.path), allow_upscale)
                    rgb = np.stack([resize_rgb(image, size, method) for image in rgb])
                yield rgb


def npz_plan(path: Path) -> NpzPlan:
    """Read an .npz's layout, labels and ids (the small arrays), checking they agree."""
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
        image_keys, labels, ids = [], [], []
        native: tuple[int, int] | None = None
        has_labels = all(label_key in keys for _, _, label_key in parts)
        for split, image_key, label_key in parts:
            shape = member_shape(path, image_key)
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
                raise DataError(
                    f"{path}[{image_key}]: 'images' must have shape (N, H, W) or (N, H, W, 1|3|4), got {shape}"
                )
            native = native or (int(shape[1]), int(shape[2]))
            image_keys.append((image_key, int(shape[0])))
            if has_labels:
                lab = np.asarray(archive[label_key]).reshape(len(archive[label_key]), -1)[:, 0]
                if len(lab) != shape[0]:
                    raise DataError(
                        f"{path}: '{image_key}' has {shape[0]} images but '{label_key}' has {len(lab)} labels"
                    )
                labels.append(lab.astype(np.int64))
            prefix = f"{split}/" if split else ""
            ids.extend(f"{prefix}{i}" for i in range(shape[0]))
        names = [str(n) for n in archive["class_names"]] if "class_names" in keys else []
        if "filenames" in keys and len(parts) == 1:
            filenames = archive["filenames"]
            if len(filenames) != len(ids):
                raise DataError(f"{path}: 'images' has {len(ids)} entries but 'filenames' has {len(filenames)}")
            ids = [str(f) for f in filenames]
    label_array = np.concatenate(labels) if has_labels else None
    if label_array is not None and not names:
        names = [str(i) for i in range(int(label_array.max()) + 1)] if len(label_array) else []
    assert native is not None
    return NpzPlan(path, image_keys, native, label_array, names, ids)


def read_npz(path: Path, size, method: str, allow_upscale: bool) -> ImageDataset:
    """An .npz into one preallocated array, a block of rows at a time (no stacked copies)."""
    plan = npz_plan(path)
    height, width = size or plan.native_size
    images = np.empty((plan.count, height, width, 3), dtype=np.uint8)
    written = 0
    for block in plan.blocks(size, method, allow_upscale):
        if block.shape[1:3] != (height, width):
            raise DataError(f"{path}: image arrays have different sizes; pass --image-size to resize them all")
        images[written : written + len(block)] = block
        written += len(block)
    return ImageDataset(images, plan.labels, plan.class_names, plan.ids, str(path))


@dataclass
class FileListing:
    """Image files to read, in order, with their label names (None: no labels) and where ids start."""

    paths: list[Path]
    labels: list[str] | None
    root: Path
    source: str
    label_sorter: Callable[[Iterable[str]], list[str]] = sorted


def assemble(
    listing: FileListing,
    size,
    method: str,
    skip_bad: bool,
    allow_upscale: bool,
    progress: bool | None = None,
) -> ImageDataset:
    """Decode a listing straight into one preallocated array (training/file_decoding.py)."""
    paths, source = listing.paths, listing.source
    if not paths:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    sinks: list[_MemorySink] = []

    def open_sink(rows: int, image_size: tuple[int, int]) -> _MemorySink:
        sinks.append(_MemorySink(rows, image_size, source, native=size is None))
        return sinks[0]

    try:
        decoded = decode_into(paths, size, method, skip_bad, allow_upscale, open_sink, progress=progress)
    except DataError as exc:
        if str(exc).startswith("none of the"):
            raise DataError(f"{source}: {exc}") from None
        raise
    images = sinks[0].array
    if len(decoded.kept) < len(images):  # skipped files: give back the unused rows (no copy)
        images.resize((len(decoded.kept), *images.shape[1:]), refcheck=False)
    labels, names = label_indices_for(listing.labels, decoded.kept, listing.label_sorter)
    ids = ids_for(paths, decoded.kept, listing.root)
    return ImageDataset(images, labels, names, ids, source, skipped=decoded.problems)


def label_indices_for(
    raw_labels: list[str] | None, kept: np.ndarray, label_sorter: Callable[[Iterable[str]], list[str]] = sorted
) -> tuple[np.ndarray | None, list[str]]:
    """The kept files' label names -> int64 indices and the sorted class names."""
    if raw_labels is None:
        return None, []
    names_kept = [raw_labels[i] for i in kept.tolist()]
    names = label_sorter(set(names_kept))
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[name] for name in names_kept], dtype=np.int64), names


def ids_for(paths: list[Path], kept: np.ndarray, root: Path) -> list[str]:
    """The kept files' ids: their paths relative to `root` where they are under it."""
    ids = []
    for i in kept.tolist():
        try:
            ids.append(str(paths[i].relative_to(root)))
        except ValueError:
            ids.append(str(paths[i]))
    return ids


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_folder(root: Path) -> FileListing:
    """A folder of class sub-folders (labels: their names, sorted) or a flat folder (no labels)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        paths, labels = [], []
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.rglob("*") if _is_image(p))
            paths.extend(files)
            labels.extend([class_dir.name] * len(files))
        return FileListing(paths, labels, root, str(root))
    return FileListing(sorted(p for p in root.iterdir() if _is_image(p)), None, root, str(root))


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
    return checked(ImageDataset(rgb, label_array, names, ids_list, source))


def dataset_from_files(
    paths: Iterable[str | Path],
    labels: Iterable[object] | None = None,
    size: tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    skip_bad: bool = False,
    allow_upscale: bool = False,
) -> ImageDataset:
    """Image files given one by one (any format tsimcne_core/images.py reads); labels: one per file. Ids are
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
    listing = FileListing(files, raw, root, source, _natural_label_order)
    return checked(assemble(listing, size, resize_method, skip_bad, allow_upscale))


def save_dataset(dataset: ImageDataset, path: Path) -> None:
    """Write `dataset` as an .npz that load_dataset reads back identically (same fingerprint)."""
    arrays = {
        "images": dataset.images,
        "class_names": np.array(dataset.class_names, dtype=str),
        "filenames": np.array(dataset.ids, dtype=str),
    }
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    atomic_savez(path, arrays, compressed=True)


def _natural_label_order(names: Iterable[str]) -> list[str]:
    """Integer labels sort numerically (so '10' follows '9'), others alphabetically."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def list_csv(path: Path, skip_bad: bool) -> FileListing:
    """A CSV manifest: a `path` column (relative to the CSV's folder) and an optional `label` column."""
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
    return FileListing(paths, labels if label_column else None, path.parent, str(path), _natural_label_order)


def read_synthetic(spec: str, size) -> ImageDataset:
    _, _, count = spec.partition(":")
    try:
        n = int(count) if count else DEFAULT_SYNTHETIC_COUNT
    except ValueError as exc:
        raise DataError(f"data {spec!r}: expected 'synthetic' or 'synthetic:N' with N an integer") from exc
    if n < 2:
        raise DataError(f"data {spec!r}: need at least 2 images")
    images, labels, names = make_synthetic_cells(n, size or DEFAULT_SYNTHETIC_SIZE, seed=0)
    return ImageDataset(images, labels, list(names), [str(i) for i in range(n)], spec)


def checked(dataset: ImageDataset) -> ImageDataset:
    """`dataset`, refused when empty or smaller than the network can take."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: the dataset is empty")
    if min(dataset.size) < MIN_SIDE:
        raise DataError(f"{dataset.source}: images are {dataset.size[0]}x{dataset.size[1]}; need sides >= {MIN_SIDE}")
    return dataset
