"""`tsimcne embed --engine ray`: the same rows as one process, from a real local Ray (started once here).

The Ray job runs in this process (what the CLI calls) so that Ray starts once for the module; the
one-process side is the real CLI in a subprocess, writing the same Parquet schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.harness.cli import run_cli
from training.synthetic import make_synthetic_cells
from tsimcne_core.errors import UserError
from tsimcne_map.archive import list_images
from tsimcne_map.placement_table import FIELDS, placement_schema
from tsimcne_map.ray_cluster import MISSING_RAY, import_ray, plan_actors

BATCH = 8  # three chunks of the 22 files below, the last one short


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start is the slow part): 2 CPUs, as on a CI machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """20 real PNGs (20 px, so they are resized to the bundle's 16), one of them twice (a duplicate in
    the same batch), a truncated PNG and a text file named .png."""
    root = tmp_path_factory.mktemp("archive")
    images, _, _ = make_synthetic_cells(20, (20, 20), seed=11)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"cell{i:02d}.png")
    Image.fromarray(images[3]).save(root / "cell03_again.png")
    (root / "cell05_truncated.png").write_bytes((root / "cell05.png").read_bytes()[:60])
    (root / "notes.png").write_text("not an image")
    return root


def _sorted_rows(path: Path) -> list[dict]:
    table = pq.read_table(path)
    assert table.schema.equals(placement_schema()), table.schema
    return sorted(table.to_pylist(), key=lambda row: row["index"])


def test_ray_rows_equal_one_process(local_ray, service_bundle, archive, tmp_path):
    from tsimcne_map.ray_embed import embed_on_ray

    bundle, _ = service_bundle
    local = tmp_path / "local.parquet"
    result = run_cli(
        "embed", str(bundle), str(archive), "--out", str(local), "--provider", "cpu", "--batch-size", str(BATCH)
    )
    assert result.returncode == 0, result.stderr

    files = list_images([archive])
    out = tmp_path / "ray-out"
    out.mkdir()
    (out / "old.parquet").write_text("an earlier result, replaced as a whole")
    summary = embed_on_ray(bundle, files, out, provider="cpu", batch_size=BATCH)
    assert (summary.images, summary.unreadable) == (23, 2)
    assert summary.shards >= 1 and not (out / "old.parquet").exists()
    assert not list(tmp_path.glob(".ray-out.*"))  # neither the staging folder nor the old one is left

    ours, theirs = _sorted_rows(out), _sorted_rows(local)
    assert [row["index"] for row in ours] == list(range(23))
    limit = 1e-4 * max(1.0, max(abs(row["x"]) + abs(row["y"]) for row in theirs if not row["error"]))
    for mine, other in zip(ours, theirs, strict=True):
        assert mine["id"] == other["id"]
        assert mine["error"] == other["error"], mine["id"]
        if other["error"]:
            assert mine["x"] is None and mine["flag"] is None
            continue
        assert abs(mine["x"] - other["x"]) <= limit and abs(mine["y"] - other["y"]) <= limit, mine["id"]
        for field in ("flag", "majority_label", "neighbour_ids", "neighbour_labels", "duplicate_of"):
            assert mine[field] == other[field], (mine["id"], field)
        assert mine["score"] == pytest.approx(other["score"], rel=1e-4, abs=1e-5)

    by_name = {Path(row["id"]).name: row for row in ours}
    assert "cell05_truncated.png" in by_name["cell05_truncated.png"]["error"]
    assert "notes.png" in by_name["notes.png"]["error"]
    assert by_name["cell03_again.png"]["duplicate_of"].endswith("cell03.png")  # the same image, same batch


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the [cluster] extra sees
    with pytest.raises(UserError) as raised:
        import_ray()
    assert str(raised.value) == MISSING_RAY and "[cluster]" in MISSING_RAY


def test_cli_ray_needs_an_output_folder(service_bundle, archive):
    bundle, _ = service_bundle
    result = run_cli("embed", str(bundle), str(archive), "--engine", "ray")
    assert result.returncode == 2 and "--out DIR" in result.stderr
    result = run_cli("embed", str(bundle), str(archive), "--engine", "spark", "--out", "x")
    assert result.returncode == 2 and "--engine 'spark'" in result.stderr


def test_actor_plans_for_cpus_and_gpus():
    one_core = plan_actors("auto", {"CPU": 1.0}, onnxruntime_has_cuda=False)
    # fractional requests: the writing task runs beside the one actor, which decodes its own chunks
    assert (one_core.actor_cpus, one_core.write_cpus, one_core.max_actors) == (0.5, 0.5, 1)
    assert not one_core.separate_decoding
    eight = plan_actors("auto", {"CPU": 8.0, "GPU": 2.0}, onnxruntime_has_cuda=False)  # no onnxruntime-gpu
    assert (eight.provider, eight.actor_gpus, eight.min_actors, eight.max_actors) == ("cpu", 0.0, 1, 7)
    gpus = plan_actors("auto", {"CPU": 32.0, "GPU": 4.0}, onnxruntime_has_cuda=True)
    assert (gpus.provider, gpus.actor_gpus, gpus.min_actors, gpus.max_actors) == ("cuda", 1.0, 4, 4)
    assert gpus.separate_decoding and gpus.threads == 1
    halves = plan_actors("cuda", {"CPU": 32.0, "GPU": 4.0}, onnxruntime_has_cuda=True, gpus_per_actor=0.5)
    assert (halves.actor_gpus, halves.max_actors) == (0.5, 8)
    assert plan_actors("cpu", {"CPU": 32.0, "GPU": 4.0}, onnxruntime_has_cuda=True).provider == "cpu"
    assert plan_actors("cpu", {"CPU": 32.0}, False, actors=3, cpus_per_actor=4).threads == 4
    with pytest.raises(UserError, match="has none"):
        plan_actors("cuda", {"CPU": 4.0}, onnxruntime_has_cuda=False)


def test_listing_reads_csv_and_file_lists(archive, tmp_path):
    (tmp_path / "manifest.csv").write_text(f"path,label\n{archive}/cell01.png,a\n{archive}/cell00.png,b\n")
    (tmp_path / "files.txt").write_text(f"# two files\n{archive}/cell02.png\n\n{archive.name}-missing.png\n")
    listed = list_images([tmp_path / "manifest.csv", tmp_path / "files.txt", archive / "cell09.png"])
    names = [p.name for p in listed]
    assert names == ["cell01.png", "cell00.png", "cell02.png", f"{archive.name}-missing.png", "cell09.png"]
    assert len(list_images([archive])) == 23 and [name for name, _, _ in FIELDS][:2] == ["index", "id"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(UserError, match="'path' column"):
        list_images([tmp_path / "bad.csv"])
    assert np.all([p.is_absolute() for p in listed])


def test_a_failed_ray_job_is_one_line_naming_the_cause():
    from tsimcne_map.ray_embed import _job_failure

    raised = RuntimeError(
        "Traceback (most recent call last):\n  File 'x.py'\nBundleError: model.onnx: sha256 mismatch\n"
    )
    message = _job_failure(raised)
    assert message.startswith("the Ray job failed (RuntimeError): BundleError: model.onnx: sha256 mismatch")
    assert "\n" not in message and "/tmp/ray/session_latest/logs" in message
