"""Reading one array of an .npz a block of rows at a time (for `tsimcne prepare` of a large .npz).

np.load gives a member only whole. A member is a .npy file inside the zip (stored or deflated); its
header says dtype and shape, and the rows follow in C order, so they can be streamed off the zip member
with bounded memory. Fortran-ordered members (rare) are loaded whole.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tsimcne_core.errors import DataError


def _open_member(archive: zipfile.ZipFile, key: str, path: Path):
    name = f"{key}.npy"
    try:
        return archive.open(name)
    except KeyError as exc:
        raise DataError(f"{path}: no array {key!r}") from exc


def _header(handle, path: Path, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        return np.lib.format.read_array_header_2_0(handle)
    except ValueError as exc:
        raise DataError(f"{path}[{key}]: not a readable array ({exc})") from exc


def member_shape(path: Path, key: str) -> tuple[int, ...]:
    """The shape of array `key` without reading its data."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, key, path) as handle:
        return tuple(_header(handle, path, key)[0])


def iter_member_rows(path: Path, key: str, rows: int) -> Iterator[np.ndarray]:
    """Blocks of up to `rows` rows of array `key`, in order."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, key, path) as handle:
        shape, fortran, dtype = _header(handle, path, key)
        if fortran or dtype.hasobject or not shape:
            with np.load(path, allow_pickle=False) as whole:
                array = whole[key]
            for start in range(0, len(array), rows):
                yield array[start : start + rows]
            return
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            data = handle.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise DataError(f"{path}[{key}]: the array ends early (row {start + len(data) // max(row_bytes, 1)})")
            yield np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]))
