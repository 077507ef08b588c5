"""The reference map on the wire: GET /map as JSON (the original form) or as one binary block.

Why a binary form: JSON costs ~70-110 bytes per point and the browser must parse every number; the
binary form is 18 bytes per point plus the ids (x and y as float32, the label as uint16, an offset
into the UTF-8 ids), and the page reads it as typed arrays without parsing anything. A 1,000,000-point
map (PBC ids) is a 40 MB block, 13 MB gzip-compressed (benchmarks/README.md section 12).

Binary layout (version 1, all numbers little-endian):

    bytes 0-7    magic b"TSMAPBIN"
    bytes 8-11   uint32 format version (1)
    bytes 12-15  uint32 H: length of the header
    bytes 16-    H bytes of UTF-8 JSON header, padded with spaces so that the first section starts at a
                 multiple of 8
    sections     at the offsets the header gives (from the start of the block, each a multiple of 8):
                 x float32[count], y float32[count], labels uint16[count] (index into class_names;
                 65535 = unlabelled), id_offsets uint32[count + 1], ids uint8[id_offsets[count]]
                 (id i is the UTF-8 bytes id_offsets[i] .. id_offsets[i + 1])

The header holds "bundle", "class_names", "count", "bounds" ([min x, min y, max x, max y]; null for
an empty map), "size" (bytes of the whole block) and "sections" ([{"name", "type", "offset", "length"
(elements)}]). `decode_binary` reads it back. numpy only (no torch, no web framework).
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"TSMAPBIN"
VERSION = 1
MEDIA_TYPE = "application/vnd.tsimcne.map"
UNLABELLED = 0xFFFF
_PREFIX = struct.Struct("<8sII")
_ALIGN = 8
# Points per JSON chunk when a large map's JSON is streamed instead of held in memory.
_JSON_CHUNK = 65_536
# Maps up to this many points keep their JSON in memory once made (~7 MB at 100,000 points); larger
# maps stream it from the arrays on each request, so a 10,000,000-point map does not hold ~1 GB of it.
JSON_CACHE_POINTS = 200_000
# gzip level 1: floats hardly compress at any level; ids and labels compress ~6x at level 1 already.
GZIP_LEVEL = 1
_SECTION_TYPES = {"float32": "<f4", "uint16": "<u2", "uint32": "<u4", "utf8": "u1"}


class MapFormatError(ValueError):
    """A binary map block that cannot be read, or a map that cannot be written in this format."""


def _padding(length: int) -> int:
    return -length % _ALIGN


def _utf8_rows(ids: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(byte length of each id, their UTF-8 bytes joined) for a slice of ids."""
    if ids.dtype.kind == "U" and len(ids):
        # UCS-4 code points; when all are ASCII (file names, numbers: the usual case) they are the UTF-8
        # bytes themselves, taken without a Python loop.
        width = ids.dtype.itemsize // 4
        codes = ids.view(np.uint32).reshape(len(ids), width)
        if width and int(codes.max()) < 128:
            lengths = np.char.str_len(ids)
            joined = codes.astype(np.uint8).tobytes().replace(b"\0", b"")  # drops the padding
            if len(joined) == int(lengths.sum()):  # (not so when an id holds a NUL character itself)
                return lengths, joined
    encoded = [str(i).encode("utf-8") for i in ids]
    return np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), b"".join(encoded)


def encode_ids(ids: np.ndarray | list[str]) -> tuple[np.ndarray, bytes]:
    """(uint32 offsets of length n + 1, the UTF-8 bytes of all ids one after the other)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "US":
        ids = ids.astype(str)
    if ids.dtype.kind == "S":
        ids = ids.astype(str)  # bytes ids are read as text, like the JSON form's str(id)
    lengths, blobs = [], []
    for start in range(0, len(ids), 1_000_000):  # bounds the temporary fixed-width copy
        part_lengths, part = _utf8_rows(ids[start : start + 1_000_000])
        lengths.append(part_lengths)
        blobs.append(part)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.uint32).max:
        raise MapFormatError(f"the ids take {offsets[-1]:,} bytes; the binary map holds at most 4 GiB of ids")
    return offsets.astype("<u4"), b"".join(blobs)


def encode_labels(labels: np.ndarray, class_count: int) -> np.ndarray:
    """Label indices (-1 = unlabelled) as uint16 with 65535 for unlabelled."""
    if class_count >= UNLABELLED:
        raise MapFormatError(f"{class_count:,} classes; the binary map holds at most {UNLABELLED - 1:,}")
    labels = np.asarray(labels)
    if len(labels) and (labels.max(initial=-1) >= class_count or labels.min(initial=0) < -1):
        raise MapFormatError(f"labels must lie in -1 .. {class_count - 1} (index into class_names)")
    return np.where(labels < 0, UNLABELLED, labels).astype("<u2")


def encode_binary(
    bundle: str, class_names: list[str], coords: np.ndarray, labels: np.ndarray, ids: np.ndarray | list[str]
) -> bytes:
    """The binary block of a map: `coords` (N, 1 or 2), `labels` (N, -1 = unlabelled), `ids` (N)."""
    coords = np.asarray(coords, dtype=np.float32)
    count = len(coords)
    if len(labels) != count or len(ids) != count:
        raise MapFormatError(f"coords, labels and ids differ in length ({count}, {len(labels)}, {len(ids)})")
    x = coords[:, 0] if count else np.zeros(0, np.float32)
    y = coords[:, 1] if count and coords.shape[1] > 1 else np.zeros(count, np.float32)
    id_offsets, id_bytes = encode_ids(ids)
    arrays: list[tuple[str, str, Any, int]] = [
        ("x", "float32", np.ascontiguousarray(x, dtype="<f4"), count),
        ("y", "float32", np.ascontiguousarray(y, dtype="<f4"), count),
        ("labels", "uint16", encode_labels(labels, len(class_names)), count),
        ("id_offsets", "uint32", id_offsets, count + 1),
        ("ids", "utf8", id_bytes, len(id_bytes)),
    ]
    bounds = (
        [float(x.min()), float(y.min()), float(x.max()), float(y.max())] if count else None
    )  # saves the page a pass over the points
    sections: list[dict[str, Any]] = []

    def header_bytes(first_offset: int) -> bytes:
        offset = first_offset
        sections.clear()
        for name, kind, data, length in arrays:
            sections.append({"name": name, "type": kind, "offset": offset, "length": length})
            size = data.nbytes if isinstance(data, np.ndarray) else len(data)
            offset += size + _padding(size)
        header = {
            "bundle": bundle,
            "class_names": list(class_names),
            "count": count,
            "bounds": bounds,
            "size": offset,
            "sections": sections,
        }
        return json.dumps(header, separators=(",", ":")).encode("utf-8")

    # The header states the offsets, which depend on the header's own length: settle it (two rounds
    # suffice unless a digit is added, hence the loop).
    first = _PREFIX.size
    while True:
        header = header_bytes(first)
        needed = _PREFIX.size + len(header) + _padding(_PREFIX.size + len(header))
        if needed == first:
            break
        first = needed
    header += b" " * _padding(_PREFIX.size + len(header))
    parts = [_PREFIX.pack(MAGIC, VERSION, len(header)), header]
    for _, _, data, _ in arrays:
        raw = data.tobytes() if isinstance(data, np.ndarray) else data
        parts += [raw, b"\0" * _padding(len(raw))]
    block = b"".join(parts)
    assert len(block) == sections[-1]["offset"] + len(id_bytes) + _padding(len(id_bytes))
    return block


def decode_binary(block: bytes | memoryview) -> dict[str, Any]:
    """A binary map block -> {"bundle", "class_names", "count", "bounds", "x", "y", "labels" (int64,
    -1 = unlabelled), "ids" (list of str)}; MapFormatError naming what is wrong otherwise."""
    block = memoryview(block)
    if len(block) < _PREFIX.size:
        raise MapFormatError(f"{len(block)} bytes: too short for a binary map")
    magic, version, header_length = _PREFIX.unpack_from(block)
    if magic != MAGIC:
        raise MapFormatError(f"not a binary map (starts with {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise MapFormatError(f"binary map version {version} (this reader knows version {VERSION})")
    if _PREFIX.size + header_length > len(block):
        raise MapFormatError(f"binary map header ({header_length} bytes) runs past the {len(block)}-byte block")
    try:
        header = json.loads(bytes(block[_PREFIX.size : _PREFIX.size + header_length]))
        count = int(header["count"])
        sections = {s["name"]: s for s in header["sections"]}
        arrays = {}
        for name in ("x", "y", "labels", "id_offsets", "ids"):
            section = sections[name]
            dtype = np.dtype(_SECTION_TYPES[section["type"]])
            start, length = int(section["offset"]), int(section["length"])
            end = start + length * dtype.itemsize
            if start % _ALIGN or end > len(block):
                raise MapFormatError(
                    f"section {name!r} (bytes {start}..{end}) lies outside the {len(block)}-byte block (truncated?)"
                )
            arrays[name] = np.frombuffer(block[start:end], dtype=dtype)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MapFormatError):
            raise
        raise MapFormatError(f"binary map header unreadable: {exc}") from exc
    offsets = arrays["id_offsets"].astype(np.int64)
    if len(offsets) != count + 1 or (count and offsets[-1] > len(arrays["ids"])):
        raise MapFormatError("binary map: id_offsets do not match the ids")
    id_bytes = arrays["ids"].tobytes()
    labels = arrays["labels"].astype(np.int64)
    labels[labels == UNLABELLED] = -1
    return {
        "bundle": header["bundle"],
        "class_names": header["class_names"],
        "count": count,
        "bounds": header["bounds"],
        "x": arrays["x"].astype(np.float32),
        "y": arrays["y"].astype(np.float32),
        "labels": labels,
        "ids": [id_bytes[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(count)],
    }


def gzip_bytes(data: bytes, level: int = GZIP_LEVEL) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    return compressor.compress(data) + compressor.flush()


def _json_list(values: list[Any]) -> bytes:
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode("utf-8")[1:-1]


@dataclass
class MapOnTheWire:
    """A bundle's reference map as GET /map sends it, held once per worker, its wire forms made once and kept.

    The arrays are the placer's own (no copies). The binary form and its gzip are kept once made
    (`prepare` makes them at start-up); the JSON is kept for maps up to JSON_CACHE_POINTS points and
    streamed from the arrays for larger ones.
    """

    bundle: str
    class_names: list[str]
    coords: np.ndarray  # (N, 2) float32 (a 1-D map has one column)
    labels: np.ndarray  # (N,) index into class_names, -1 = unlabelled
    ids: np.ndarray  # (N,) str
    _cache: dict[str, bytes] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __len__(self) -> int:
        return len(self.coords)

    def _cached(self, key: str, make: Any) -> bytes:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    def binary(self) -> bytes:
        return self._cached("binary", lambda: encode_binary(self.bundle, self.class_names, *self._arrays()))

    def binary_gzip(self) -> bytes:
        return self._cached("binary.gz", lambda: gzip_bytes(self.binary()))

    def prepare(self) -> None:
        """Make the binary form and its gzip now (at start-up), not on the page's first request."""
        self.binary_gzip()

    def json_cacheable(self) -> bool:
        return len(self) <= JSON_CACHE_POINTS

    def json(self) -> bytes:
        """The whole JSON form (kept for small maps)."""
        if not self.json_cacheable():
            return b"".join(self.json_chunks())
        return self._cached("json", lambda: b"".join(self.json_chunks()))

    def json_gzip(self) -> bytes:
        return self._cached("json.gz", lambda: gzip_bytes(self.json()))

    def json_chunks(self) -> Iterator[bytes]:
        """The JSON form ({"bundle", "class_names", "x", "y", "labels", "ids"}: api_models.MapResponse)
        in pieces of at most _JSON_CHUNK points, so a large map is never held as one string."""
        coords, labels, ids = self._arrays()
        count = len(coords)
        x = coords[:, 0] if count else np.zeros(0, np.float32)
        y = coords[:, 1] if count and coords.shape[1] > 1 else np.zeros(count, np.float32)
        yield b'{"bundle":' + json.dumps(self.bundle, ensure_ascii=False).encode("utf-8")
        yield b',"class_names":' + json.dumps(list(self.class_names), ensure_ascii=False).encode("utf-8")
        columns: list[tuple[bytes, Any]] = [
            (b"x", lambda a, b: x[a:b].astype(np.float64).tolist()),
            (b"y", lambda a, b: y[a:b].astype(np.float64).tolist()),
            (b"labels", lambda a, b: np.asarray(labels[a:b], dtype=np.int64).tolist()),
            (b"ids", lambda a, b: [str(i) for i in ids[a:b]]),
        ]
        for name, values in columns:
            yield b',"' + name + b'":['
            for start in range(0, count, _JSON_CHUNK):
                yield (b"," if start else b"") + _json_list(values(start, start + _JSON_CHUNK))
            yield b"]"
        yield b"}"

    def json_gzip_chunks(self) -> Iterator[bytes]:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        for chunk in self.json_chunks():
            compressed = compressor.compress(chunk)
            if compressed:
                yield compressed
        yield compressor.flush()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = np.asarray(self.coords, dtype=np.float32)
        if coords.ndim == 1:
            coords = coords[:, None]
        return coords, np.asarray(self.labels), np.asarray(self.ids)
