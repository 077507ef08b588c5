"""Image decoding and resizing shared by training and serving.

Both sides must turn a file into exactly the same pixels, so this module (numpy + Pillow + tifffile,
no torch) is the one place where that happens. Every image becomes RGB uint8 of shape (H, W, 3):
- grayscale is repeated into three channels (the network has three input channels);
- RGBA and LA drop alpha (microscopy exports carry an opaque alpha; compositing would invent colour);
- 16-bit data (PNG or TIFF) is scaled by the full 16-bit range (value / 257), so the same file always
  gives the same pixels regardless of what else is in the collection;
- palette, CMYK and other modes go through Pillow's RGB conversion;
- an orientation tag (EXIF in JPEG, PNG and WebP; the TIFF Orientation tag) is applied, as image
  viewers and browsers do, so a photo taken sideways gives the same pixels as the same photo upright.

Only the first page or frame of a file is decoded. Before it is, its header is read and every sample
it will produce is counted (width x height x depth, samples per pixel, bytes per sample, separate
planes): a file over `max_pixels` pixels, or over MAX_BYTES_PER_PIXEL bytes per allowed pixel once
decoded, is refused without being decoded (a 1.9 MB TIFF can declare 6 GB of planes).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

# Pillow's own bomb guard raises only above 2x this; we raise at the limit itself, with a clear message.
DEFAULT_MAX_PIXELS = 100_000_000
# The most a supported image needs per pixel (four 16-bit samples); more bytes than this per allowed pixel
# (many extra samples, 64-bit samples) is refused like too many pixels.
MAX_BYTES_PER_PIXEL = 8
# The formats Pillow may open: those of IMAGE_SUFFIXES (its JPEG reader also opens MPO files). Pillow knows
# dozens more; refusing them keeps the set whose headers the size guard must understand small.
PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
EXIF_ORIENTATION = 0x0112  # also the TIFF Orientation tag
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
RESIZE_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}


class ImageDecodeError(ValueError):
    """An image that cannot be turned into pixels; the message names the source and the reason.

    `reason` is a short fixed word for counting: "undecodable", "too_large" or "empty".
    """

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    """What decoding a file's first page or frame will produce, as its header declares it."""

    width: int
    height: int
    depth: int = 1  # planes of a volume (TIFF ImageDepth)
    samples: int = 1  # samples per pixel: colour channels, alpha, extra samples
    sample_bytes: int = 1
    separate_planes: bool = False  # each sample stored as its own plane (TIFF PlanarConfiguration=2)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.depth

    @property
    def nbytes(self) -> int:
        return self.pixels * self.samples * self.sample_bytes

    def describe(self) -> str:
        size = f"{self.width}x{self.height}" + (f"x{self.depth}" if self.depth > 1 else "")
        text = f"{size} pixels of {self.samples} sample{'s' if self.samples > 1 else ''}"
        text += f" x {self.sample_bytes} byte{'s' if self.sample_bytes > 1 else ''}"
        return text + (", in separate planes" if self.separate_planes else "")


def check_size(header: ImageHeader, source: str, max_pixels: int) -> None:
    """ImageDecodeError (reason "too_large") when decoding would produce more than the limits allow."""
    if header.pixels > max_pixels:
        raise ImageDecodeError(
            f"{source}: {header.describe()}: {header.pixels:,} pixels exceeds the limit of {max_pixels:,} pixels",
            reason="too_large",
        )
    max_bytes = max_pixels * MAX_BYTES_PER_PIXEL
    if header.nbytes > max_bytes:
        raise ImageDecodeError(
            f"{source}: {header.describe()}: {header.nbytes:,} bytes once decoded exceeds the limit of "
            f"{max_bytes:,} bytes ({max_pixels:,} pixels of at most {MAX_BYTES_PER_PIXEL} bytes)",
            reason="too_large",
        )


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring any integer or float pixel array to uint8 by its type's full range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.max <= 255 and info.min >= 0:
            return array.astype(np.uint8)
        if array.dtype == np.uint16 or (info.max == 65535):
            return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
        # Other integer types (int16, int32, uint32): scale by their observed non-negative range.
        clipped = np.clip(array.astype(np.float64), 0, None)
        peak = clipped.max()
        return np.round(clipped * (255.0 / peak)).astype(np.uint8) if peak > 0 else clipped.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(finite * scale), 0, 255).astype(np.uint8)
    raise ImageDecodeError(f"unsupported pixel type {array.dtype}")


def _channels_to_rgb(array: np.ndarray, source: str) -> np.ndarray:
    """Give an (H, W), (H, W, 1..4) or channel-first array the (H, W, 3) layout."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first TIFF
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3:
        raise ImageDecodeError(f"{source}: expected a 2-D image, got an array of shape {array.shape}")
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 2:  # gray + alpha
        return np.repeat(array[:, :, :1], 3, axis=2)
    if channels >= 3:
        return np.ascontiguousarray(array[:, :, :3])
    raise ImageDecodeError(f"{source}: cannot use an image with {channels} channels")


def as_rgb(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """An image already in memory ((H, W) gray, (H, W, 1..4), any integer or float pixel type) -> RGB uint8
    (H, W, 3), by the same rules as a decoded file."""
    return _channels_to_rgb(to_uint8(np.asarray(array)), source)


def apply_orientation(image: np.ndarray, orientation: int | None) -> np.ndarray:
    """Turn (H, W, ...) pixels stored with an EXIF/TIFF orientation (1-8) upright, as Pillow's
    ImageOps.exif_transpose does; other values leave the image as stored."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    if orientation not in turned:
        return image
    return np.ascontiguousarray(turned[orientation](image))


def _is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_header(page) -> ImageHeader:
    """Every sample tifffile's asarray() of this page will produce, from its tags alone."""
    width, height, depth = int(page.imagewidth), int(page.imagelength), max(int(page.imagedepth), 1)
    pixels = width * height * depth
    declared = int(page.samplesperpixel)
    in_shape = math.prod(int(n) for n in page.shape) // pixels if pixels else 0
    bits = page.bitspersample
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    sample_bytes = page.dtype.itemsize if page.dtype is not None else max(1, math.ceil(bits / 8))
    return ImageHeader(
        width=width,
        height=height,
        depth=depth,
        samples=max(declared, in_shape, 1),
        sample_bytes=sample_bytes,
        separate_planes=int(page.planarconfig) == 2 and declared > 1,
    )


def _tiff_orientation(page) -> int | None:
    tag = page.tags.get(EXIF_ORIENTATION)
    try:
        return int(tag.value) if tag is not None else None
    except (TypeError, ValueError):
        return None


def _open_tiff(data: bytes, source: str):
    import tifffile

    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageDecodeError(f"{source}: not a readable TIFF ({exc})") from exc
    try:
        return tif, _tiff_header(tif.pages[0])
    except Exception as exc:
        tif.close()
        raise ImageDecodeError(f"{source}: not a readable TIFF ({exc})") from exc


def _decode_tiff(tif, data: bytes, source: str, max_pixels: int) -> np.ndarray:
    try:
        with tif:
            page = tif.pages[0]
            orientation = _tiff_orientation(page)
            if page.photometric == 5 and page.samplesperpixel > 1:  # SEPARATED (CMYK): let Pillow convert
                return _decode_pillow(_open_with_pillow(data, source, max_pixels), source, max_pixels)
            array = page.asarray()
    except ImageDecodeError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageDecodeError(f"{source}: not a readable TIFF ({exc})") from exc
    return apply_orientation(_channels_to_rgb(to_uint8(array), source), orientation)


def _pillow_header(image: Image.Image) -> ImageHeader:
    """The frame Pillow's load() will decode: its size and the samples of its mode."""
    mode = ImageMode.getmode(image.mode)
    width, height = image.size
    return ImageHeader(
        width=width, height=height, samples=len(mode.bands), sample_bytes=np.dtype(mode.typestr).itemsize
    )


def _open_with_pillow(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Image.open (header only) with Pillow's own bomb guard turned into ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own guard, at open
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "its size"
        raise ImageDecodeError(
            f"{source}: {size} exceeds the limit of {max_pixels:,} pixels", reason="too_large"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{source}: not a readable image ({exc.__class__.__name__}; formats read: {', '.join(PILLOW_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{source}: broken or truncated image ({exc})") from exc


def _decode_pillow(image: Image.Image, source: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{source}: exceeds the limit of {max_pixels:,} pixels", reason="too_large") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{source}: broken or truncated image ({exc})") from exc
    return apply_orientation(_pillow_rgb(image, source), orientation)


def _pillow_rgb(image: Image.Image, source: str) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I"):  # 16-bit grayscale (I;16*) and 32-bit integer (I) hold 16-bit data
        array = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _channels_to_rgb(to_uint8(array), source)
    if mode == "F":
        return _channels_to_rgb(to_uint8(np.asarray(image)), source)
    if mode in ("RGBA", "LA", "PA"):
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[:, :, :3])
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image).copy()


class OpenedImage:
    """A file whose header has been read and nothing decoded yet: what decoding will produce (`header`),
    and `decode()`, which decodes from the same opened file (the service reads each upload's header as its
    part arrives, to enforce the pixel limits, and decodes it later without opening it again)."""

    __slots__ = ("_data", "_opened", "header", "max_pixels", "source")

    def __init__(self, data: bytes, source: str, header: ImageHeader, opened: object, max_pixels: int) -> None:
        self._data, self.source, self.header, self._opened, self.max_pixels = data, source, header, opened, max_pixels

    def check_size(self) -> None:
        """ImageDecodeError (reason "too_large") when decoding would exceed `max_pixels` or its bytes."""
        check_size(self.header, self.source, self.max_pixels)

    def decode(self) -> np.ndarray:
        """Upright RGB uint8 (H, W, 3); ImageDecodeError naming the file when it is over the limits or broken.
        Once only: the opened file is consumed."""
        self.check_size()
        opened, self._opened = self._opened, None
        if opened is None:
            raise ValueError(f"{self.source}: already decoded")
        if isinstance(opened, Image.Image):
            return _decode_pillow(opened, self.source, self.max_pixels)
        return _decode_tiff(opened, self._data, self.source, self.max_pixels)


def open_image(data: bytes, source: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Read `data`'s header (nothing is decoded); ImageDecodeError names `source` when it cannot be read."""
    if not data:
        raise ImageDecodeError(f"{source}: empty file (0 bytes)", reason="empty")
    if _is_tiff(data):
        tif, header = _open_tiff(data, source)
        return OpenedImage(data, source, header, tif, max_pixels)
    image = _open_with_pillow(data, source, max_pixels)
    return OpenedImage(data, source, _pillow_header(image), image, max_pixels)


def read_header(data: bytes, source: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """What decoding `data` would produce, from its header only (nothing is decoded); ImageDecodeError
    names `source` when the header cannot be read."""
    return open_image(data, source, max_pixels).header


def decode_image(data: bytes, source: str = "<upload>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into upright RGB uint8 (H, W, 3); ImageDecodeError names `source` on
    failure, and refuses before decoding an image whose header declares more than `max_pixels`."""
    return open_image(data, source, max_pixels).decode()


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Read an image file into RGB uint8 (H, W, 3). name: what errors call the file (default: the path;
    the Ray engine reads absolute paths but reports the path as the user listed it)."""
    path = Path(path)
    source = str(path) if name is None else name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{source}: cannot read file ({exc.strerror or exc})") from exc
    return decode_image(data, source, max_pixels)


def resize_rgb(image: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize RGB uint8 (H, W, 3) to size = (height, width) with Pillow; no-op at the right size."""
    height, width = size
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if method not in RESIZE_FILTERS:
        raise ValueError(f"unknown resize method {method!r}; choose one of {sorted(RESIZE_FILTERS)}")
    resized = Image.fromarray(image, mode="RGB").resize((width, height), RESIZE_FILTERS[method])
    return np.asarray(resized).copy()


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The central (height, width) region; sides already smaller than the crop are kept whole."""
    height, width = min(size[0], image.shape[0]), min(size[1], image.shape[1])
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def load_rgb(path: str | Path, size: tuple[int, int] | None, method: str = "bicubic") -> np.ndarray:
    """Read a file and bring it to `size` (height, width); None keeps the native size."""
    image = read_image(path)
    return image if size is None else resize_rgb(image, size, method)
