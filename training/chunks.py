"""Reading image arrays in bounded pieces, whether they are in memory or memory-mapped from a store.

A memory-mapped array (training/image_store.py) is read with plain positioned reads (os.pread) instead of
touching the mapping: pages touched through a mapping stay in the process's resident set until the
kernel needs them back, so one pass over a 10 GB store would *look* like 10 GB of process memory (and
would count against a container's limit). Reads land in the page cache instead, which is not the
process's memory. Arrays in memory are simply sliced.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

DEFAULT_CHUNK = 2048  # images per piece: 2048 x 64 x 64 x 3 bytes = 25 MB


def _file_backing(images: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of row 0) for a whole, C-ordered memory-mapped array; None otherwise.

    Only the array np.memmap itself created (its base is the mmap) describes its file with .offset;
    a slice of it would not, so slices are read through the mapping like any array."""
    if (
        isinstance(images, np.memmap)
        and isinstance(images.base, mmap.mmap)
        and images.filename
        and images.flags.c_contiguous
    ):
        return str(images.filename), int(images.offset)
    return None


def _row_bytes(images: np.ndarray) -> int:
    return int(np.prod(images.shape[1:], dtype=np.int64)) * images.dtype.itemsize


def read_rows(images: np.ndarray, start: int, stop: int) -> np.ndarray:
    """images[start:stop] as a new, writable array in memory."""
    backing = _file_backing(images)
    if backing is None:
        return np.array(images[start:stop])
    stop = min(stop, len(images))
    count = max(0, stop - start)
    out = np.empty((count, *images.shape[1:]), dtype=images.dtype)
    if count:
        path, offset = backing
        row = _row_bytes(images)
        with open(path, "rb", buffering=0) as handle:
            _pread_into(handle.fileno(), memoryview(out).cast("B"), offset + start * row)
    return out


def gather_rows(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """images[indices] in the order given, read in ascending order (runs of neighbours in one read)."""
    indices = np.asarray(indices, dtype=np.int64)
    backing = _file_backing(images)
    if backing is None:
        return np.array(images[indices])
    order = np.argsort(indices, kind="stable")
    ascending = indices[order]
    out = np.empty((len(indices), *images.shape[1:]), dtype=images.dtype)
    if len(indices) == 0:
        return out
    path, offset = backing
    row = _row_bytes(images)
    # Rows of `out` in ascending file order; consecutive file rows are read with one call.
    breaks = np.flatnonzero(np.diff(ascending) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(ascending)]])
    sorted_rows = np.empty_like(out)
    sorted_flat = memoryview(sorted_rows).cast("B")
    with open(path, "rb", buffering=0) as handle:
        for first, last in zip(starts.tolist(), stops.tolist(), strict=True):
            _pread_into(handle.fileno(), sorted_flat[first * row : last * row], offset + int(ascending[first]) * row)
    out[order] = sorted_rows
    return out


def _pread_into(fd: int, target: memoryview, position: int) -> None:
    """Fill `target` from the file at `position` (pread may return less than asked: loop)."""
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], position + done)
        if count == 0:
            raise OSError(f"unexpected end of file at byte {position + done} (the store file is truncated)")
        done += count


def iter_chunks(
    images: np.ndarray,
    chunk: int = DEFAULT_CHUNK,
    desc: str | None = None,
    progress: bool | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(start, images[start:start + chunk]) for the whole array, each piece in memory; a progress bar
    (in images) when `desc` is given and progress is not False (None: when on a terminal)."""
    total = len(images)
    bar = tqdm(total=total, desc=desc, unit="img", disable=True if desc is None or progress is False else None)
    try:
        for start in range(0, total, chunk):
            block = read_rows(images, start, start + chunk)
            yield start, block
            bar.update(len(block))
    finally:
        bar.close()


class FileRows:
    """Rows of a memory-mapped array (optionally a subset of them, in a given order) read with positioned
    reads whenever they are sliced, for code that takes rows by slicing (the FAISS index build, the
    flag's calibration): a pass over 10^6 reference vectors then costs a block of them in memory, not
    the whole file in the resident set. np.asarray reads them all (for the small, exact cases)."""

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.array = array
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice) and self.rows is None:
            start, stop, step = key.indices(len(self))
            if step == 1:
                return read_rows(self.array, start, stop)
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        return gather_rows(self.array, positions if self.rows is None else self.rows[positions])

    def subset(self, rows: np.ndarray) -> FileRows:
        """These rows' `rows` (positions in this view), read lazily like this view."""
        rows = np.asarray(rows, dtype=np.int64)
        return FileRows(self.array, rows if self.rows is None else self.rows[rows])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class NpyRowWriter:
    """A .npy file of known shape written a block of rows at a time with plain writes (not through a
    memory map, whose dirty pages would count as the writer's memory), checked complete on close; a
    context manager. Readers can memory-map it like any .npy (np.load(mmap_mode="r"))."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by __exit__)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._handle, header)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(
                f"{self.path}: a block of shape {block.shape} does not fit {self.shape} at row {self.rows}"
            )
        self._handle.write(block.data)
        self.rows += len(block)

    def __enter__(self) -> NpyRowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()
        if exc[0] is None and self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written of {self.shape[0]}")
