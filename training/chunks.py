"""Reading image arrays in bounded pieces, whether they are in memory or memory-mapped from a store.

A memory-mapped array (training/store.py) is read with plain positioned reads (os.pread) instead of
touching the mapping: pages touched through a mapping stay in the process's resident set until the
kernel needs them back, so one pass over a 10 GB store would *look* like 10 GB of process memory (and
would count against a container's limit). Reads land in the page cache instead, which is not the
process's memory. Arrays in memory are simply sliced.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

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
