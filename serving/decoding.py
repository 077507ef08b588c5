"""Turning one request's uploads into model-sized images, with bounded memory and time.

One image may hold up to `max_pixels`, but one request may carry `max_images` of them: 64 images of
40 Mpx decoded and held together are ~7.7 GB. So, per request:
1. every file's header is read first (nothing decoded) and the request is refused when its images hold
   more than `max_request_pixels` pixels together (RequestTooLarge: HTTP 413), or an image is over the
   per-image limits (a problem naming the file: HTTP 422);
2. each image is brought to the model's size (serving/preprocess.py fit_image) as soon as it is
   decoded, so a request holds the full-size pixels of one image at a time: its largest image's;
3. the full-size pixels being decoded at once in a worker are bounded to `concurrency` x `max_pixels`
   (a PixelBudget): each request reserves its largest image's pixels before it decodes, so any number
   of small-image requests decode side by side while big ones take turns;
4. waiting and decoding count against the request's deadline: past it the request stops between two
   images (DeadlineExceeded: HTTP 503) instead of holding its reservation.
A decoding thread cannot be interrupted inside one image, so its reservation is given back only when
the thread has really finished, even when the request itself was cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
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


@dataclass
class _Headers:
    readable: list[tuple[int, Upload]]  # (position in the upload, file) of the files whose header passed
    problems: dict[int, dict[str, str]]  # by position in the upload
    pixels: int  # all readable images together
    largest: int  # the largest readable image: what decoding this request holds at full size at once


class PixelBudget:
    """An asyncio semaphore counted in pixels, first come first served: `await acquire(n)` waits until n
    more pixels fit within `capacity`; `release(n)` gives them back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, pixels: int) -> None:
        pixels = min(pixels, self.capacity)  # one image never waits for more than there is
        if not self._waiting and self.used + pixels <= self.capacity:
            self.used += pixels
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just as the waiter was cancelled
                self.release(pixels)
            else:
                self._wake()  # a large waiter leaving may let smaller ones behind it in
            raise

    def release(self, pixels: int) -> None:
        self.used -= min(pixels, self.capacity)
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            pixels, granted = self._waiting[0]
            if granted.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            if self.used + pixels > self.capacity:
                return
            self._waiting.popleft()
            self.used += pixels
            granted.set_result(None)


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
        self._budget: PixelBudget | None = None
        self._active = 0

    async def decode(self, files: Sequence[Upload], deadline: float) -> DecodedUploads:
        """RequestTooLarge, DeadlineExceeded, or the fitted images and the problems found (`deadline`
        is a time.monotonic() value)."""
        if self._budget is None:  # made in the worker's event loop
            self._budget = PixelBudget(self.concurrency * self.max_pixels)
        budget = self._budget
        headers = await asyncio.to_thread(self._read_headers, files)
        if headers.pixels > self.max_request_pixels:
            raise RequestTooLarge(
                f"the {len(headers.readable)} images of this request hold {headers.pixels:,} pixels together, over "
                f"the limit of {self.max_request_pixels:,} pixels per request (setting max_request_pixels); "
                "send them in several requests"
            )
        if not headers.readable:
            return DecodedUploads([], _in_order(headers.problems), headers.pixels)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await budget.acquire(headers.largest)
        except TimeoutError:
            raise DeadlineExceeded(
                f"waited to decode its {headers.largest:,}-pixel image until the time budget ran out (the "
                f"service is busy decoding; at most {self.concurrency} x {self.max_pixels:,} pixels at once)"
            ) from None
        stop = threading.Event()
        self._set_active(+1)
        work = asyncio.ensure_future(asyncio.to_thread(self._decode_all, headers, deadline, stop))

        def finished(_: asyncio.Future) -> None:
            self._set_active(-1)
            budget.release(headers.largest)

        work.add_done_callback(finished)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the thread stops before its next image; the pixels come back when it has
            raise

    def _set_active(self, change: int) -> None:
        self._active += change
        if self.on_active is not None:
            self.on_active(self._active)

    def _read_headers(self, files: Sequence[Upload]) -> _Headers:
        headers = _Headers(readable=[], problems={}, pixels=0, largest=0)
        for index, file in enumerate(files):
            try:
                header = read_header(file.data, file.name, self.max_pixels)
                check_size(header, file.name, self.max_pixels)
            except ImageDecodeError as exc:
                headers.problems[index] = {"file": file.name, "error": str(exc), "reason": exc.reason}
                continue
            headers.readable.append((index, file))
            headers.pixels += header.pixels
            headers.largest = max(headers.largest, header.pixels)
        return headers

    def _decode_all(self, headers: _Headers, deadline: float, stop: threading.Event) -> DecodedUploads:
        problems = dict(headers.problems)
        images: list[np.ndarray] = []
        for done, (index, file) in enumerate(headers.readable):
            if stop.is_set() or time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"the time budget ran out after decoding {done} of {len(headers.readable)} images"
                )
            try:
                decoded = decode_image(file.data, file.name, max_pixels=self.max_pixels)
            except ImageDecodeError as exc:
                problems[index] = {"file": file.name, "error": str(exc), "reason": exc.reason}
                continue
            images.append(fit_image(decoded, self.prep))
            del decoded  # the full-size pixels go now, before the next image is decoded
        if problems:
            return DecodedUploads([], _in_order(problems), headers.pixels)
        return DecodedUploads(images, [], headers.pixels)


def _in_order(problems: dict[int, dict[str, str]]) -> list[dict[str, str]]:
    return [problems[index] for index in sorted(problems)]
