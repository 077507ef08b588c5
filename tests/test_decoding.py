"""A request's uploads decoded with bounded memory and time (serving/decoding.py), on real image files."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pytest

from serving.bundle import Preprocessing
from serving.decoding import DeadlineExceeded, RequestTooLarge, UploadDecoder
from tests.attack_files import planar_tiff, solid_png

PREP = Preprocessing(height=16, width=16)


@dataclass
class File:
    name: str
    data: bytes


def _decoder(**limits) -> UploadDecoder:
    settings = {"max_pixels": 4_000_000, "max_request_pixels": 10_000_000, "concurrency": 2, **limits}
    return UploadDecoder(PREP, **settings)


def _decode(decoder: UploadDecoder, files: list[File], budget: float = 30.0):
    return asyncio.run(decoder.decode(files, time.monotonic() + budget))


def test_each_image_comes_back_at_the_model_size() -> None:
    files = [File("a.png", solid_png(1000, 800)), File("b.png", solid_png(30, 20, (0, 0, 0)))]
    decoded = _decode(_decoder(), files)
    assert not decoded.problems and decoded.pixels == 1000 * 800 + 30 * 20
    assert [image.shape for image in decoded.images] == [(16, 16, 3), (16, 16, 3)]
    assert decoded.images[0].dtype == np.uint8 and tuple(decoded.images[0][0, 0]) == (200, 120, 160)


def test_pixels_of_the_whole_request_are_counted_from_headers_before_decoding() -> None:
    big = solid_png(2000, 2000)
    files = [File(f"{i}.png", big) for i in range(3)]  # 12 Mpx together, 10 allowed
    started = time.perf_counter()
    with pytest.raises(RequestTooLarge, match="the 3 images of this request hold 12,000,000 pixels together"):
        _decode(_decoder(), files)
    assert time.perf_counter() - started < 1  # headers only: nothing was decoded


def test_problems_name_every_bad_file_in_upload_order() -> None:
    good = solid_png(20, 20)
    files = [
        File("planes.tif", planar_tiff(3000, 2000)),  # over max_pixels, from its header
        File("good.png", good),
        File("cut.png", good[: len(good) // 2]),  # header fine, data truncated: found when decoding
        File("empty.png", b""),
    ]
    decoded = _decode(_decoder(), files)
    assert decoded.images == []
    assert [(p["file"], p["reason"]) for p in decoded.problems] == [
        ("planes.tif", "too_large"),
        ("cut.png", "undecodable"),
        ("empty.png", "empty"),
    ]


def test_full_size_images_take_turns_and_small_ones_decode_side_by_side() -> None:
    """The pixels being decoded at once are bounded to concurrency x max_pixels: six requests of images at
    max_pixels decode two at a time; six of small images all at once."""

    def burst(images: list[bytes]) -> int:
        active: list[int] = []
        decoder = _decoder(concurrency=2, max_request_pixels=100_000_000, on_active=active.append)
        files = [File(f"{i}.png", data) for i, data in enumerate(images)]

        async def requests():
            deadline = time.monotonic() + 60
            return await asyncio.gather(*(decoder.decode(files, deadline) for _ in range(6)))

        results = asyncio.run(requests())
        assert all(len(r.images) == len(images) for r in results) and active[-1] == 0
        return max(active)

    assert burst([solid_png(2000, 2000)] * 3) == 2  # 4 Mpx each = max_pixels: two requests at a time
    assert burst([solid_png(200, 200)] * 30) > 2  # 40,000 pixels each: all share the budget at once


def test_a_request_past_its_deadline_stops_between_images_and_frees_its_slot() -> None:
    decoder = _decoder(concurrency=1, max_request_pixels=400_000_000)
    big = solid_png(2000, 2000)
    heavy = [File(f"{i}.png", big) for i in range(40)]  # 160 Mpx: seconds of decoding

    async def scenario():
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"after decoding \d+ of 40 images"):
            await decoder.decode(heavy, started + 0.3)
        stopped_after = time.monotonic() - started
        # A second request waiting for the one slot past its own deadline is refused without decoding.
        blocker = asyncio.ensure_future(decoder.decode(heavy, time.monotonic() + 60))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="waited to decode its 4,000,000-pixel image"):
            await decoder.decode([File("big.png", big)], time.monotonic() + 0.1)
        blocker.cancel()  # the client went away: its thread stops before the next image
        with pytest.raises(asyncio.CancelledError):
            await blocker
        after = await decoder.decode([File("small.png", solid_png(20, 20))], time.monotonic() + 30)
        return stopped_after, after

    stopped_after, after = asyncio.run(scenario())
    assert stopped_after < 3, stopped_after  # one image past the deadline at most, not 40
    assert len(after.images) == 1  # the slot came back
