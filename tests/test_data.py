"""Dataset readers on real files: folders, npz, CSV manifests, synthetic data, and their bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import parse_size
from training.datasets import load_dataset
from tsimcne_core.errors import DataError


def test_class_folder(class_folder: Path, synthetic_arrays) -> None:
    dataset = load_dataset(class_folder)
    assert dataset.images.shape == (60, 24, 24, 3) and dataset.images.dtype == np.uint8
    assert dataset.class_names == sorted(p.name for p in class_folder.iterdir())
    assert dataset.labels is not None and set(dataset.labels) <= set(range(len(dataset.class_names)))
    first = dataset.ids[0]
    np.testing.assert_array_equal(dataset.images[0], np.asarray(Image.open(class_folder / first).convert("RGB")))


def test_flat_folder_has_no_labels(tmp_path: Path, synthetic_arrays) -> None:
    images, _, _ = synthetic_arrays
    for i in range(5):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    dataset = load_dataset(tmp_path, size=(16, 16))
    assert dataset.labels is None and dataset.images.shape == (5, 16, 16, 3)


def test_npz_plain_and_official_layouts(tmp_path: Path, synthetic_arrays) -> None:
    images, labels, names = synthetic_arrays
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=images, labels=labels[:, None], class_names=np.array(names))
    dataset = load_dataset(plain)
    assert len(dataset) == 240 and dataset.class_names == list(names)
    np.testing.assert_array_equal(dataset.labels, labels)

    official = tmp_path / "official.npz"
    np.savez(
        official,
        train_images=images[:100, :, :, 0],  # grayscale, as some MedMNIST sets are
        train_labels=labels[:100, None],
        val_images=images[100:120, :, :, 0],
        val_labels=labels[100:120, None],
        test_images=images[120:, :, :, 0],
        test_labels=labels[120:, None],
    )
    dataset = load_dataset(official)
    assert dataset.images.shape == (240, 24, 24, 3)
    assert dataset.ids[0] == "train/0" and dataset.ids[100] == "test/0" and dataset.ids[-1] == "val/19"


def test_npz_length_mismatch_is_named(tmp_path: Path, synthetic_arrays) -> None:
    images, labels, _ = synthetic_arrays
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=labels[:10])
    with pytest.raises(DataError, match=r"240 images but 'labels' has 10"):
        load_dataset(path)


def test_csv_manifest_with_string_labels(tmp_path: Path, class_folder: Path) -> None:
    files = sorted(class_folder.rglob("*.png"))[:12]
    manifest = tmp_path / "list.csv"
    lines = ["path,label"] + [f"{f.relative_to(tmp_path)},{f.parent.name}" for f in files]
    manifest.write_text("\n".join(lines) + "\n")
    dataset = load_dataset(manifest)
    assert len(dataset) == 12 and dataset.class_names == sorted({f.parent.name for f in files})


def test_csv_missing_path_column(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("file_name_is_wrong,label\na.png,1\n")
    with pytest.raises(DataError, match="needs a 'path' column"):
        load_dataset(manifest)


def test_corrupt_image_named_or_skipped(class_folder: Path) -> None:
    bad = class_folder / "lymphoid" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DataError, match=r"broken\.png.*--skip-bad"):
        load_dataset(class_folder)
    dataset = load_dataset(class_folder, skip_bad=True)
    assert len(dataset) == 60 and len(dataset.skipped) == 1 and "broken.png" in dataset.skipped[0]


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images found"):
        load_dataset(tmp_path)


def test_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, size=(16, 16)).images.shape == (2, 16, 16, 3)


def test_smaller_images_refused_unless_allowed(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png.*smaller than the training size 32x32"):
        load_dataset(tmp_path, size=(32, 32))
    assert load_dataset(tmp_path, size=(32, 32), allow_upscale=True).size == (32, 32)


def test_non_square_size_is_height_by_width(tmp_path: Path) -> None:
    Image.new("RGB", (80, 60)).save(tmp_path / "wide.png")  # PIL size is (W, H)
    dataset = load_dataset(tmp_path, size=parse_size("30x40"))
    assert dataset.images.shape == (1, 30, 40, 3)


def test_parse_size_errors() -> None:
    assert parse_size("28") == (28, 28) and parse_size("64x48") == (64, 48)
    with pytest.raises(DataError, match="HxW"):
        parse_size("big")
    with pytest.raises(DataError, match=">= 8"):
        parse_size("4")


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.npz")
    other = tmp_path / "x.txt"
    other.write_text("hi")
    with pytest.raises(DataError, match="unsupported data source"):
        load_dataset(other)


def test_synthetic_spec() -> None:
    dataset = load_dataset("synthetic:30", size=(16, 16))
    assert dataset.images.shape == (30, 16, 16, 3) and len(dataset.class_names) == 6
    with pytest.raises(DataError, match="synthetic:N"):
        load_dataset("synthetic:many")


def test_real_blood_cell_jpegs(pbc_jpg_folder: Path) -> None:
    dataset = load_dataset(pbc_jpg_folder, size=(28, 28))
    assert dataset.images.shape == (320, 28, 28, 3)
    assert dataset.class_names[0] == "basophil" and np.bincount(dataset.labels).tolist() == [40] * 8


def test_real_pbc_npz(pbc_npz: Path) -> None:
    dataset = load_dataset(pbc_npz)
    assert dataset.images.shape == (17092, 28, 28, 3) and len(dataset.class_names) == 8
    assert dataset.ids[0].endswith(".jpg")


def test_exif_orientation_is_honoured_in_training_data(tmp_path: Path) -> None:
    """Training reads files through tsimcne_core/images.py, as the service does: a JPEG stored sideways with
    orientation 6 is trained on upright, with the pixels the service places for the same file."""
    from benchmarks.harness.attack_files import stored_pixels, with_orientation
    from tsimcne_core.images import decode_image

    upright = np.random.default_rng(2).integers(0, 256, size=(24, 16, 3), dtype=np.uint8)
    sideways = with_orientation(np.ascontiguousarray(np.rot90(upright, 1)), 6)
    (tmp_path / "sideways.jpg").write_bytes(sideways)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored_pixels(sideways), -1))).save(tmp_path / "turned.png")
    dataset = load_dataset(tmp_path)
    assert dataset.images.shape == (2, 24, 16, 3)  # both upright: one size, no --image-size needed
    by_id = dict(zip(dataset.ids, dataset.images, strict=True))
    np.testing.assert_array_equal(by_id["sideways.jpg"], by_id["turned.png"])
    np.testing.assert_array_equal(by_id["sideways.jpg"], decode_image(sideways, "sideways.jpg"))
