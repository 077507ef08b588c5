"""The service's parts in process: adaptive batching, settings, reading /embed's bodies and the guards, on a
real ASGI app."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.harness.attack_files import solid_png
from serving.batching import MicroBatcher
from serving.guards import BearerTokenAuth, BodySizeLimit, token_problem
from serving.settings import SettingsError, load_settings
from serving.upload_body import BodyLimits, Refusal, _MultipartReader, read_uploads


def _times_ten(jobs: list[np.ndarray]) -> list[np.ndarray]:
    batch = np.concatenate(jobs)  # one run for the whole group, split back per job
    splits = np.cumsum([len(job) for job in jobs])[:-1]
    return np.split(batch * 10, splits)


def test_batcher_groups_requests_that_wait_while_the_model_runs() -> None:
    batches: list[int] = []
    threads: set[str] = set()
    release = threading.Event()

    def model(jobs: list[np.ndarray]) -> list[np.ndarray]:
        batches.append(sum(len(job) for job in jobs))
        threads.add(threading.current_thread().name)
        if len(batches) == 1:
            release.wait(5)  # the first run is slow: everything that arrives meanwhile queues
        return _times_ten(jobs)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(model, max_images=100)
        first = asyncio.create_task(batcher.run(np.array([0.0]), 1))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.run(np.array([float(i), float(i)]), 2)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert batches == [1, 10]  # one lone run, then the five waiting requests in one batch
    assert results[0].tolist() == [0.0]
    assert [r.tolist() for r in results[1:]] == [[10.0 * i, 10.0 * i] for i in range(1, 6)]
    assert len(threads) == 1 and threads.pop().startswith("model")  # every run in the worker's one model thread


def test_batcher_respects_max_images_and_reports_errors_to_the_batch_only() -> None:
    batches: list[int] = []

    def model(jobs: list[np.ndarray]) -> list[np.ndarray]:
        batches.append(sum(len(job) for job in jobs))
        time.sleep(0.02)
        if any(np.any(job < 0) for job in jobs):
            raise RuntimeError("model failed")
        return jobs

    async def scenario():
        batcher = MicroBatcher(model, max_images=4)
        calls = [batcher.run(np.full(3, i, dtype=float), 3) for i in range(4)]
        bad = batcher.run(np.array([-1.0]), 1)
        results = await asyncio.gather(*calls, bad, return_exceptions=True)
        after = await batcher.run(np.array([7.0]), 1)  # the worker survived the failure
        await batcher.close()
        return results, after

    results, after = asyncio.run(scenario())
    assert all(b <= 4 for b in batches)
    assert isinstance(results[-1], RuntimeError)
    assert after.tolist() == [7.0]


def test_settings_arguments_win_over_environment_and_errors_name_the_source() -> None:
    env = {"TSIMCNE_BUNDLE": "models/a", "TSIMCNE_MAX_IMAGES": "10", "TSIMCNE_PROVIDER": ""}
    settings = load_settings({"max-images": "20"}, env)
    assert settings.bundle == "models/a" and settings.max_images == 20 and settings.provider == "auto"
    with pytest.raises(SettingsError, match="environment variable TSIMCNE_MAX_UPLOAD_MB"):
        load_settings({}, {"TSIMCNE_MAX_UPLOAD_MB": "lots"})
    with pytest.raises(SettingsError, match="--arg provider"):
        load_settings({"provider": "tpu"}, {})
    with pytest.raises(SettingsError, match=r"--arg api_token: .*at least 16"):
        load_settings({"api_token": "short"}, {})
    with pytest.raises(SettingsError, match=r"TSIMCNE_API_TOKEN: .*at least 16"):
        load_settings({}, {"TSIMCNE_API_TOKEN": "  short-token  \n"})  # 17 characters, 11 of them the token
    # A trailing newline from a secret file or `echo` is not part of the token (else it could never match).
    assert load_settings({}, {"TSIMCNE_API_TOKEN": " 0123456789abcdef0123\n"}).api_token == "0123456789abcdef0123"
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({"bundel": "x"}, {})


def _parts(boundary: str, count: int) -> bytes:
    """A multipart body of `count` file parts in the field 'images' (a quoted boundary may hold spaces)."""
    delimiter = b"--" + boundary.strip('"').encode()
    part = b'Content-Disposition: form-data; name="images"; filename="a.png"\r\n\r\nx\r\n'
    return b"".join(delimiter + b"\r\n" + part for _ in range(count)) + delimiter + b"--\r\n"


def _body_app(token: str | None = None, max_bytes: int = 10_000, max_files: int = 2, max_pixels: int = 10_000):
    """An ASGI app that reads /embed's uploads as the service does (serving/upload_body.py) and answers their
    names and headers, or the refusal; other paths go through the guards of BentoML's routes."""
    limits = BodyLimits(max_bytes=max_bytes, max_files=max_files, max_pixels=max_pixels)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    routes = Starlette(routes=[Route("/info", info), Route("/readyz", info)])
    routes.add_middleware(BodySizeLimit, max_bytes=max_bytes)
    routes.add_middleware(BearerTokenAuth, token=token)

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/embed":
            return await routes(scope, receive, send)
        try:
            uploads = await read_uploads(scope, receive, limits)
            answer = {
                "names": [u.name for u in uploads],
                "sizes": [[u.opened.header.width, u.opened.header.height] if u.opened else None for u in uploads],
                "problems": [str(u.problem) if u.problem else None for u in uploads],
            }
            status = 200
        except Refusal as refusal:
            answer, status = {"error": refusal.message, "reason": refusal.reason}, refusal.status
        await JSONResponse(answer, status)(scope, receive, send)

    return app


def _request(app, method: str, url: str, **kwargs) -> httpx.Response:
    """One request to an ASGI app in process (httpx's ASGI transport; no server, no lifespan needed)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(send())


def test_uploads_come_with_their_names_and_headers_read() -> None:
    files = [("images", ("a.png", solid_png(30, 20))), ("images", ("dir/b.png", solid_png(200, 100)))]
    response = _request(_body_app(), "POST", "/embed", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["names"] == ["a.png", "b.png"] and body["sizes"] == [[30, 20], None]
    assert body["problems"][0] is None and "20,000 pixels exceeds the limit of 10,000" in body["problems"][1]
    raw = _request(
        _body_app(),
        "POST",
        "/embed?filename=scan%2001.png",
        content=solid_png(8, 6),
        headers={"content-type": "image/png"},
    )
    assert raw.status_code == 200 and raw.json()["names"] == ["scan 01.png"] and raw.json()["sizes"] == [[8, 6]]
    unnamed = _request(
        _body_app(), "POST", "/embed", content=b"x", headers={"content-type": "application/octet-stream"}
    )
    assert unnamed.json()["names"] == ["upload"] and "not a readable image" in unnamed.json()["problems"][0]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "says"),
    [
        ({"files": [("image", ("a.png", b"x"))]}, 400, "unexpected multipart field 'image'"),
        ({"files": [("images", ("a.png", b"x"))] * 3}, 413, "more than 2 images"),
        ({"files": [("images", ("a.png", b"x"))] * 4}, 413, "more than 2 images"),
        ({"files": [("images", ("a.png", b"x"))] * 40}, 413, "more than 2 images"),
        (
            {
                "content": _parts('"b o"', 5),
                "headers": {"content-type": 'multipart/form-data; boundary="b o"'},
            },
            413,
            "more than 2 images",
        ),
        ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "multipart/form-data"),
        ({"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, "image/png"),
        ({"content": b"x" * 10_001, "headers": {"content-type": "multipart/form-data; boundary=z"}}, 413, "10,000"),
        ({"content": b"x" * 10_001, "headers": {"content-type": "image/png"}}, 413, "10,000"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty request"),
        ({"content": b" \r\n", "headers": {"content-type": "multipart/form-data; boundary=z"}}, 400, "empty request"),
        ({"content": b"--z--\r\n", "headers": {"content-type": "multipart/form-data; boundary=z"}}, 400, "empty"),
        ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "names no boundary"),
        (
            {"content": b"x", "headers": {"content-type": "multipart/form-data; boundary=" + "b" * 300}},
            400,
            "its boundary cannot be used",
        ),
        (
            {
                "content": b"--z\r\nContent-Type: image/png\r\n\r\nx\r\n--z--\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=z"},
            },
            400,
            "no Content-Disposition header",
        ),
        (
            {"content": b"--z\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=z"}},
            400,
            "malformed",
        ),
        (
            {"content": _parts("z", 1)[:-12], "headers": {"content-type": "multipart/form-data; boundary=z"}},
            400,
            "ended before its closing boundary",
        ),
        (
            {
                "content": b'--z\r\nContent-Disposition: form-data; name="images"\r\n\r\nhttp://x/a.png\r\n--z--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=z"},
            },
            400,
            "must carry files",
        ),
    ],
)
def test_bodies_the_service_refuses_with_json(request_kwargs, status, says) -> None:
    response = _request(_body_app(), "POST", "/embed", **request_kwargs)
    assert response.status_code == status and says in response.json()["error"], response.text


def test_size_limit_counts_streamed_bodies_without_content_length() -> None:
    async def chunks():
        yield b'--z\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n\r\n'
        for _ in range(20):
            yield b"y" * 1000  # one large file part, streamed

    for content_type in ("multipart/form-data; boundary=z", "image/png"):
        response = _request(_body_app(), "POST", "/embed", content=chunks(), headers={"content-type": content_type})
        assert response.status_code == 413 and "of more than 10,000 bytes" in response.json()["error"]


def test_one_parser_reads_each_multipart_body() -> None:
    before = _MultipartReader.parsers_made
    for count in (1, 2):
        files = [("images", (f"{i}.png", solid_png(4, 4))) for i in range(count)]
        assert _request(_body_app(), "POST", "/embed", files=files).status_code == 200
    assert _MultipartReader.parsers_made - before == 2


def test_bearer_token() -> None:
    token = "0123456789abcdef0123"
    app = _body_app(token=token)
    assert _request(app, "GET", "/info").status_code == 401
    assert _request(app, "GET", "/info", headers={"Authorization": "Basic abc"}).status_code == 401
    assert _request(app, "GET", "/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert _request(app, "GET", "/readyz").status_code == 200
    assert token_problem({"headers": []}, token.encode()) == (
        "authentication required: missing 'Authorization: Bearer <token>' header"
    )
    assert "wrong" in token_problem({"headers": [(b"authorization", b"Bearer nope")]}, token.encode())
    assert token_problem({"headers": [(b"authorization", f"bearer {token} ".encode())]}, token.encode()) is None


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("held-out images never trained on: /home/lab/share/held out.npz (150)", "... held out.npz (150)"),
        ("held-out images never trained on: data/heldout/ (120)", "... heldout (120)"),
        ("held-out images never trained on: C:\\lab\\heldout.csv (101)", "... heldout.csv (101)"),
        ("held-out images never trained on: synthetic:200 (200)", "... synthetic:200 (200)"),
        (
            "training images, 10 % left out of the reference (12; in-sample: the network saw them)",
            "training images, 10 % left out of the reference (12; in-sample: the network saw them)",
        ),
        ("made from /srv/a/b.npz and more", "made from b.npz and more"),
    ],
)
def test_public_calibration_source_has_no_folders(source: str, shown: str) -> None:
    from tsimcne_core.calibration import CombinedCalibration, public_calibration

    calibration = CombinedCalibration(
        target_false_flag_rate=0.01,
        source=source,
        images=100,
        k=15,
        threshold=1.5,
        features={"scale": 1.0},
        pixels={"scale": 1.0, "mean": [0.0], "precision": [[1.0]]},
        position={"k": 15, "threshold": 2.0},
    )
    public = public_calibration(calibration)
    assert public["source"] == shown.replace("... ", "held-out images never trained on: ")
    assert public["pixels"] == {"scale": 1.0}


def test_cpu_quota_of_a_container_caps_the_usable_cores(tmp_path) -> None:
    from tsimcne_core.cores import cpu_quota

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1) is None and cpu_quota(tmp_path / "nowhere") is None


def test_worker_plan_divides_the_cores() -> None:
    from serving.settings import ServiceSettings, worker_plan

    def plan(cores: int, gpu: bool = False, **settings):
        found = worker_plan(ServiceSettings(**settings), cores=cores, gpu=gpu)
        return found.workers, found.threads

    assert plan(2) == (2, 1)  # one single-threaded worker per core: the measured best on 2 cores
    assert plan(8) == (8, 1)
    assert plan(8, workers=2) == (2, 4)  # fewer workers share the cores out as onnxruntime threads
    assert plan(8, workers=3) == (3, 2)
    assert plan(8, workers=2, threads=1) == (2, 1)
    assert plan(16, gpu=True) == (1, 16)  # one worker batches everything for the device
    assert plan(1) == (1, 1)
    assert "one per usable CPU core (2)" in worker_plan(ServiceSettings(), cores=2, gpu=False).describe()


def test_batcher_survives_a_model_step_that_returns_the_wrong_number_of_results() -> None:
    async def scenario():
        calls = []

        def broken(jobs: list[np.ndarray]) -> list[np.ndarray]:
            calls.append(len(jobs))
            return [] if len(calls) == 1 else jobs

        batcher = MicroBatcher(broken, max_images=8)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 jobs"):
            await batcher.run(np.array([1.0]), 1)
        after = await batcher.run(np.array([2.0]), 1)
        await batcher.close()
        return after

    assert asyncio.run(scenario()).tolist() == [2.0]


def test_majority_labels_break_ties_alphabetically_and_ignore_unlabelled_neighbours() -> None:
    from tsimcne_core.placing import _LabelCounter
    from tsimcne_core.reference import ReferenceSet

    names = np.array(["b", "a", "c"])
    labels = np.array([0, 1, 2, -1, -1, 0])
    reference = ReferenceSet(np.zeros((6, 2), np.float32), np.arange(6).astype(str), labels, names, None, None)
    counter = _LabelCounter(reference, artefact_labels=["a"])
    nearest = np.array([[0, 1], [3, 4], [0, 5], [2, 3]])  # a tie b/a; all unlabelled; b twice; c and unlabelled
    majority, share = counter.majority(nearest)
    assert majority.tolist() == [1, -1, 0, 2]  # 'a' wins the tie (alphabetical, as np.unique's counts did)
    assert share[0] == 0.5 and np.isnan(share[1]) and share[2] == 1.0 and share[3] == 0.5
    flags = counter.flags(majority, np.array([0.5, 0.5, 2.0, 0.5]))
    assert flags == ["artefact", "in_distribution", "out_of_distribution", "in_distribution"]  # no label: no artefact


def test_the_embed_handler_answers_in_process_as_the_route_does(service_bundle) -> None:
    """EmbedHandler is /embed's body as a plain class: driven here without HTTP, it places what Placer places
    and names a broken upload in a 422, as the served route does (tests/test_service.py)."""
    import json
    from dataclasses import dataclass

    from serving.embed_route import EmbedHandler
    from tsimcne_core.bundle_format import MANIFEST, sha256_file
    from tsimcne_core.images import read_image
    from tsimcne_core.placing import Placer

    @dataclass
    class File:
        name: str
        data: bytes

    bundle, data = service_bundle
    cells = sorted(data.rglob("*.png"))[:3]
    placer = Placer(bundle, provider="cpu")
    handler = EmbedHandler(placer, sha256_file(bundle / MANIFEST), load_settings({"bundle": str(bundle)}, environ={}))
    files = [File(path.name, path.read_bytes()) for path in cells]
    answer = asyncio.run(handler.answer_files(files))
    assert answer.status == 200, answer.body
    placed = json.loads(answer.body)
    expected = placer.place(placer.prepare([read_image(path) for path in cells]), [path.name for path in cells])
    assert [image["filename"] for image in placed["images"]] == [path.name for path in cells]
    for image, record in zip(placed["images"], expected, strict=True):
        assert (image["x"], image["y"]) == pytest.approx((record.x, record.y)) and image["flag"] == record.flag
    refused = asyncio.run(handler.answer_files([*files[:1], File("broken.png", b"\x89PNG\r\n\x1a\n")]))
    assert refused.status == 422 and json.loads(refused.body)["detail"][0]["file"] == "broken.png"
    assert asyncio.run(handler.answer_files([])).status == 400
