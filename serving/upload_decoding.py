"""Turning one request's uploads into the model batch, with bounded memory and time.

One image may hold up to `max_pixels`, but one request may carry `max_images` of them: 64 images of
40 Mpx decoded and held together are ~7.7 GB. So, per request:
1. every file's header was read while the body streamed in (serving/upload_body.py), nothing decoded, and
   the request is refused when its images hold more than `max_request_pixels` pixels together
   (`check_request_pixels`: HTTP 413) or an image is over the per-image limits (a problem naming the file:
   HTTP 422);
2. each image is brought to the model's size (tsimcne_core/preprocess.py fit_image) as soon as it is decoded,
   so a request holds the full-size pixels of one image at a time, and the fitted images are stacked into
   the float32 model batch in the same step: decoding, fitting and stacking are one hop to a decoding
   thread (or none: a request of small images, at most `inline_pixels` together, is decoded on the event
   loop, where a thread hop would cost more than the decoding);
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.upload_body import Upload
from tsimcne_core.bundle_format import Preprocessing
from tsimcne_core.images import ImageDecodeError
from tsimcne_core.preprocess import fit_image, stack_fitted


class RequestTooLarge(Exception):
    """The request's images hold more pixels together than the per-request limit."""


class DeadlineExceeded(Exception):
    """The request's time budget ran out while it waited for, or was in, decoding."""


@dataclass
class DecodedUploads:
    batch: np.ndarray | None  # float32 (N, 3, H, W), the readable images in upload order; None when there are problems
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "error", "reason"} per unusable file
    pixels: np.ndarray | None = None  # the same images as uint8 (N, H, W, 3), what the journal keeps of them


def check_request_pixels(uploads: Sequence[Upload], max_request_pixels: int) -> None:
    """RequestTooLarge when the images of one request declare more pixels together than allowed."""
    readable = [upload for upload in uploads if upload.opened is not None]
    pixels = sum(upload.pixels for upload in readable)
    if pixels > max_request_pixels:
        raise RequestTooLarge(
            f"the {len(readable)} images of this request hold {pixels:,} pixels together, over the limit of "
            f"{max_request_pixels:,} pixels per request (setting max_request_pixels); send them in several requests"
        )


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
    """`await decoder.decode(uploads, deadline)` for each request; one decoder per worker process."""

    def __init__(
        self,
        prep: Preprocessing,
        max_pixels: int,
        concurrency: int,
        inline_pixels: int = 0,
        on_active: Callable[[int], None] | None = None,
    ) -> None:
        self.prep = prep
        self.max_pixels = max_pixels
        self.concurrency = concurrency
        self.inline_pixels = inline_pixels
        self.on_active = on_active  # called with the number of requests decoding in threads now (a metrics gauge)
        self._budget: PixelBudget | None = None
        self._active = 0
        self._threads = ThreadPoolExecutor(max(2, concurrency), thread_name_prefix="decode")

    async def decode(self, uploads: Sequence[Upload], deadline: float) -> DecodedUploads:
        """DeadlineExceeded, or the model batch and the problems found (`deadline` is a time.monotonic()
        value). Each upload's header has been read (`Upload.open`)."""
        readable = [upload for upload in uploads if upload.opened is not None]
        if not readable:
            return DecodedUploads(None, _problems(uploads, {}))
        if sum(upload.pixels for upload in readable) <= self.inline_pixels:
            return self._decode_all(uploads, deadline, None)
        if self._budget is None:  # made in the worker's event loop
            self._budget = PixelBudget(self.concurrency * self.max_pixels)
        budget = self._budget
        largest = max(upload.pixels for upload in readable)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                await budget.acquire(largest)
        except TimeoutError:
            raise DeadlineExceeded(
                f"waited to decode its {largest:,}-pixel image until the time budget ran out (the "
                f"service is busy decoding; at most {self.concurrency} x {self.max_pixels:,} pixels at once)"
            ) from None
        stop = threading.Event()
        self._set_active(+1)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._threads, self._decode_all, uploads, deadline, stop)

        def finished(_: asyncio.Future) -> None:
            self._set_active(-1)
            budget.release(largest)

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

    def _decode_all(self, uploads: Sequence[Upload], deadline: float, stop: threading.Event | None) -> DecodedUploads:
        problems: dict[int, ImageDecodeError] = {}
        fitted: list[np.ndarray] = []
        readable = sum(upload.opened is not None for upload in uploads)
        for index, upload in enumerate(uploads):
            if upload.opened is None:
                continue
            if (stop is not None and stop.is_set()) or time.monotonic() > deadline:
                raise DeadlineExceeded(f"the time budget ran out after decoding {len(fitted)} of {readable} images")
            try:
                decoded = upload.opened.decode()
            except ImageDecodeError as exc:
                problems[index] = exc
                continue
            fitted.append(fit_image(decoded, self.prep))
            del decoded  # the full-size pixels go now, before the next image is decoded
        if problems or any(upload.problem is not None for upload in uploads):
            return DecodedUploads(None, _problems(uploads, problems))
        pixels = np.stack(fitted)
        return DecodedUploads(stack_fitted(pixels, self.prep), pixels=pixels)


def _problems(uploads: Sequence[Upload], found: dict[int, ImageDecodeError]) -> list[dict[str, str]]:
    """Every unusable file, in upload order: those whose header could not be read, and those found when decoding."""
    problems = []
    for index, upload in enumerate(uploads):
        error = upload.problem or found.get(index)
        if error is not None:
            problems.append({"file": upload.name, "error": str(error), "reason": error.reason})
    return problems
