"""Decoding real files of every supported kind into RGB uint8, and clear errors for bad ones."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from benchmarks.harness.attack_files import planar_tiff, stored_pixels, tiff_claiming, with_orientation
from tsimcne_core.images import ImageDecodeError, decode_image, read_header, read_image, resize_rgb


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_rgb_roundtrip(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(rgb))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_becomes_three_equal_channels(rgb: np.ndarray) -> None:
    gray = rgb[:, :, 0]
    out = decode_image(_png_bytes(gray))
    assert out.shape == (20, 30, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_rgba_drops_alpha(rgb: np.ndarray) -> None:
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    out = decode_image(_png_bytes(rgba))
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    out = decode_image(buffer.getvalue(), "x.jpg")
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - smooth).mean() < 3


def test_16bit_tiff_gray_and_rgb_scale_by_full_range(tmp_path: Path) -> None:
    gray16 = np.array([[0, 257, 65535], [32896, 1000, 60000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", gray16)
    out = read_image(tmp_path / "g.tif")
    np.testing.assert_array_equal(out[:, :, 0], (gray16.astype(np.uint32) + 128) // 257)
    rgb16 = np.stack([gray16, gray16 // 2, gray16 // 4], axis=-1)
    tifffile.imwrite(tmp_path / "c.tiff", rgb16, photometric="rgb")
    out = read_image(tmp_path / "c.tiff")
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[:, :, 1], (rgb16[:, :, 1].astype(np.uint32) + 128) // 257)


def test_8bit_tiff(tmp_path: Path, rgb: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), rgb)


def test_16bit_png(tmp_path: Path) -> None:
    gray16 = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [100, 200]])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "upload.png: empty file"),
        (b"this is text, not an image", "upload.png: not a readable image"),
        # a PNG signature over broken content: named the same way, with what Pillow made of it
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "upload.png: not a readable image (UnidentifiedImageError"),
    ],
)
def test_bad_bytes_name_the_source(data: bytes, fragment: str) -> None:
    with pytest.raises(ImageDecodeError, match=r"upload\.png") as info:
        decode_image(data, "upload.png")
    assert fragment in str(info.value)


def test_truncated_jpeg_names_file(tmp_path: Path, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"nope\.png"):
        read_image(tmp_path / "nope.png")


def test_pixel_limit_guards_against_bombs() -> None:
    big = np.zeros((200, 300), dtype=np.uint8)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(_png_bytes(big), "big.png", max_pixels=10_000)


def test_resize_to_height_width(rgb: np.ndarray) -> None:
    out = resize_rgb(rgb, (10, 15))
    assert out.shape == (10, 15, 3)
    assert resize_rgb(rgb, (20, 30)) is rgb


def test_tiff_of_separate_planes_is_counted_whole_before_decoding() -> None:
    """The issue's bomb: 233 bytes declaring 3 planes of 100000x20000 (6 GB decoded). The old guard
    counted the first two axes of (3, 20000, 100000), 60,000 pixels, and decoded it."""
    bomb = tiff_claiming(100_000, 20_000, samples=3, planar=True)
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"bomb\.tif: 100000x20000 pixels of 3 samples") as info:
        decode_image(bomb, "bomb.tif", max_pixels=40_000_000)
    assert time.perf_counter() - started < 1  # refused from the header: nothing was decoded
    assert info.value.reason == "too_large" and "2,000,000,000 pixels exceeds the limit" in str(info.value)
    # A real decodable one (3 planes of 3000x2000) over a 4 Mpx limit: refused; under it: decoded.
    real = planar_tiff(3000, 2000)
    with pytest.raises(ImageDecodeError, match="6,000,000 pixels exceeds the limit of 4,000,000"):
        decode_image(real, "planes.tif", max_pixels=4_000_000)
    assert decode_image(real, "planes.tif", max_pixels=6_000_000).shape == (2000, 3000, 3)


def test_every_sample_and_byte_is_counted() -> None:
    """Within the pixel limit but 6 samples of 64-bit floats: 48 bytes a pixel, over 8 bytes per allowed pixel."""
    wide = tiff_claiming(2000, 1000, samples=6, planar=False, bits=64, sample_format=3)
    header = read_header(wide)
    assert (header.pixels, header.samples, header.sample_bytes, header.nbytes) == (2_000_000, 6, 8, 96_000_000)
    with pytest.raises(ImageDecodeError, match="96,000,000 bytes once decoded exceeds the limit of 32,000,000"):
        decode_image(wide, "wide.tif", max_pixels=4_000_000)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_header_declares_what_decoding_gives(format: str, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=format)
    header = read_header(buffer.getvalue(), f"x.{format.lower()}")
    assert (header.height, header.width) == decode_image(buffer.getvalue()).shape[:2] == (20, 30)
    assert header.samples in (1, 3) and header.sample_bytes == 1


def test_formats_beyond_the_supported_ones_are_refused(rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PCX")  # Pillow reads it; the service does not claim to
    with pytest.raises(ImageDecodeError, match=r"cell\.pcx: not a readable image .*formats read: PNG, JPEG"):
        decode_image(buffer.getvalue(), "cell.pcx")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, size=(4, 7, 3), dtype=np.uint8)
    data = with_orientation(stored, orientation, format="PNG")
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, "turned.png"), expected)


def test_sideways_jpeg_and_tiff_come_out_upright() -> None:
    upright = np.random.default_rng(1).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    sideways = np.ascontiguousarray(np.rot90(upright, 1))  # as a camera held sideways stores it
    jpeg = with_orientation(sideways, 6)
    # Orientation 6: the stored pixels are shown turned 90 degrees clockwise.
    np.testing.assert_array_equal(decode_image(jpeg, "sideways.jpg"), np.rot90(stored_pixels(jpeg), -1))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, sideways, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "sideways.tif"), upright)
