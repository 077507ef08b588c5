"""The service end to end: a real `bentoml serve` on loopback, real image files, real onnxruntime."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from benchmarks.harness.attack_files import planar_tiff, solid_png, stored_pixels, with_orientation
from benchmarks.harness.cli import run_cli
from benchmarks.harness.servers import (
    metric_value,
    run_server_to_exit,
    start_server,
    write_broken_files,
    write_good_images,
)
from tsimcne_core.bundle_format import open_bundle
from tsimcne_core.placing import Placer

pytestmark = pytest.mark.slow
MAX_IMAGES = 8
MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def server(service_bundle, tmp_path_factory):
    bundle, _ = service_bundle
    root = tmp_path_factory.mktemp("server")
    args = {"bundle": str(bundle), "max_images": str(MAX_IMAGES), "max_upload_mb": "1", "max_pixels": str(MAX_PIXELS)}
    running = start_server(root, args, home=root / "bentoml")
    yield running
    running.stop_and_check_log()  # every bad request was answered without an exception


@pytest.fixture(scope="module")
def cell(service_bundle) -> np.ndarray:
    _, data = service_bundle
    return np.asarray(Image.open(next(data.glob("lymphoid/*.png"))).convert("RGB"))


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (path.name, path.read_bytes())) for path in paths]


def test_embed_places_every_image_format(server, cell, tmp_path) -> None:
    paths = write_good_images(tmp_path, cell)
    with server.client() as client:
        response = client.post("/embed", files=_files(paths))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [image["filename"] for image in body["images"]] == [p.name for p in paths]
    for image in body["images"]:
        assert np.isfinite([image["x"], image["y"], image["score"]]).all()
        assert image["flag"] in ("in_distribution", "out_of_distribution", "artefact")
        distances = [n["distance"] for n in image["neighbours"]]
        assert len(distances) == 5 and distances == sorted(distances)
        assert image["majority_label"] in {n["label"] for n in image["neighbours"]}
        assert 0.2 <= image["majority_share"] <= 1.0
    # PNG, 16-bit TIFF and RGBA hold the same pixels, so they land on the same spot.
    xy = {image["filename"]: (image["x"], image["y"]) for image in body["images"]}
    assert np.allclose(xy["cell.png"], xy["cell16.tif"], atol=1e-5)
    assert np.allclose(xy["cell.png"], xy["cell-rgba.png"], atol=1e-5)


def test_training_images_land_on_their_reference_points_and_artefact_flag_follows_neighbours(
    server, service_bundle
) -> None:
    bundle, data = service_bundle
    paths = sorted(data.rglob("*.png"))
    chunks = [paths[i : i + MAX_IMAGES] for i in range(0, len(paths), MAX_IMAGES)]
    with server.client() as client, ThreadPoolExecutor(8) as pool:  # concurrent: batched together
        responses = list(pool.map(lambda chunk: client.post("/embed", files=_files(chunk)), chunks))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    placed = [image for r in responses for image in r.json()["images"]]
    assert len(placed) == len(paths)
    landed_on_itself = 0
    for path, image in zip(paths, placed, strict=True):
        own_id = path.relative_to(data).as_posix()
        landed_on_itself += image["neighbours"][0]["id"] == own_id and image["neighbours"][0]["distance"] < 1e-3
        is_artefact_region = image["majority_label"] == "thromboid"  # named with --artefact-label at export
        assert (image["flag"] == "artefact") == is_artefact_region, image
    assert landed_on_itself >= 0.95 * len(paths)  # ties between identical-looking cells aside
    assert any(image["flag"] == "artefact" for image in placed)
    assert open_bundle(bundle).artefact_labels == ["thromboid"]


def test_metrics_count_images_flags_regions_batches_and_errors(server, service_bundle, tmp_path, cell) -> None:
    _, data = service_bundle
    paths = sorted(data.rglob("*.png"))[:6]
    with server.client() as client:
        before = client.get("/metrics").text
        assert client.post("/embed", files=_files(paths)).status_code == 200
        assert client.post("/embed", files=_files([write_broken_files(tmp_path, cell)["notes.txt"]])).status_code == 422
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("tsimcne_images_embedded_total") == 6
    assert delta("tsimcne_flag_score_count") == 6
    assert delta("tsimcne_batch_images_sum") == 6  # this request ran alone
    assert delta("tsimcne_model_seconds_count") >= 1
    classes = open_bundle(service_bundle[0]).class_names
    assert sum(delta("tsimcne_images_by_region_total", label=name) for name in classes) == 6
    assert delta("tsimcne_decode_errors_total", reason="undecodable") == 1
    assert delta("tsimcne_rejected_requests_total", reason="bad_image") == 1
    assert metric_value(after, "tsimcne_bundle_info", provider="CPUExecutionProvider", bundle="cells") == 1
    assert "bentoml_service_request_total" in after  # BentoML's own request metrics sit beside ours


def test_concurrent_single_image_requests_are_batched(server, service_bundle) -> None:
    _, data = service_bundle
    paths = sorted(data.rglob("*.png"))[:64]
    with server.client() as client:
        before = client.get("/metrics").text
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda p: client.post("/embed", files=_files([p])), paths))
        after = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * len(paths)
    images = metric_value(after, "tsimcne_batch_images_sum") - metric_value(before, "tsimcne_batch_images_sum")
    runs = metric_value(after, "tsimcne_batch_images_count") - metric_value(before, "tsimcne_batch_images_count")
    # every image was placed once, and some model runs took several requests' images together (without
    # batching there would be one run per request)
    assert images == len(paths) and 1 <= runs < len(paths), (images, runs)


@pytest.mark.parametrize(
    ("name", "status", "says"),
    [
        ("truncated.jpg", 422, "truncated.jpg"),
        ("empty.png", 422, "empty file (0 bytes)"),
        ("notes.txt", 422, "not a readable image"),
        ("bomb.png", 422, "exceeds the limit"),
        ("animated.gif", 200, ""),
        ("cmyk.jpg", 200, ""),
    ],
)
def test_broken_and_odd_files(server, cell, tmp_path, name, status, says) -> None:
    path = write_broken_files(tmp_path, cell)[name]
    with server.client() as client:
        response = client.post("/embed", files=_files([path]))
    assert response.status_code == status, response.text
    if status != 200:
        assert says in response.json()["error"] + str(response.json().get("detail"))
        assert response.json()["detail"][0]["file"] == name


def _text_part(field: str, value: str) -> dict:
    """A multipart body with one plain-text value (no filename), as a form would send."""
    body = f'--b0undary\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n--b0undary--\r\n'
    return {"content": body.encode(), "headers": {"content-type": "multipart/form-data; boundary=b0undary"}}


def test_request_shape_errors_are_4xx_naming_the_problem(server, cell, tmp_path) -> None:
    good = write_good_images(tmp_path, cell)[0]
    data = good.read_bytes()
    cases = [
        ({"files": [("file", ("cell.png", data))]}, 400, "unexpected multipart field 'file'"),
        (_text_part("images", "http://127.0.0.1:1/cell.png"), 400, "must carry files"),  # BentoML would fetch it
        ({}, 400, "empty request"),
        ({"json": {"images": ["cell.png"]}}, 415, "multipart/form-data"),
        ({"files": [("images", (f"{i}.png", data)) for i in range(MAX_IMAGES + 1)]}, 413, f"more than {MAX_IMAGES}"),
        # Every count over the limit is 413 (starlette's parser stopped at MAX_IMAGES + 1 with a 400 before).
        ({"files": [("images", (f"{i}.png", data)) for i in range(MAX_IMAGES + 2)]}, 413, f"more than {MAX_IMAGES}"),
        ({"files": [("images", (f"{i}.png", data)) for i in range(10 * MAX_IMAGES)]}, 413, f"more than {MAX_IMAGES}"),
        ({"files": [("images", ("big.png", b"\0" * (1024 * 1024 + 1)))]}, 413, "exceeds the limit of 1,048,576 bytes"),
        (
            {"content": b"--xyz\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
            400,
            "malformed multipart",
        ),
    ]
    with server.client() as client:
        for request, status, says in cases:
            response = client.post("/embed", **request)
            assert response.status_code == status, (request.keys(), response.text)
            assert says in response.json()["error"], response.text
        assert client.get("/readyz").status_code == 200  # still serving
        assert client.post("/embed", files=_files([good])).status_code == 200


def test_embed_searches_the_index_saved_in_the_bundle(server, service_bundle, cell, tmp_path) -> None:
    """The served bundle's features are memory-mapped from its file and searched exactly (the bundle's flat
    index), and place images exactly as the same bundle without the saved index and arrays (the older layout,
    features read from reference.npz)."""
    bundle, _ = service_bundle
    assert {"reference_features.faiss", "reference_features.npy", "reference_coords.npy"} <= set(
        open_bundle(bundle).files
    )
    paths = write_good_images(tmp_path / "images", cell)
    with server.client() as client:
        info = client.get("/info").json()
        response = client.post("/embed", files=_files(paths))
    assert response.status_code == 200, response.text
    assert info["neighbour_index"]["map"] == "kd-tree"
    assert info["neighbour_index"]["features"] == {
        "kind": "faiss-flat",
        "source": "the bundle's features, memory-mapped (exact numpy search)",
        "device": "cpu",
        "device_reason": "the model runs on the CPU",
    }
    assert "the bundle's features, memory-mapped" in server.log_text()  # the start-up log says it too
    old = _without_saved_index(bundle, tmp_path / "old")
    rebuilt = Placer(old, "cpu")
    assert rebuilt.neighbour_index["features"]["source"] == "the bundle's features (exact numpy search)"
    expected = rebuilt.place_images([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    for image, placement in zip(response.json()["images"], expected, strict=True):
        assert [n["index"] for n in image["neighbours"]] == [n.index for n in placement.neighbours]
        assert image["score"] == pytest.approx(placement.score, rel=1e-5)


def _without_saved_index(bundle: Path, target: Path) -> Path:
    """A copy of `bundle` as export wrote it before issue 14: reference.npz only, no .npy arrays or index."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "bundle.json").read_text())
    for name in ("reference_features.faiss", "reference_features.npy", "reference_coords.npy"):
        del manifest["files"][name]
        (target / name).unlink()
    (target / "bundle.json").write_text(json.dumps(manifest))
    return target


def test_map_info_and_openapi(server, service_bundle) -> None:
    bundle, _ = service_bundle
    with server.client() as client:
        reference_map = client.get("/map").json()
        info = client.get("/info").json()
        spec = client.get("/docs.json").json()
    with np.load(bundle / "reference.npz") as reference:
        assert np.allclose(reference_map["x"], reference["coords"][:, 0])
        assert reference_map["labels"] == reference["labels"].tolist()
        assert reference_map["ids"] == reference["ids"].tolist()
    assert info["bundle_sha256"] == hashlib.sha256((bundle / "bundle.json").read_bytes()).hexdigest()
    assert info["provider"] == "CPUExecutionProvider" and info["image_size"] == [16, 16]
    assert info["limits"]["max_images"] == MAX_IMAGES and info["calibration"]["threshold"] > 0
    interval = info["calibration"]["false_flag_rate"]  # how sure the 1 % is, from bundle.json
    assert interval["low"] < 0.01 < interval["high"] and interval["images"] == info["calibration"]["images"]
    assert info["artefact_labels"] == ["thromboid"] and not info["auth_required"]
    assert {"/embed", "/map", "/info", "/readyz", "/metrics"} <= set(spec["paths"])
    flag = spec["components"]["schemas"]["PlacedImage"]["properties"]["flag"]  # one enum, named for clients
    assert flag["$ref"].rsplit("/", 1)[1] == "Flag"
    assert set(spec["components"]["schemas"]["Flag"]["enum"]) == {"in_distribution", "out_of_distribution", "artefact"}


def test_bearer_token_guards_everything_but_health(service_bundle, tmp_path, cell) -> None:
    bundle, _ = service_bundle
    token = "s3cret-token-for-the-lab-0123456789"
    # As a secret file or `echo` often leaves it: with surrounding whitespace, which is not part of it.
    running = start_server(
        tmp_path, {"bundle": str(bundle)}, home=tmp_path / "bentoml", env={"TSIMCNE_API_TOKEN": f"  {token}\n"}
    )
    try:
        files = _files(write_good_images(tmp_path / "img", cell)[:1])
        with running.client() as client:
            assert client.post("/embed", files=files).status_code == 401
            wrong = client.post("/embed", files=files, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]
            assert client.get("/info").status_code == 401
            assert client.get("/metrics").status_code == 401
            for open_path in ("/healthz", "/livez", "/readyz"):
                assert client.get(open_path).status_code == 200
            authorised = {"Authorization": f"Bearer {token}"}
            assert client.post("/embed", files=files, headers=authorised).status_code == 200
            assert client.get("/info", headers=authorised).json()["auth_required"]
    finally:
        running.stop()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="a CUDA build is installed")
def test_refuses_to_start_when_cuda_is_demanded_but_missing(service_bundle, tmp_path) -> None:
    bundle, _ = service_bundle
    result = run_server_to_exit({"bundle": str(bundle), "provider": "cuda"}, home=tmp_path)
    assert "CUDA was requested but onnxruntime could not use it" in result.stdout + result.stderr


def test_bad_settings_and_missing_bundles_stop_with_one_line(tmp_path, service_bundle) -> None:
    bundle, _ = service_bundle
    cases = [
        (
            {"bundle": str(bundle), "max_images": "0"},
            "error: --arg max_images: Input should be greater than or equal to 1",
        ),
        ({"bundle": str(tmp_path / "nowhere")}, "no such bundle folder"),
        ({"model_tag": "absent:latest"}, "is not in BentoML's model store"),
        ({"bundle": str(bundle), "colour": "red"}, "--arg colour: unknown setting"),
        ({}, "error: no bundle to serve"),
    ]
    for args, says in cases:
        result = run_server_to_exit(args, home=tmp_path)
        assert result.returncode != 0 and says in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_dashboard_and_alerts_use_only_metrics_the_service_exports(server, cell, tmp_path) -> None:
    import json
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    dashboard = ROOT / "deploy" / "grafana" / "tsimcne-dashboard.json"
    fresh = tmp_path / "dashboard.json"
    regenerated = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "grafana" / "make_dashboard.py"), str(fresh)],
        capture_output=True,
        text=True,
    )
    assert regenerated.returncode == 0, regenerated.stderr
    assert fresh.read_text() == dashboard.read_text(), "dashboard JSON is stale: run deploy/grafana/make_dashboard.py"
    panels = json.loads(dashboard.read_text())["panels"]
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    queries += (ROOT / "deploy" / "alerts.yml").read_text()
    with server.client() as client:
        client.post("/embed", files=_files(write_good_images(tmp_path, cell)[:1]))
        client.post("/embed", files=_files([write_broken_files(tmp_path, cell)["empty.png"]]))
        exported = client.get("/metrics").text
    families = set(re.findall(r"^# TYPE (\w+) \w+", exported, flags=re.MULTILINE))
    used = set(re.findall(r"\b((?:tsimcne|bentoml_service)_\w+)", queries))
    for name in used:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert name in families or base in families, f"{name} is not exported"


def test_schemathesis_finds_no_server_error(server, tmp_path) -> None:
    """Property-based requests generated from the service's own OpenAPI spec: no 5xx, still serving."""
    import subprocess
    import sys
    from pathlib import Path as _Path

    st = _Path(sys.executable).with_name("st")
    command = [str(st), "run", f"{server.url}/docs.json", "--seed", "1", "--max-examples", "60"]
    result = subprocess.run(
        [*command, "-c", "not_a_server_error", "--no-color"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:]
    with server.client() as client:
        assert client.get("/readyz").status_code == 200


def test_bentoml_python_client_can_call_embed(server, cell, tmp_path) -> None:
    import bentoml

    path = write_good_images(tmp_path, cell)[0]
    with bentoml.SyncHTTPClient(server.url) as client:
        reply = client.embed(images=[path])
    assert reply["images"][0]["filename"] == path.name and reply["bundle"] == "cells"


def test_two_workers_share_the_metrics(service_bundle, tmp_path, cell) -> None:
    """With workers=2, Prometheus multiprocess mode adds up what both processes counted."""
    bundle, _ = service_bundle
    running = start_server(tmp_path, {"bundle": str(bundle), "workers": "2"}, home=tmp_path / "bentoml")
    try:
        running.wait_for_log("[entry_service:tsimcne:1] serving bundle", "[entry_service:tsimcne:2] serving bundle")
        files = _files(write_good_images(tmp_path / "img", cell)[:2])
        with running.client() as client, ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.post("/embed", files=files), range(12)))
            exported = client.get("/metrics").text
        assert [r.status_code for r in replies] == [200] * 12
        assert metric_value(exported, "tsimcne_images_embedded_total") == 24
    finally:
        running.stop()


def test_evidence_and_duplicates_in_one_request(server, cell, tmp_path) -> None:
    paths = write_good_images(tmp_path, cell)
    again = tmp_path / "same-cell-again.png"
    again.write_bytes(paths[0].read_bytes())
    with server.client() as client:
        before = client.get("/metrics").text
        body = client.post("/embed", files=_files([paths[0], again])).json()
        after = client.get("/metrics").text
    first, second = body["images"]
    assert set(first["evidence"]) == {"features", "pixels", "position"}
    assert first["score"] == pytest.approx(max(first["evidence"].values()) / _threshold(server), rel=1e-6)
    assert first["duplicate_of"] == "same-cell-again.png" and second["duplicate_of"] == "cell.png"
    assert metric_value(after, "tsimcne_duplicates_total") - metric_value(before, "tsimcne_duplicates_total") == 2


def _threshold(server) -> float:
    import httpx

    return httpx.get(server.url + "/info").json()["calibration"]["threshold"]


def _still_serving(server, cell, tmp_path) -> None:
    good = write_good_images(tmp_path / "good", cell)[0]
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/embed", files=_files([good])).status_code == 200


def test_tiff_of_separate_planes_is_refused_from_its_header(server, cell, tmp_path) -> None:
    """3 colour planes of 3000x2000 (18 kB deflate): 6 Mpx over the 4 Mpx limit. The old guard counted
    the first two axes of (3, 2000, 3000), 6,000 pixels, and decoded every plane."""
    with server.client() as client:
        response = client.post("/embed", files=[("images", ("planes.tif", planar_tiff(3000, 2000)))])
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["file"] == "planes.tif"
    assert "3000x2000 pixels of 3 samples x 1 byte, in separate planes: 6,000,000 pixels exceeds" in problem["error"]
    _still_serving(server, cell, tmp_path)


def test_exif_orientation_is_honoured(server, service_bundle, tmp_path) -> None:
    """A JPEG stored sideways with orientation 6 lands where the same pixels stored upright land."""
    _, data = service_bundle
    cell = np.asarray(Image.open(sorted(data.glob("erythroid/*.png"))[0]).convert("RGB"))
    sideways = with_orientation(np.ascontiguousarray(np.rot90(cell, 1)), 6)
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(stored_pixels(sideways), -1)))
    upright.save(tmp_path / "upright.png")
    upright_png = (tmp_path / "upright.png").read_bytes()
    files = [("images", ("sideways.jpg", sideways)), ("images", ("upright.png", upright_png))]
    with server.client() as client:
        response = client.post("/embed", files=files)
    assert response.status_code == 200, response.text
    placed, reference = response.json()["images"]
    assert np.allclose([placed["x"], placed["y"]], [reference["x"], reference["y"]], atol=1e-5), (placed, reference)


@pytest.fixture(scope="module")
def guarded_server(service_bundle, tmp_path_factory):
    """Limits small enough to reach with small files: 8 Mpx an image, 300 Mpx a request, 0.5 s a request."""
    bundle, _ = service_bundle
    root = tmp_path_factory.mktemp("guarded-server")
    args = {
        "bundle": str(bundle),
        "max_pixels": "8000000",
        "max_request_pixels": "300000000",
        "request_budget_s": "0.5",
        "decode_concurrency": "1",
    }
    running = start_server(root, args, home=root / "bentoml")
    yield running
    running.stop()
    assert "Traceback" not in running.log_text()


def test_pixels_of_a_whole_request_are_bounded(guarded_server, cell, tmp_path) -> None:
    """40 images of 8 Mpx in a 1.2 MB body: each within the per-image limit, 960 MB once decoded together."""
    big = solid_png(2828, 2828)
    files = [("images", (f"{i}.png", big)) for i in range(40)]
    with guarded_server.client() as client:
        before = client.get("/metrics").text
        response = client.post("/embed", files=files)
        after = client.get("/metrics").text
    assert response.status_code == 413, response.text
    message = response.json()["error"]
    assert "hold 319,903,360 pixels together, over the limit of 300,000,000 pixels per request" in message
    rejected = metric_value(after, "tsimcne_rejected_requests_total", reason="too_many_pixels")
    assert rejected - metric_value(before, "tsimcne_rejected_requests_total", reason="too_many_pixels") == 1
    _still_serving(guarded_server, cell, tmp_path)


def test_a_request_stops_when_its_time_budget_runs_out(guarded_server, cell, tmp_path) -> None:
    """64 images of 4 Mpx (256 Mpx to decode, seconds of work) against a 0.5 s budget: 503 naming the budget,
    soon after the budget, and the decoding slot is free again for the next request."""
    big = solid_png(2000, 2000)
    files = [("images", (f"{i}.png", big)) for i in range(64)]
    with guarded_server.client() as client:
        started = time.perf_counter()
        response = client.post("/embed", files=files)
        elapsed = time.perf_counter() - started
    assert response.status_code == 503, response.text
    assert "time budget of 0.5 s (setting request_budget_s)" in response.json()["error"]
    assert response.headers["retry-after"] == "5"
    assert elapsed < 5, elapsed
    _still_serving(guarded_server, cell, tmp_path)


def test_info_shows_no_local_paths(service_bundle, tmp_path) -> None:
    """A bundle records where its calibration images and evaluated data were (bundle.json keeps that
    provenance); /info names the data, never the path."""
    import shutil

    bundle, data = service_bundle
    run = tmp_path / "lab-share" / "runs" / "cells"
    shutil.copytree(bundle.parent.parent / "runs" / "cells", run)
    assert run_cli("evaluate", str(run)).returncode == 0  # metrics.json records the training data's path
    calibrated = tmp_path / "calibrated"
    result = run_cli("export", str(run), "--out", str(calibrated), "--calibration-data", str(data))
    assert result.returncode == 0, result.stderr
    assert str(data) in (calibrated / "bundle.json").read_text()
    running = start_server(tmp_path, {"bundle": str(calibrated)}, home=tmp_path / "bentoml")
    try:
        with running.client() as client:
            info = client.get("/info")
    finally:
        running.stop()
    assert info.status_code == 200
    assert info.json()["calibration"]["source"] == f"held-out images never trained on: {data.name} (120)"
    assert info.json()["evaluation"]["data"] == data.name
    for private in (str(data.parent), str(tmp_path), str(bundle.parent)):
        assert private not in info.text, private


def test_one_image_as_the_raw_body(server, cell, tmp_path) -> None:
    """`Content-Type: image/...` with the file as the body: the same answer as multipart, the name from
    ?filename=, the same limits and errors."""
    good = write_good_images(tmp_path, cell)[0]
    broken = write_broken_files(tmp_path, cell)
    with server.client() as client:
        multipart = client.post("/embed", files=_files([good]))
        raw = client.post(
            "/embed",
            params={"filename": "scan 7.png"},
            content=good.read_bytes(),
            headers={"content-type": "image/png"},
        )
        unnamed = client.post("/embed", content=good.read_bytes(), headers={"content-type": "application/octet-stream"})
        bad = client.post(
            "/embed", params={"filename": "cut.jpg"}, content=broken["truncated.jpg"].read_bytes(),
            headers={"content-type": "image/jpeg"},
        )  # fmt: skip
        big = client.post("/embed", content=b"\0" * (1024 * 1024 + 1), headers={"content-type": "image/tiff"})
        text = client.post("/embed", content=b"a cell", headers={"content-type": "text/plain"})
        empty = client.post("/embed", content=b"", headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    placed, expected = raw.json()["images"][0], multipart.json()["images"][0]
    assert placed["filename"] == "scan 7.png" and unnamed.json()["images"][0]["filename"] == "upload"
    assert {k: v for k, v in placed.items() if k != "filename"} == {
        k: v for k, v in expected.items() if k != "filename"
    }
    assert bad.status_code == 422 and bad.json()["detail"] == [
        {"file": "cut.jpg", "error": bad.json()["detail"][0]["error"]}
    ]
    assert "cut.jpg: broken or truncated image" in bad.json()["detail"][0]["error"]
    assert big.status_code == 413 and "exceeds the limit of 1,048,576 bytes" in big.json()["error"]
    assert text.status_code == 415
    assert "'text/plain'" in text.json()["error"] and "image/png" in text.json()["error"]
    assert empty.status_code == 400 and "empty request" in empty.json()["error"]


def test_embed_takes_posts_only(server) -> None:
    with server.client() as client:
        response = client.get("/embed")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "takes POST requests" in response.json()["error"]


def test_embed_counts_its_requests_by_status(server, cell, tmp_path) -> None:
    good = write_good_images(tmp_path, cell)[0]
    with server.client() as client:
        before = client.get("/metrics").text
        client.post("/embed", files=_files([good]))
        client.post("/embed", files=_files([good]))
        client.post("/embed", json={"x": 1})
        after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("tsimcne_embed_requests_total", status="200") == 2
    assert delta("tsimcne_embed_requests_total", status="415") == 1
    assert delta("tsimcne_embed_request_seconds_count") == 3


def test_each_request_body_is_parsed_once(service_bundle, tmp_path, cell) -> None:
    """Counted from outside the service: every multipart parser any process of `bentoml serve` makes is logged
    (tests/probes/sitecustomize.py), BentoML's own included; one per multipart request, none for a raw body."""
    from tests.conftest import ROOT

    bundle, _ = service_bundle
    log = tmp_path / "parsers.log"
    env = {"PYTHONPATH": str(ROOT / "tests" / "probes"), "TSIMCNE_TEST_PARSER_LOG": str(log)}
    running = start_server(tmp_path, {"bundle": str(bundle), "workers": "2"}, home=tmp_path / "bentoml", env=env)
    try:
        running.wait_for_log("[entry_service:tsimcne:1] serving bundle", "[entry_service:tsimcne:2] serving bundle")
        paths = write_good_images(tmp_path / "img", cell)
        made_at_start = len(log.read_text().splitlines()) if log.exists() else 0
        with running.client() as client, ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda n: client.post("/embed", files=_files(paths[: 1 + n % 4])), range(12)))
            raw = client.post("/embed", content=paths[0].read_bytes(), headers={"content-type": "image/png"})
        assert [r.status_code for r in replies] == [200] * 12 and raw.status_code == 200
        assert len(log.read_text().splitlines()) - made_at_start == 12
    finally:
        running.stop()


def test_access_log_tracing_and_reconnects_are_settings(service_bundle, tmp_path, cell) -> None:
    """Access log and tracing off by default (the module's server logs no access lines); on, /embed is logged
    and traced. keepalive_requests: the answers that ask a client to reconnect, on average one in N."""
    bundle, _ = service_bundle
    args = {
        "bundle": str(bundle), "workers": "1", "access_log": "true", "tracing_sample_rate": "1.0",
        "keepalive_requests": "2",
    }  # fmt: skip
    running = start_server(tmp_path, args, home=tmp_path / "bentoml")
    try:
        files = _files(write_good_images(tmp_path, cell)[:1])
        with running.client() as client:
            replies = [client.post("/embed", files=files) for _ in range(20)]
            assert client.get("/info").status_code == 200
        log = running.wait_for_log("path=/embed", "path=/info")
    finally:
        running.stop()
    assert [r.status_code for r in replies] == [200] * 20
    # About every second answer asks the client to reconnect (and httpx does, transparently).
    assert 0 < sum(r.headers.get("connection") == "close" for r in replies) < 20
    assert "status=200" in log and "Traceback" not in log


def _read_http_reply(sock) -> str:
    """One whole HTTP/1.1 reply (head and Content-Length body) from `sock`: the head and the body may come in
    separate segments, so one recv() is not enough."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_that_does_not_arrive_in_time_is_answered_408(service_bundle, tmp_path) -> None:
    """A client that declares a body and trickles it (or stops) gets 408 after body_timeout_s, not a held
    connection; the service goes on."""
    import socket

    bundle, _ = service_bundle
    running = start_server(tmp_path, {"bundle": str(bundle), "workers": "1", "body_timeout_s": "1"}, home=tmp_path)
    try:
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab"
            )
            reply = _read_http_reply(sock)
            waited = time.monotonic() - started
        assert reply.startswith("HTTP/1.1 408") and "setting body_timeout_s" in reply, reply
        assert 0.9 < waited < 8, waited
        with running.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        running.stop()


def test_without_a_journal_placements_say_how_to_turn_it_on(server) -> None:
    with server.client() as client:
        reply = client.get("/placements")
    assert reply.status_code == 404 and "journal=sqlite:///PATH" in reply.json()["error"]
