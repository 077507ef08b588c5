"""`tsimcne prepare` and the on-disk store: same pixels as the readers, atomic, bounded reads, the
in-memory size rule, and training from a store equal to training from memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.harness.cli import run_cli
from training.augment import mean_border_colour
from training.chunks import FileRows, NpyRowWriter, gather_rows, iter_chunks, read_rows
from training.data import MAX_IN_MEMORY_ENV
from training.datasets import load_dataset
from training.image_store import META_FILE, open_store, prepare_store
from tsimcne_core.errors import DataError


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_prepare_folder_gives_the_readers_pixels_memory_mapped(class_folder: Path, tmp_path: Path) -> None:
    result = run_cli("prepare", str(class_folder), "--image-size", "16", "--out", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert "60 images of 16x16" in result.stdout
    store = load_dataset(tmp_path / "store")
    memory = load_dataset(class_folder, size=(16, 16))
    assert isinstance(store.images, np.memmap) and not store.images.flags.writeable
    np.testing.assert_array_equal(np.asarray(store.images), memory.images)
    np.testing.assert_array_equal(store.labels, memory.labels)
    assert store.ids == memory.ids and store.class_names == memory.class_names
    assert store.fingerprint() == memory.fingerprint()  # from meta.json; the same digest as in memory
    meta = json.loads((tmp_path / "store" / META_FILE).read_text())
    assert meta["shape"] == [60, 16, 16, 3] and meta["version"] == 1 and meta["source"] == str(class_folder)
    assert _leftovers(tmp_path) == []


def test_prepare_npz_and_synthetic(tmp_path: Path, synthetic_arrays) -> None:
    images, labels, _ = synthetic_arrays
    np.savez(tmp_path / "split.npz", train_images=images[:50], train_labels=labels[:50],
             test_images=images[50:70, ..., 0], test_labels=labels[50:70])  # fmt: skip
    store = prepare_store(tmp_path / "split.npz", tmp_path / "s1", image_size=16, progress=False)
    assert store.n_images == 70
    from_store, memory = load_dataset(tmp_path / "s1"), load_dataset(tmp_path / "split.npz", size=(16, 16))
    np.testing.assert_array_equal(np.asarray(from_store.images), memory.images)
    assert from_store.ids == memory.ids and from_store.fingerprint() == memory.fingerprint()
    prepare_store("synthetic:30", tmp_path / "s2", image_size=16, progress=False)
    assert load_dataset(tmp_path / "s2").fingerprint() == load_dataset("synthetic:30", size=(16, 16)).fingerprint()


def test_skip_bad_and_atomic_failure(class_folder: Path, tmp_path: Path) -> None:
    broken = sorted(class_folder.iterdir())[0] / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "store"
    with pytest.raises(DataError, match=r"broken\.png.*--skip-bad"):
        prepare_store(class_folder, out, image_size=16, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []  # nothing half-written left behind
    store = prepare_store(class_folder, out, image_size=16, skip_bad=True, progress=False)
    assert store.n_images == 60 and len(store.skipped) == 1 and "broken.png" in store.skipped[0]
    memory = load_dataset(class_folder, size=(16, 16), skip_bad=True)
    opened = load_dataset(out)
    assert opened.images.shape == (60, 16, 16, 3) and opened.fingerprint() == memory.fingerprint()
    assert "broken.png" in opened.skipped[0]
    with pytest.raises(DataError, match="already exists"):
        prepare_store(class_folder, out, image_size=16)


def test_store_refusals(class_folder: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(sorted(class_folder.iterdir())[-1] / "big.png")
    with pytest.raises(DataError, match=r"big\.png: images have different sizes.*--image-size"):
        prepare_store(class_folder, tmp_path / "native", progress=False)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "native").exists()
    prepare_store(class_folder, tmp_path / "store", image_size=16, progress=False)
    with pytest.raises(DataError, match=r"holds images of 16x16, not the 8x8.*tsimcne prepare"):
        load_dataset(tmp_path / "store", size=(8, 8))
    meta = tmp_path / "store" / META_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        load_dataset(tmp_path / "store")
    with (tmp_path / "store" / "images.npy").open("r+b") as handle:
        handle.truncate(1000)
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 1}))
    with pytest.raises(DataError, match="prepare the store again"):
        open_store(tmp_path / "store")


def test_folder_above_the_memory_limit_is_refused_with_the_way_out(
    class_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_IN_MEMORY_ENV, "50K")  # 60 images of 24x24x3 are 101 KiB at native size
    with pytest.raises(DataError) as caught:
        load_dataset(class_folder)
    message = str(caught.value)
    assert "60 images of 24x24 would decode to 101.2 KiB" in message and "limit of 50.0 KiB" in message
    assert "--image-size" in message and "tsimcne prepare" in message
    assert load_dataset(class_folder, size=(16, 16)).images.shape == (60, 16, 16, 3)  # 45 KiB fits
    with pytest.raises(DataError, match=r"would decode to 101\.2 KiB.*choose a smaller --image-size"):
        load_dataset(class_folder, size=(24, 24))


def test_chunked_reads_of_a_store_match_the_array(class_folder: Path, tmp_path: Path) -> None:
    prepare_store(class_folder, tmp_path / "store", image_size=16, progress=False)
    images = load_dataset(tmp_path / "store").images
    whole = np.asarray(images).copy()
    indices = np.array([7, 3, 4, 5, 59, 0, 3])
    np.testing.assert_array_equal(gather_rows(images, indices), whole[indices])
    np.testing.assert_array_equal(read_rows(images, 55, 70), whole[55:])
    pieces = [block for _, block in iter_chunks(images, chunk=7)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert mean_border_colour(images) == mean_border_colour(whole)


def test_rows_written_in_blocks_and_read_back_lazily(tmp_path: Path) -> None:
    """Export writes the projected features a batch at a time and builds its index from rows read on
    demand: both must give exactly the array np.save / np.load would."""
    whole = np.random.default_rng(0).normal(size=(100, 6)).astype(np.float32)
    with NpyRowWriter(tmp_path / "rows.npy", whole.shape, np.float32) as writer:
        for start in range(0, 100, 30):
            writer.write(whole[start : start + 30])
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy"), whole)
    rows = FileRows(np.load(tmp_path / "rows.npy", mmap_mode="r"))
    assert rows.shape == (100, 6) and len(rows) == 100 and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[10:40], whole[10:40])
    np.testing.assert_array_equal(rows[np.array([5, 1, 99, 1])], whole[[5, 1, 99, 1]])
    picked = np.array([90, 3, 50, 7, 8])
    subset = rows.subset(picked)
    assert subset.shape == (5, 6)
    np.testing.assert_array_equal(subset[1:4], whole[picked][1:4])
    np.testing.assert_array_equal(np.asarray(subset.subset(np.array([4, 0]))), whole[[8, 90]])
    np.testing.assert_array_equal(np.asarray(rows), whole)


def test_a_row_writer_refuses_blocks_that_do_not_fit_and_incomplete_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"), NpyRowWriter(tmp_path / "a.npy", (4, 3), np.float32) as w:
        w.write(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="3 rows written of 4"), NpyRowWriter(tmp_path / "b.npy", (4, 3), "f4") as w:
        w.write(np.zeros((3, 3)))


def _train(data: str | Path, run_dir: Path) -> tuple[dict, np.ndarray]:
    from tsimcne_map import TSimCNE

    settings = {"epochs": (2, 1, 1), "batch_size": 16, "image_size": 16, "device": "cpu"}
    model = TSimCNE("tiny", run_dir=run_dir, progress=False, **settings)
    model.fit(str(data))
    state = torch.load(run_dir / "stage3.pt", weights_only=False)
    return state, model.embedding_


def test_training_from_a_store_equals_training_from_memory(class_folder: Path, tmp_path: Path) -> None:
    """The store path streams batches (sorted reads, a prefetch thread); the folder path holds the images
    on the device. Same permutation, same augmentation seeds: the same network, bit for bit."""
    prepare_store(class_folder, tmp_path / "store", image_size=16, progress=False)
    memory_state, memory_map = _train(class_folder, tmp_path / "memory")
    store_state, store_map = _train(tmp_path / "store", tmp_path / "streamed")
    for key, value in memory_state["model"].items():
        torch.testing.assert_close(store_state["model"][key], value, rtol=0, atol=0, msg=key)
    np.testing.assert_array_equal(store_map, memory_map)
    memory_log = (tmp_path / "memory" / "log.jsonl").read_text().splitlines()
    store_log = (tmp_path / "streamed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in store_log] == [json.loads(x)["loss"] for x in memory_log]
    assert store_state["dataset"]["fingerprint"] == memory_state["dataset"]["fingerprint"]


def test_export_maps_another_collection_as_the_reference(class_folder: Path, tmp_path: Path) -> None:
    """Train on one collection, map another (a store at the run's size) as the bundle's reference."""
    from training.checkpoint import load_checkpoint
    from training.embedding import embed_images
    from training.export import reference_dataset
    from training.runs import model_from_state
    from tsimcne_core.bundle_format import open_bundle
    from tsimcne_map import TSimCNE

    run = tmp_path / "runs" / "r"
    TSimCNE("tiny", run_dir=run, progress=False, epochs=(1, 1, 1), image_size=16, device="cpu").fit("synthetic:64")
    prepare_store(class_folder, tmp_path / "archive", image_size=16, progress=False)
    bundle = TSimCNE.load(run).export(tmp_path / "bundle", reference=tmp_path / "archive")
    manifest = open_bundle(bundle.path)
    assert manifest.training["n_images"] == 64
    archive = load_dataset(tmp_path / "archive")
    assert manifest.training["reference"] == {
        "source": str(tmp_path / "archive"), "n_images": 60, "fingerprint": archive.fingerprint()
    }  # fmt: skip
    state = load_checkpoint(run / "stage3.pt")
    with np.load(bundle.path / "reference.npz") as reference:
        assert [str(i) for i in reference["ids"]] == archive.ids
        np.testing.assert_array_equal(reference["thumbnails"], np.asarray(archive.images))
        np.testing.assert_array_equal(reference["labels"], archive.labels)
        coords, _ = embed_images(model_from_state(state), np.asarray(archive.images), torch.device("cpu"))
        np.testing.assert_allclose(reference["coords"], coords, rtol=0, atol=1e-5)
    # a folder is resized to the run's size as training did; a store at another size is refused
    folder = reference_dataset(state, class_folder)
    np.testing.assert_array_equal(folder.images, np.asarray(archive.images))
    prepare_store(class_folder, tmp_path / "small", image_size=12, progress=False)
    result = run_cli("export", str(run), "--out", str(tmp_path / "b2"), "--reference", str(tmp_path / "small"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 12x12 images but the run was trained on 16x16" in result.stderr
    assert "--image-size 16x16" in result.stderr and not (tmp_path / "b2").exists()


def test_streamed_batches_read_ahead_in_order_stop_and_pass_errors_on(class_folder: Path, tmp_path: Path) -> None:
    import threading

    from training.batches import DeviceImages, StreamedImages

    prepare_store(class_folder, tmp_path / "store", image_size=16, progress=False)
    images = load_dataset(tmp_path / "store").images
    streamed, on_device = StreamedImages(images, torch.device("cpu"), 2), DeviceImages(np.asarray(images), "cpu")
    batches = [torch.tensor([5, 1, 9, 1]), torch.tensor([0, 59, 2])] * 4
    for got, want in zip(streamed.iterate(batches), on_device.iterate(batches), strict=True):
        assert torch.equal(got, want) and got.shape[1] == 3  # NCHW, the order asked for
    reading = streamed.iterate(batches)
    next(reading)
    reading.close()  # an epoch stopped early: the read-ahead thread ends
    assert not any(thread.name == "batch-prefetch" for thread in threading.enumerate())
    with pytest.raises(OSError, match="truncated"):
        list(streamed.iterate([torch.tensor([0]), torch.tensor([1000])]))


def test_scale_benchmark_collection_is_real_files_then_a_store(tmp_path: Path, synthetic_arrays) -> None:
    """benchmarks/scale at a small size: N PNG files tiled from a source through the augmentations."""
    from benchmarks.scale.make_collection import make_collection

    images, labels, names = synthetic_arrays
    np.savez(tmp_path / "source.npz", images=images[:20], labels=labels[:20], class_names=np.array(names))
    make_collection(tmp_path / "collection", 30, source=tmp_path / "source.npz")
    files = sorted((tmp_path / "collection").rglob("*.png"))
    assert len(files) == 30
    store = prepare_store(tmp_path / "collection", tmp_path / "store", progress=False)
    assert store.n_images == 30 and store.image_size == (24, 24)
    by_index = {Path(i).stem: row for i, row in zip(load_dataset(tmp_path / "store").ids, range(30), strict=True)}
    pixels = np.asarray(load_dataset(tmp_path / "store").images)
    np.testing.assert_array_equal(pixels[by_index["00000003"]], images[3])  # the first pass: the source itself
    assert not np.array_equal(pixels[by_index["00000023"]], images[3])  # a copy: augmented
