"""A request's uploads decoded into the model batch with bounded memory and time (serving/upload_decoding.py), on real
image files."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from benchmarks.harness.attack_files import planar_tiff, solid_png
from serving.upload_body import Upload
from serving.upload_decoding import DeadlineExceeded, RequestTooLarge, UploadDecoder, check_request_pixels
from tsimcne_core.bundle_format import Preprocessing

PREP = Preprocessing(height=16, width=16)
MAX_PIXELS = 4_000_000


def File(name: str, data: bytes) -> Upload:
    """An upload as the body reader hands it on: its header read (serving/upload_body.py)."""
    upload = Upload(name, data)
    upload.open(MAX_PIXELS)
    return upload


def _decoder(**limits) -> UploadDecoder:
    settings = {"max_pixels": MAX_PIXELS, "concurrency": 2, **limits}
    return UploadDecoder(PREP, **settings)


def _decode(decoder: UploadDecoder, files: list[Upload], budget: float = 30.0):
    return asyncio.run(decoder.decode(files, time.monotonic() + budget))


def test_the_images_come_back_as_one_model_batch() -> None:
    files = [File("a.png", solid_png(1000, 800)), File("b.png", solid_png(30, 20, (0, 0, 0)))]
    decoded = _decode(_decoder(), files)
    assert not decoded.problems and decoded.batch.shape == (2, 3, 16, 16) and decoded.batch.dtype == np.float32
    np.testing.assert_allclose(decoded.batch[0, :, 0, 0], np.array([200, 120, 160]) / 255, rtol=1e-6)
    assert decoded.batch[1].max() == 0


@pytest.mark.parametrize("inline_pixels", [0, 10**9])
def test_small_requests_decode_on_the_loop_and_others_in_a_thread(inline_pixels) -> None:
    """The same batch either way; the thread is used only above `inline_pixels`."""
    files = [File(f"{i}.png", solid_png(40, 30, (i, 2 * i, 3 * i))) for i in range(3)]
    decoder = _decoder(inline_pixels=inline_pixels, on_active=(active := []).append)
    decoded = _decode(decoder, files)
    assert decoded.batch.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(decoded.batch[:, 1, 0, 0], np.array([0, 2, 4]) / 255, rtol=1e-6)
    assert (active == [1, 0]) == (inline_pixels == 0)


def test_pixels_of_the_whole_request_are_counted_from_headers_before_decoding() -> None:
    big = solid_png(2000, 2000)
    files = [File(f"{i}.png", big) for i in range(3)]  # 12 Mpx together, 10 allowed
    with pytest.raises(RequestTooLarge, match="the 3 images of this request hold 12,000,000 pixels together"):
        check_request_pixels(files, 10_000_000)
    assert all(upload.opened is not None for upload in files)  # headers only: nothing was decoded
    check_request_pixels(files, 12_000_000)


def test_problems_name_every_bad_file_in_upload_order() -> None:
    good = solid_png(20, 20)
    files = [
        File("planes.tif", planar_tiff(3000, 2000)),  # over max_pixels, from its header
        File("good.png", good),
        File("cut.png", good[: len(good) // 2]),  # header fine, data truncated: found when decoding
        File("empty.png", b""),
    ]
    decoded = _decode(_decoder(), files)
    assert decoded.batch is None
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
        decoder = _decoder(concurrency=2, on_active=active.append)

        def files() -> list[Upload]:  # each request its own uploads
            return [File(f"{i}.png", data) for i, data in enumerate(images)]

        async def requests():
            deadline = time.monotonic() + 60
            return await asyncio.gather(*(decoder.decode(files(), deadline) for _ in range(6)))

        results = asyncio.run(requests())
        assert all(len(r.batch) == len(images) for r in results) and active[-1] == 0
        return max(active)

    assert burst([solid_png(2000, 2000)] * 3) == 2  # 4 Mpx each = max_pixels: two requests at a time
    assert burst([solid_png(200, 200)] * 30) > 2  # 40,000 pixels each: all share the budget at once


def test_a_request_past_its_deadline_stops_between_images_and_frees_its_slot() -> None:
    decoder = _decoder(concurrency=1)
    big = solid_png(2000, 2000)

    def heavy() -> list[Upload]:  # 160 Mpx: seconds of decoding
        return [File(f"{i}.png", big) for i in range(40)]

    async def scenario():
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"after decoding \d+ of 40 images"):
            await decoder.decode(heavy(), started + 0.3)
        stopped_after = time.monotonic() - started
        # A second request waiting for the one slot past its own deadline is refused without decoding.
        blocker = asyncio.ensure_future(decoder.decode(heavy(), time.monotonic() + 60))
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
    assert len(after.batch) == 1  # the slot came back
