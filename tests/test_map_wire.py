"""The wire forms of GET /map (serving/map_wire.py): the binary block read back exactly, the JSON form
still the MapResponse schema, streamed JSON equal to the kept one, and bad blocks named as such."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from serving.api_models import MapResponse
from serving.map_route import accepts_gzip
from serving.map_wire import (
    MAGIC,
    UNLABELLED,
    MapFormatError,
    MapOnTheWire,
    decode_binary,
    encode_binary,
    encode_ids,
)

CLASSES = ["basophil", "eosinophil", "lymphocyte"]


def _map(n: int, seed: int = 0, ids: list[str] | None = None) -> MapOnTheWire:
    rng = np.random.default_rng(seed)
    coords = (rng.normal(size=(n, 2)) * 30).astype(np.float32)
    labels = rng.integers(-1, len(CLASSES), n)
    ids_array = np.array(
        ids if ids is not None else [f"{CLASSES[max(k, 0)]}/{i:06d}.png" for i, k in enumerate(labels)]
    )
    return MapOnTheWire("pbc", CLASSES, coords, labels, ids_array)


def test_binary_round_trip_is_exact() -> None:
    ids = ["basophil/BA_1.jpg", "éosinophile/ß 2.png", "", "x" * 300, "7", "a\0b", "🩸/cell.tif"]
    the_map = _map(len(ids), ids=ids)
    block = the_map.binary()
    assert block[:8] == MAGIC and len(block) % 8 == 0
    back = decode_binary(block)
    assert back["bundle"] == "pbc" and back["class_names"] == CLASSES and back["count"] == len(ids)
    assert np.array_equal(back["x"], the_map.coords[:, 0]) and np.array_equal(back["y"], the_map.coords[:, 1])
    assert back["labels"].tolist() == the_map.labels.tolist()  # -1 (unlabelled) survives as 65535 and back
    assert back["ids"] == ids
    x, y = the_map.coords[:, 0], the_map.coords[:, 1]
    assert back["bounds"] == [float(x.min()), float(y.min()), float(x.max()), float(y.max())]
    assert gzip.decompress(the_map.binary_gzip()) == block


def test_sections_are_aligned_little_endian_typed_arrays() -> None:
    """What the page relies on: Float32Array/Uint16Array/Uint32Array views straight onto the block."""
    the_map = _map(1001, seed=1)
    block = the_map.binary()
    _, version, header_length = struct.unpack_from("<8sII", block)
    header = json.loads(block[16 : 16 + header_length])
    assert version == 1 and header["size"] == len(block)
    sections = {s["name"]: s for s in header["sections"]}
    assert [s["name"] for s in header["sections"]] == ["x", "y", "labels", "id_offsets", "ids"]
    assert all(s["offset"] % 8 == 0 for s in header["sections"])
    labels = np.frombuffer(block, "<u2", 1001, sections["labels"]["offset"])
    assert (labels == UNLABELLED).sum() == (the_map.labels == -1).sum()
    y = np.frombuffer(block, "<f4", 1001, sections["y"]["offset"])
    assert np.array_equal(y, the_map.coords[:, 1])
    offsets = np.frombuffer(block, "<u4", 1002, sections["id_offsets"]["offset"])
    start = sections["ids"]["offset"]
    assert block[start + offsets[500] : start + offsets[501]].decode() == the_map.ids[500]


@pytest.mark.parametrize("n", [0, 1, 5, 70_000])
def test_json_is_the_map_response_schema_for_any_size(n: int, monkeypatch) -> None:
    """Small maps keep their JSON; large ones stream it in pieces: the same document either way."""
    import serving.map_wire as map_format

    the_map = _map(n, seed=2)
    kept = the_map.json()
    parsed = MapResponse.model_validate_json(kept)
    assert parsed.x == the_map.coords[:, 0].tolist() and parsed.labels == the_map.labels.tolist()
    assert parsed.ids == the_map.ids.tolist() and parsed.class_names == CLASSES
    # The JSON of the previous /map (pydantic's) and this one parse to the same values.
    old = MapResponse(
        bundle="pbc",
        class_names=CLASSES,
        x=the_map.coords[:, 0].tolist(),
        y=the_map.coords[:, 1].tolist(),
        labels=the_map.labels.tolist(),
        ids=the_map.ids.tolist(),
    )
    assert json.loads(kept) == json.loads(old.model_dump_json())
    monkeypatch.setattr(map_format, "JSON_CACHE_POINTS", 0)
    assert b"".join(the_map.json_chunks()) == kept
    assert gzip.decompress(b"".join(the_map.json_gzip_chunks())) == kept


def test_a_one_dimensional_map_and_bytes_ids() -> None:
    the_map = MapOnTheWire(
        "line", ["a"], np.array([[1.5], [2.5]], np.float32), np.array([0, -1]), np.array([b"p", b"q"])
    )
    back = decode_binary(the_map.binary())
    assert back["y"].tolist() == [0.0, 0.0] and back["ids"] == ["p", "q"]
    assert json.loads(the_map.json())["y"] == [0.0, 0.0]


def test_ascii_and_non_ascii_ids_encode_alike() -> None:
    ascii_ids = np.array([f"lymphocyte/LY_{i}.jpg#{i % 9}" for i in range(3000)])
    offsets, blob = encode_ids(ascii_ids)
    assert [blob[offsets[i] : offsets[i + 1]].decode() for i in range(3000)] == ascii_ids.tolist()
    mixed = np.array(["ä", "bb", ""])
    offsets, blob = encode_ids(mixed)
    assert offsets.tolist() == [0, 2, 4, 4] and blob == "äbb".encode()


def test_bad_blocks_and_unencodable_maps_are_named() -> None:
    block = _map(1000).binary()
    with pytest.raises(MapFormatError, match="not a binary map"):
        decode_binary(b"{" + block[1:])
    with pytest.raises(MapFormatError, match="version 9"):
        decode_binary(block[:8] + struct.pack("<I", 9) + block[12:])
    with pytest.raises(MapFormatError, match="outside"):
        decode_binary(block[: len(block) - 100])
    with pytest.raises(MapFormatError, match="runs past"):
        decode_binary(block[:100])
    with pytest.raises(MapFormatError, match="too short"):
        decode_binary(b"TSMAP")
    with pytest.raises(MapFormatError, match="labels must lie in"):
        encode_binary("b", ["a"], np.zeros((2, 2)), np.array([0, 3]), ["p", "q"])
    with pytest.raises(MapFormatError, match="at most 65,534"):
        encode_binary("b", [str(i) for i in range(70_000)], np.zeros((1, 2)), np.array([0]), ["p"])
    with pytest.raises(MapFormatError, match="differ in length"):
        encode_binary("b", ["a"], np.zeros((2, 2)), np.array([0]), ["p", "q"])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip, deflate, br, zstd", True),
        ("identity", False),
        ("", False),
        ("GZIP;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0, deflate", False),
        ("*", True),
        ("gzip;q=abc", False),
    ],
)
def test_accept_encoding(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected
