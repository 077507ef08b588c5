"""Files an attacker (or an unlucky instrument) sends: bombs, many-pixel images, images stored sideways.

Shared by the tests (tests/test_images.py, tests/test_service.py and others).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import tifffile
from PIL import Image


def planar_tiff(width: int, height: int, planes: int = 3) -> bytes:
    """A real, decodable deflate TIFF of `planes` separate colour planes (PlanarConfiguration=2) of
    width x height zero pixels: tiny on the wire, width x height x planes bytes once decoded."""
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        np.zeros((planes, height, width), dtype=np.uint8),
        photometric="rgb" if planes == 3 else "minisblack",
        planarconfig="separate",
        compression="zlib",
        rowsperstrip=height,
    )
    return buffer.getvalue()


def tiff_claiming(
    width: int, height: int, samples: int = 3, planar: bool = True, bits: int = 8, sample_format: int = 1
) -> bytes:
    """A little-endian TIFF whose one IFD declares width x height pixels of `samples` samples of `bits`
    bits (separate planes when `planar`), deflate-compressed, with one tiny deflate strip per plane: what
    the header says is all a guard may look at (the data would be 0-filled when decoded)."""
    strip = zlib.compress(b"\0" * 1024)
    strips = samples if planar else 1
    spp_values = [bits] * samples
    entries: list[tuple[int, int, list[int]]] = [  # (tag, type: 3 SHORT / 4 LONG, values)
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, spp_values),
        (259, 3, [8]),  # deflate
        (262, 3, [2 if samples >= 3 else 1]),  # RGB or min-is-black
        (273, 4, [0] * strips),  # strip offsets: filled in below
        (277, 3, [samples]),
        (278, 4, [height]),
        (279, 4, [len(strip)] * strips),
        (284, 3, [2 if planar else 1]),
        (339, 3, [sample_format] * samples),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    extra_offset = ifd_offset + ifd_size
    # Values longer than 4 bytes go after the IFD; then the strips.
    extra = b""
    layout: list[tuple[int, int, int, bytes]] = []
    strip_values_at = None
    for tag, kind, values in entries:
        size = 2 if kind == 3 else 4
        packed = b"".join(v.to_bytes(size, "little") for v in values)
        if len(packed) <= 4:
            layout.append((tag, kind, len(values), packed.ljust(4, b"\0")))
        else:
            if tag == 273:
                strip_values_at = extra_offset + len(extra)
            layout.append((tag, kind, len(values), (extra_offset + len(extra)).to_bytes(4, "little")))
            extra += packed
    data_offset = extra_offset + len(extra)
    offsets = [data_offset + i * len(strip) for i in range(strips)]
    packed_offsets = b"".join(o.to_bytes(4, "little") for o in offsets)
    if strip_values_at is None:  # one strip: the offset sits in the entry itself
        layout = [(t, k, n, packed_offsets if t == 273 else v) for t, k, n, v in layout]
    else:
        start = strip_values_at - extra_offset
        extra = extra[:start] + packed_offsets + extra[start + len(packed_offsets) :]
    ifd = len(layout).to_bytes(2, "little")
    for tag, kind, count, value in layout:
        ifd += struct.pack("<HHI", tag, kind, count) + value
    ifd += (0).to_bytes(4, "little")
    return b"II*\x00" + ifd_offset.to_bytes(4, "little") + ifd + extra + strip * strips


def solid_png(width: int, height: int, colour: tuple[int, int, int] = (200, 120, 160)) -> bytes:
    """A real PNG of one colour: a few kB on the wire, width x height x 3 bytes once decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def with_orientation(stored: np.ndarray, orientation: int, format: str = "JPEG") -> bytes:
    """`stored` RGB pixels encoded with an EXIF orientation tag (as a camera writes a sideways photo)."""
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 95} if format == "JPEG" else {}
    image.save(buffer, format=format, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored in the file, ignoring any orientation tag (what a naive decoder returns)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).copy()
