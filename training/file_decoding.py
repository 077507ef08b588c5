"""Decoding many image files into one array, in parallel threads and in bounded pieces.

The readers (training/data.py) and `tsimcne prepare` (training/image_store.py) both go through
`decode_into`: files are decoded (by tsimcne_core/images.py, the code the service uses) a piece at a time,
at most two pieces in flight, and each piece is handed to a sink that puts it in place: a preallocated
array in memory, or the store's file on disk. No list of every decoded image is ever held, so reading
N images needs the destination plus two pieces, not twice the data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from tsimcne_core.cores import usable_cores
from tsimcne_core.errors import DataError
from tsimcne_core.images import ImageDecodeError, read_image, resize_rgb

PIECE_BYTES = 32 << 20  # decoded bytes per piece (two pieces are in flight)
MAX_PIECE = 512  # images per piece at most
FIRST_PIECE = 16  # the first piece is small: the images' size is not known before it


class RowSink(Protocol):
    """Where decoded images go: rows [start, start + len(block)) of an (N, H, W, 3) uint8 array."""

    def write(self, start: int, block: np.ndarray) -> None: ...


# open_sink(rows to allocate, (height, width)): called once, when the images' size is known.
SinkOpener = Callable[[int, tuple[int, int]], RowSink]


@dataclass
class DecodeResult:
    kept: np.ndarray  # int64: indices into `paths` of the images written, in order (rows 0..len-1)
    problems: list[str]  # one message per file skipped (skip_bad)
    image_size: tuple[int, int]


def check_not_upscaled(image: np.ndarray, size: tuple[int, int], source: str, allow_upscale: bool) -> None:
    if allow_upscale:
        return
    if image.shape[0] < size[0] or image.shape[1] < size[1]:
        raise DataError(
            f"{source}: image is {image.shape[0]}x{image.shape[1]} (HxW), smaller than the training size "
            f"{size[0]}x{size[1]}; choose a smaller --image-size or pass --allow-upscale"
        )


def default_workers() -> int:
    """Decoding threads: Pillow releases the GIL while decoding, so a few per usable core help."""
    return max(2, min(16, 2 * usable_cores()))


def _pieces(count: int, first: int, later: Callable[[], int]) -> Iterator[tuple[int, int]]:
    start, size = 0, first
    while start < count:
        yield start, min(count, start + size)
        start, size = start + size, later()


def decode_into(
    paths: Sequence[Path],
    size: tuple[int, int] | None,
    method: str,
    skip_bad: bool,
    allow_upscale: bool,
    open_sink: SinkOpener,
    workers: int | None = None,
    progress: bool | None = None,
    desc: str = "reading images",
) -> DecodeResult:
    """Decode `paths` (resized to `size` when given) into the sink `open_sink` returns, keeping order.

    Unreadable files raise DataError naming the file, or with skip_bad are left out (rows stay
    contiguous). Without `size`, every image must have the first one's size."""

    def load(path: Path) -> np.ndarray | str:
        try:
            image = read_image(path)
            if size is not None:
                check_not_upscaled(image, size, str(path), allow_upscale)
                image = resize_rgb(image, size, method)
            return image
        except (ImageDecodeError, DataError) as exc:
            return str(exc)

    image_size: tuple[int, int] | None = size
    piece = [FIRST_PIECE if size is None else _piece_for(size)]
    sink: RowSink | None = None
    kept: list[int] = []
    problems: list[str] = []
    written = 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=progress_disable(progress))
    pool = ThreadPoolExecutor(max_workers=workers or default_workers())
    pending: deque[tuple[int, list[Future]]] = deque()
    ranges = _pieces(len(paths), piece[0], lambda: piece[0])

    def submit_next() -> None:
        for start, stop in ranges:
            pending.append((start, [pool.submit(load, paths[i]) for i in range(start, stop)]))
            return

    try:
        submit_next()
        submit_next()
        while pending:
            start, futures = pending.popleft()
            images: list[np.ndarray] = []
            for offset, future in enumerate(futures):
                result = future.result()
                index = start + offset
                if isinstance(result, str):
                    if not skip_bad:
                        raise DataError(f"{result} (pass --skip-bad to skip unreadable images)")
                    problems.append(result)
                    continue
                if image_size is None:
                    image_size = (int(result.shape[0]), int(result.shape[1]))
                    piece[0] = _piece_for(image_size)
                if result.shape[:2] != image_size:
                    raise DataError(
                        f"{paths[index]}: images have different sizes ({result.shape[0]}x{result.shape[1]} here, "
                        f"{image_size[0]}x{image_size[1]} before); pass --image-size to resize them all"
                    )
                images.append(result)
                kept.append(index)
            submit_next()
            if images:
                if sink is None:
                    assert image_size is not None
                    sink = open_sink(len(paths) - len(problems), image_size)  # rows needed at most
                sink.write(written, np.stack(images))
                written += len(images)
            bar.update(len(futures))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if not kept:
        first = problems[0] if problems else "no images"
        raise DataError(f"none of the {len(paths)} images could be read; first problem: {first}")
    assert image_size is not None
    return DecodeResult(np.asarray(kept, dtype=np.int64), problems, image_size)


def progress_disable(progress: bool | None) -> bool | None:
    """tqdm's `disable` for progress True (show), False (hide), None (show on a terminal)."""
    return None if progress is None else not progress


def _piece_for(size: tuple[int, int]) -> int:
    return int(max(1, min(MAX_PIECE, PIECE_BYTES // (size[0] * size[1] * 3))))
