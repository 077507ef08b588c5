"""Reading an /embed request's images from its body as it streams in, with every limit checked on the way.

Two forms of body:
- `multipart/form-data` with one or more files in the field `images` (what `curl -F images=@cell.png` and
  browsers send), parsed once, incrementally, by python-multipart's streaming parser (a refused request's unread rest is
  dropped by the server, so the connection carries the next request);
- one image as the whole body (`Content-Type: image/png`, `image/jpeg`, `image/tiff`, ... or
  `application/octet-stream`; the file name from `?filename=`), for acquisition pipelines that post each
  image as it is taken.

While the body arrives: its size against `max_bytes` (a declared Content-Length over it is refused before a
byte is read), the number of files against `max_files` (refused at the first part too many), each part's
field and kind as soon as its headers are complete, and each image's header as soon as its part is complete
(`open_image`: nothing decoded; an image over `max_pixels` or unreadable is a problem named after its file,
and the declared pixels of all images add up against the request's limit). Every refusal is a `Refusal`
carrying the status, a short reason (a metrics label) and the message the client gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from tsimcne_core.images import ImageDecodeError, OpenedImage, open_image

# Content types accepted for one image sent as the whole body (the decoder reads the format from the bytes).
RAW_IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/tiff", "image/gif", "image/bmp", "image/webp", "application/octet-stream"}
)


class Refusal(Exception):
    """A request answered with a 4xx (or 503) before or instead of placing its images."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        detail: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.detail, self.headers = status, reason, message, detail, headers


class ClientGone(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


@dataclass
class Upload:
    """One uploaded file: its name, its bytes, and its header once read (or why it could not be)."""

    name: str
    data: bytes
    opened: OpenedImage | None = None
    problem: ImageDecodeError | None = None

    def open(self, max_pixels: int) -> None:
        """Read the header (nothing is decoded) and check it against the per-image limits."""
        if self.opened is not None or self.problem is not None:
            return
        try:
            opened = open_image(self.data, self.name, max_pixels)
            opened.check_size()
        except ImageDecodeError as exc:
            self.problem = exc
            return
        self.opened = opened

    @property
    def pixels(self) -> int:
        return self.opened.header.pixels if self.opened is not None else 0


@dataclass
class BodyLimits:
    max_bytes: int
    max_files: int
    max_pixels: int  # per image
    field: str = "images"
    route: str = "/embed"

    @property
    def example(self) -> str:
        return f"e.g. `curl -F {self.field}=@cell.png {self.route}`"

    def empty(self) -> Refusal:
        return Refusal(
            400,
            "empty",
            f"empty request: send one or more image files in the multipart field '{self.field}'; {self.example}",
        )

    def too_many(self) -> Refusal:
        return Refusal(
            413,
            "too_many_images",
            f"more than {self.max_files} images in one request (the limit, setting max_images); "
            "send them in several requests",
        )

    def too_large(self, size: str) -> Refusal:
        limit_mib = self.max_bytes / (1024 * 1024)
        return Refusal(
            413,
            "too_large",
            f"request body {size} exceeds the limit of {self.max_bytes:,} bytes ({limit_mib:g} MiB)",
        )

    def wrong_type(self, content_type: str) -> Refusal:
        raw = ", ".join(sorted(RAW_IMAGE_TYPES))
        return Refusal(
            415,
            "content_type",
            f"send images as multipart/form-data in the field '{self.field}', or one image as the body with "
            f"Content-Type one of {raw} (got content type {content_type or 'none'!r}); {self.example}",
        )


@dataclass
class _Part:
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""
    filename: bytes = b""
    chunks: list[bytes] = field(default_factory=list)


class _MultipartReader:
    """python-multipart's streaming parser with the callbacks that collect (and check) the uploads."""

    parsers_made = 0  # constructions in this process (a test checks: one per multipart request)

    def __init__(self, boundary: bytes, limits: BodyLimits) -> None:
        self.limits = limits
        self.uploads: list[Upload] = []
        self.ended = False
        self._part = _Part()
        callbacks: Any = {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._part.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._part.header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self._part.chunks.append(data[start:end]),
            "on_part_end": self._end,
            "on_end": self._finished,
        }
        self.parser = MultipartParser(boundary, callbacks)
        _MultipartReader.parsers_made += 1

    def _begin(self) -> None:
        if len(self.uploads) >= self.limits.max_files:
            raise self.limits.too_many()
        self._part = _Part()

    def _header_end(self) -> None:
        part = self._part
        if bytes(part.header_name).strip().lower() == b"content-disposition":
            part.disposition = bytes(part.header_value)
        part.header_name.clear()
        part.header_value.clear()

    def _headers_finished(self) -> None:
        limits = self.limits
        if not self._part.disposition:
            raise _malformed("a part has no Content-Disposition header naming its field")
        _, options = parse_options_header(self._part.disposition)
        name = _text(options.get(b"name", b""))
        if name != limits.field:
            raise Refusal(
                400,
                "wrong_field",
                f"unexpected multipart field {name!r}: images go in the field '{limits.field}'; {limits.example}",
            )
        if b"filename" not in options:
            raise Refusal(
                400, "not_a_file", f"the field '{limits.field}' must carry files, not text values; {limits.example}"
            )
        self._part.filename = options[b"filename"]

    def _end(self) -> None:
        part = self._part
        upload = Upload(_file_name(_text(part.filename)), b"".join(part.chunks))
        upload.open(self.limits.max_pixels)
        self.uploads.append(upload)
        self._part = _Part()

    def _finished(self) -> None:
        self.ended = True


async def read_uploads(scope: dict, receive: Any, limits: BodyLimits) -> list[Upload]:
    """The uploads of an /embed request, each with its header read; Refusal for any request the service
    refuses, ClientGone when the client left before its body was complete."""
    headers = _headers(scope)
    content_type = headers.get(b"content-type", b"").decode("latin-1").strip()
    declared = headers.get(b"content-length", b"").decode("latin-1")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise limits.too_large(f"of {int(declared):,} bytes")
    media_type, options = parse_options_header(content_type)
    media = media_type.decode("latin-1").lower()
    if media == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            if not (await _read_all(receive, limits)).strip():
                raise limits.empty()
            raise _malformed("its Content-Type names no boundary")
        return await _read_multipart(receive, boundary, limits)
    if media in RAW_IMAGE_TYPES:
        body = await _read_all(receive, limits)
        if not body:
            raise limits.empty()
        upload = Upload(_raw_name(scope), body)
        upload.open(limits.max_pixels)
        return [upload]
    body = await _read_all(receive, limits)  # an empty body says "empty" whatever its type, as it always did
    if not body.strip():
        raise limits.empty()
    raise limits.wrong_type(content_type)


class BodyTooLarge(Exception):
    """More than the limit of body bytes arrived."""


async def body_chunks(receive: Any, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive: ClientGone when the client disconnects first, BodyTooLarge
    as soon as more than `max_bytes` have arrived (nothing beyond them is read)."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge
        yield chunk
        if not message.get("more_body", False):
            return


async def _read_multipart(receive: Any, boundary: bytes, limits: BodyLimits) -> list[Upload]:
    try:
        reader = _MultipartReader(boundary, limits)
    except FormParserError as exc:  # e.g. a boundary over python-multipart's 256 bytes
        raise _malformed(f"its boundary cannot be used ({exc})") from None
    blank = True
    try:
        async for chunk in body_chunks(receive, limits.max_bytes):
            blank = blank and not chunk.strip()
            try:
                reader.parser.write(chunk)
            except FormParserError as exc:
                if blank:
                    raise limits.empty() from None
                raise _malformed(f"the body does not follow the multipart format of its boundary ({exc})") from None
    except BodyTooLarge:
        raise limits.too_large(f"of more than {limits.max_bytes:,} bytes") from None
    if blank:
        raise limits.empty()
    if not reader.ended:
        raise _malformed("the body ended before its closing boundary")
    if not reader.uploads:
        raise limits.empty()
    return reader.uploads


async def _read_all(receive: Any, limits: BodyLimits) -> bytes:
    try:
        return b"".join([chunk async for chunk in body_chunks(receive, limits.max_bytes)])
    except BodyTooLarge:
        raise limits.too_large(f"of more than {limits.max_bytes:,} bytes") from None


def _malformed(detail: str) -> Refusal:
    return Refusal(400, "malformed", f"malformed multipart/form-data body: {detail}")


def _headers(scope: dict) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", ())}


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _file_name(name: str) -> str:
    """The client's file name without any folder part (or 'upload')."""
    return PurePosixPath(name.replace("\\", "/")).name or "upload"


def _raw_name(scope: dict) -> str:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return _file_name(query.get("filename", [""])[0])
