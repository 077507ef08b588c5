"""A prepared image store: a collection decoded once, at the training size, into a folder on disk.

    STORE/meta.json     format, version, shape, source, resize method, class names, fingerprint
    STORE/images.npy    uint8 (N, H, W, 3), opened memory-mapped and read-only
    STORE/labels.npy    int64 (N,), when the source has labels
    STORE/ids.txt       one id per line, each a JSON string (file names may hold any character)
    STORE/skipped.json  the files left out with --skip-bad, with the reason

`tsimcne prepare` writes it (folder, CSV, .npz or synthetic source, the specs load_dataset reads) with
parallel decoding through tsimcne_core/images.py, in pieces: memory stays bounded by a few pieces whatever
N is. The pixels go to the file with positioned writes, not through a mapping (mapped pages would
count as the process's memory). Everything is written in a hidden staging folder beside STORE and
renamed into place last, meta.json being the last file written: a crash leaves no folder that looks
like a finished store. `load_dataset(STORE)` returns an ImageDataset over the memory-mapped array with
the fingerprint from meta.json (the same digest ImageDataset.fingerprint computes for the same images
and labels in memory, so a run's data can move between a folder and its store).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from training.chunks import iter_chunks
from training.data import (
    DEFAULT_SYNTHETIC_SIZE,
    ImageDataset,
    checked,
    fingerprint_finish,
    fingerprint_start,
    format_bytes,
    ids_for,
    label_indices_for,
    list_csv,
    list_folder,
    npz_plan,
    parse_size,
    read_synthetic,
)
from training.file_decoding import decode_into, progress_disable
from tsimcne_core.errors import DataError

STORE_FORMAT = "tsimcne-image-store"
STORE_VERSION = 1
META_FILE = "meta.json"
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
IDS_FILE = "ids.txt"
SKIPPED_FILE = "skipped.json"


@dataclass
class PreparedStore:
    path: Path
    n_images: int
    image_size: tuple[int, int]
    skipped: list[str]
    seconds: float
    fingerprint: str
    bytes: int


def is_store(path: Path) -> bool:
    """A folder with a meta.json: a store (open_store then checks it properly)."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def open_store(path: Path, size: tuple[int, int] | None = None) -> ImageDataset:
    """The store as an ImageDataset whose images are a read-only np.memmap; DataError when the folder is
    not a complete store of this version, or its size is not `size`."""
    path = Path(path)
    meta = _read_meta(path)
    shape = tuple(meta["shape"])
    try:
        images = np.load(path / IMAGES_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path / IMAGES_FILE}: not a readable image array ({exc}); prepare the store again") from exc
    if images.shape != shape or images.dtype != np.uint8:
        raise DataError(
            f"{path / IMAGES_FILE}: holds {images.dtype} {images.shape}, but {META_FILE} says uint8 {shape}; "
            "prepare the store again"
        )
    if size is not None and tuple(size) != shape[1:3]:
        raise DataError(
            f"{path}: the store holds images of {shape[1]}x{shape[2]}, not the {size[0]}x{size[1]} asked for; "
            f"prepare another store with `tsimcne prepare SOURCE --image-size {size[0]}x{size[1]} --out NEW_STORE`"
        )
    labels = None
    if meta["has_labels"]:
        labels = np.load(path / LABELS_FILE, allow_pickle=False)
        if labels.shape != (shape[0],):
            raise DataError(f"{path / LABELS_FILE}: {labels.shape[0]} labels for {shape[0]} images")
    ids = [json.loads(line) for line in (path / IDS_FILE).read_text(encoding="utf-8").splitlines()]
    if len(ids) != shape[0]:
        raise DataError(f"{path / IDS_FILE}: {len(ids)} ids for {shape[0]} images")
    skipped = json.loads((path / SKIPPED_FILE).read_text(encoding="utf-8")) if (path / SKIPPED_FILE).is_file() else []
    return ImageDataset(
        images,
        labels,
        list(meta["class_names"]),
        ids,
        str(path),
        skipped=skipped,
        known_fingerprint=meta["fingerprint"],
        resize_method=meta["resize_method"],
    )


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path / META_FILE}: not a readable store description ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        raise DataError(f"{path}: has a {META_FILE} but is not a store made by `tsimcne prepare`")
    if meta.get("version") != STORE_VERSION:
        raise DataError(
            f"{path}: store version {meta.get('version')}, this program reads version {STORE_VERSION}; "
            "prepare the store again"
        )
    return meta


class _ImageFile:
    """images.npy written with positioned writes; hashes the rows as they arrive (in order)."""

    def __init__(self, path: Path, rows: int, size: tuple[int, int]) -> None:
        self.path, self.size, self.rows = path, size, rows
        self.row_bytes = size[0] * size[1] * 3
        free = shutil.disk_usage(path.parent).free
        if rows * self.row_bytes > free:
            raise DataError(
                f"{path.parent}: the store needs {format_bytes(rows * self.row_bytes)} "
                f"({rows:,} images of {size[0]}x{size[1]}) but only {format_bytes(free)} are free there"
            )
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.offset = self._write_header(rows)
        os.ftruncate(self.fd, self.offset + rows * self.row_bytes)  # sparse until written
        self.digest = fingerprint_start((rows, *size, 3))
        self.written = 0

    def _write_header(self, rows: int) -> int:
        """numpy's own .npy header (it leaves room to rewrite the row count in place); its length."""
        import io

        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                     "shape": (rows, *self.size, 3)}
        )  # fmt: skip
        data = header.getvalue()
        if hasattr(self, "offset") and len(data) != self.offset:
            raise DataError(f"{self.path}: cannot rewrite the array header in place")  # not with numpy's format
        os.pwrite(self.fd, data, 0)
        return len(data)

    def write(self, start: int, block: np.ndarray) -> None:
        assert start == self.written, "pieces arrive in order"
        data = np.ascontiguousarray(block, dtype=np.uint8)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + start * self.row_bytes + done)
        self.digest.update(view)
        self.written += len(block)

    def finish(self, labels: np.ndarray | None) -> str:
        """Fix the row count when files were skipped, flush to disk; the fingerprint (hashed while
        writing; read back only when skipped files changed the shape the digest began with)."""
        shape_changed = self.written != self.rows
        if shape_changed:
            self._write_header(self.written)
            os.ftruncate(self.fd, self.offset + self.written * self.row_bytes)
            self.rows = self.written
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if shape_changed:
            return _fingerprint_of_file(self.path, labels)
        return fingerprint_finish(self.digest, labels)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fingerprint_of_file(path: Path, labels: np.ndarray | None) -> str:
    """The fingerprint read back piece by piece (after skipped files changed the row count)."""
    images = np.load(path, mmap_mode="r")
    digest = fingerprint_start(images.shape)
    for _, block in iter_chunks(images, desc="fingerprint"):
        digest.update(np.ascontiguousarray(block).data)
    return fingerprint_finish(digest, labels)


def prepare_store(
    source: str | Path,
    out: str | Path,
    image_size: str | int | tuple[int, int] | None = None,
    resize_method: str = "bicubic",
    skip_bad: bool = False,
    allow_upscale: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
) -> PreparedStore:
    """Decode `source` (folder, CSV, .npz or synthetic[:N]) at `image_size` (default: the images' own,
    which must then be one size) into a new store folder `out`; see the module docstring."""
    started = time.perf_counter()
    out = Path(out).expanduser()
    size = parse_size(image_size)
    if out.exists():
        raise DataError(f"{out} already exists; choose another --out or remove it first")
    text = str(source)
    if not text.startswith("synthetic") and is_store(Path(text).expanduser()):
        raise DataError(f"{source}: is already a store; use it as the data directly")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise DataError(f"{out.parent}: cannot write there ({exc.strerror or exc})") from exc
    image_file: list[_ImageFile] = []

    def open_file(rows: int, found_size: tuple[int, int]) -> _ImageFile:
        image_file.append(_ImageFile(staging / IMAGES_FILE, rows, found_size))
        return image_file[0]

    try:
        labels, class_names, ids, skipped, source_text = _write_images(
            text, size, resize_method, skip_bad, allow_upscale, workers, progress, open_file
        )
        written = image_file[0]
        fingerprint = written.finish(labels)
        found_size = written.size
        if labels is not None:
            np.save(staging / LABELS_FILE, labels.astype(np.int64))
        (staging / IDS_FILE).write_text("".join(json.dumps(i) + "\n" for i in ids), encoding="utf-8")
        (staging / SKIPPED_FILE).write_text(json.dumps(skipped, indent=1) + "\n", encoding="utf-8")
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "shape": [written.rows, found_size[0], found_size[1], 3],
            "dtype": "uint8",
            "source": source_text,
            "resize_method": resize_method,
            "has_labels": labels is not None,
            "class_names": class_names,
            "n_skipped": len(skipped),
            "fingerprint": fingerprint,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_synced(staging / META_FILE, json.dumps(meta, indent=2) + "\n")
        staging.chmod(0o755)
        staging.rename(out)
    except BaseException:
        for handle in image_file:
            handle.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    nbytes = written.rows * found_size[0] * found_size[1] * 3
    return PreparedStore(out, written.rows, found_size, skipped, time.perf_counter() - started, fingerprint, nbytes)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_images(text, size, method, skip_bad, allow_upscale, workers, progress, open_file):
    """Decode the source into the store's image file; (labels, class names, ids, skipped, source)."""
    if text == "synthetic" or text.startswith("synthetic:"):
        dataset = checked(read_synthetic(text, size or DEFAULT_SYNTHETIC_SIZE))
        _copy_blocks(iter_chunks(dataset.images), len(dataset), dataset.size, open_file, progress)
        return dataset.labels, dataset.class_names, dataset.ids, [], text
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npz" and path.is_file():
        plan = npz_plan(path)
        blocks = ((0, block) for block in plan.blocks(size, method, allow_upscale))
        _copy_blocks(blocks, plan.count, size or plan.native_size, open_file, progress)
        return plan.labels, plan.class_names, plan.ids, [], str(path)
    if path.is_dir():
        listing = list_folder(path)
    elif path.suffix.lower() == ".csv":
        listing = list_csv(path, skip_bad)
    else:
        raise DataError(f"{path}: unsupported data source; give a folder, a .npz, a .csv manifest or 'synthetic'")
    if not listing.paths:
        raise DataError(f"{path}: no images found")
    try:
        decoded = decode_into(
            listing.paths, size, method, skip_bad, allow_upscale, open_file, workers, progress, desc="preparing"
        )
    except DataError as exc:
        if str(exc).startswith("none of the"):
            raise DataError(f"{path}: {exc}") from None
        raise
    labels, names = label_indices_for(listing.labels, decoded.kept, listing.label_sorter)
    return labels, names, ids_for(listing.paths, decoded.kept, listing.root), decoded.problems, str(path)


def _copy_blocks(blocks, count: int, size: tuple[int, int], open_file, progress: bool | None) -> None:
    """Arrays already decoded (an .npz, synthetic cells) into the image file, block by block."""
    target = open_file(count, tuple(size))
    with tqdm(total=count, desc="preparing", unit="img", disable=progress_disable(progress)) as bar:
        for _, block in blocks:
            if block.shape[1:3] != tuple(size):
                raise DataError("image arrays have different sizes; pass --image-size to resize them all")
            target.write(target.written, block)
            bar.update(len(block))
