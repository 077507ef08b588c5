"""Turning one request's uploads into model-sized images, with bounded memory and time.

One image may hold up to `max_pixels`, but one request may carry `max_images` of them: 64 images of
40 Mpx decoded and held together are ~7.7 GB. So, per request:
1. every file's header is read first (nothing decoded) and the request is refused when its images hold
   more than `max_request_pixels` pixels together (RequestTooLarge: HTTP 413), or an image is over the
   per-image limits (a problem naming the file: HTTP 422);
2. each image is brought to the model's size (serving/preprocess.py fit_image) as soon as it is
   decoded, so a request holds the full-size pixels of one image at a time;
3. at most `concurrency` requests decode at once in a worker; the others wait their turn;
4. waiting and decoding count against the request's deadline: past it the request stops between two
   images (DeadlineExceeded: HTTP 503) instead of holding a decoding slot.
A decoding thread cannot be interrupted inside one image, so its slot is given back only when the
thread has really finished, even when the request itself was cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from serving.bundle import Preprocessing
from serving.images import ImageDecodeError, check_size, decode_image, read_header
from serving.preprocess import fit_image


class Upload(Protocol):
    name: str
    data: bytes


class RequestTooLarge(Exception):
    """The request's images hold more pixels together than the per-request limit."""


class DeadlineExceeded(Exception):
    """The request's time budget ran out while it waited for, or was in, decoding."""


@dataclass
class DecodedUploads:
    images: list[np.ndarray]  # at the model's size, RGB uint8, in upload order; empty when there are problems
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "error", "reason"} per unusable file
    pixels: int = 0  # what the headers declared, all images together


class UploadDecoder:
    """`await decoder.decode(files, deadline)` for each request; one decoder per worker process."""

    def __init__(
        self,
        prep: Preprocessing,
        max_pixels: int,
        max_request_pixels: int,
        concurrency: int,
        on_active: Callable[[int], None] | None = None,
    ) -> None:
        self.prep = prep
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.concurrency = concurrency
        self.on_active = on_active  # called with the number of requests decoding now (a metrics gauge)
        self._slots: asyncio.Semaphore | None = None
        self._active = 0

    async def decode(self, files: Sequence[Upload], deadline: float) -> DecodedUploads:
        """RequestTooLarge, DeadlineExceeded, or the fitted images and the problems found (`deadline`
        is a time.monotonic() value)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        slots = self._slots
        try:
            await asyncio.wait_for(slots.acquire(), timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise DeadlineExceeded(
                f"waited for one of the {self.concurrency} decoding slots until the time budget ran out "
                "(the service is busy)"
            ) from None
        stop = threading.Event()
        self._set_active(+1)
        work = asyncio.ensure_future(asyncio.to_thread(self._decode_all, files, deadline, stop))

        def finished(_: asyncio.Future) -> None:
            self._set_active(-1)
            slots.release()

        work.add_done_callback(finished)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the thread stops before its next image; the slot comes back when it has
            raise

    def _set_active(self, change: int) -> None:
        self._active += change
        if self.on_active is not None:
            self.on_active(self._active)

    def _decode_all(self, files: Sequence[Upload], deadline: float, stop: threading.Event) -> DecodedUploads:
        problems: dict[int, dict[str, str]] = {}  # by position in the upload
        readable: list[tuple[int, Upload]] = []
        pixels = 0
        for index, file in enumerate(files):
            try:
                header = read_header(file.data, file.name, self.max_pixels)
                check_size(header, file.name, self.max_pixels)
            except ImageDecodeError as exc:
                problems[index] = {"file": file.name, "error": str(exc), "reason": exc.reason}
                continue
            readable.append((index, file))
            pixels += header.pixels
        if pixels > self.max_request_pixels:
            raise RequestTooLarge(
                f"the {len(readable)} images of this request hold {pixels:,} pixels together, over the limit of "
                f"{self.max_request_pixels:,} pixels per request (setting max_request_pixels); "
                "send them in several requests"
            )
        images: list[np.ndarray] = []
        for done, (index, file) in enumerate(readable):
            if stop.is_set() or time.monotonic() > deadline:
                raise DeadlineExceeded(f"the time budget ran out after decoding {done} of {len(readable)} images")
            try:
                decoded = decode_image(file.data, file.name, max_pixels=self.max_pixels)
            except ImageDecodeError as exc:
                problems[index] = {"file": file.name, "error": str(exc), "reason": exc.reason}
                continue
            images.append(fit_image(decoded, self.prep))
            del decoded  # the full-size pixels go now, before the next image is decoded
        if problems:
            return DecodedUploads([], [problems[i] for i in sorted(problems)], pixels)
        return DecodedUploads(images, [], pixels)
