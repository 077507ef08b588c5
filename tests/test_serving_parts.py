"""The service's parts in process: adaptive batching, settings, and the request guards on a real ASGI app."""

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

from serving.batching import MicroBatcher
from serving.guards import BearerTokenAuth, BodySizeLimit, UploadGuard
from serving.settings import SettingsError, load_settings


def test_batcher_groups_requests_that_wait_while_the_model_runs() -> None:
    batches: list[int] = []
    release = threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        batches.append(len(batch))
        if len(batches) == 1:
            release.wait(5)  # the first run is slow: everything that arrives meanwhile queues
        return batch * 10

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(model, max_images=100)
        first = asyncio.create_task(batcher.run(np.array([0.0])))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.run(np.array([float(i), float(i)]))) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert batches == [1, 10]  # one lone run, then the five waiting requests in one batch
    assert results[0].tolist() == [0.0]
    assert [r.tolist() for r in results[1:]] == [[10.0 * i, 10.0 * i] for i in range(1, 6)]


def test_batcher_respects_max_images_and_reports_errors_to_the_batch_only() -> None:
    batches: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        batches.append(len(batch))
        time.sleep(0.02)
        if np.any(batch < 0):
            raise RuntimeError("model failed")
        return batch

    async def scenario():
        batcher = MicroBatcher(model, max_images=4)
        calls = [batcher.run(np.full(3, i, dtype=float)) for i in range(4)]
        bad = batcher.run(np.array([-1.0]))
        results = await asyncio.gather(*calls, bad, return_exceptions=True)
        after = await batcher.run(np.array([7.0]))  # the worker survived the failure
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


def _guarded_app(token: str | None = None, max_bytes: int = 10_000, max_files: int = 2) -> Starlette:
    async def upload(request: Request) -> JSONResponse:
        form = await request.form()
        return JSONResponse(
            {"files": len(form.getlist("images")), "names": [f.filename for f in form.getlist("images")]}
        )

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/embed", upload, methods=["POST"]), Route("/info", info), Route("/readyz", info)])
    app.add_middleware(UploadGuard, path="/embed", field="images", max_files=max_files)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)
    app.add_middleware(BearerTokenAuth, token=token)
    return app


def _request(app: Starlette, method: str, url: str, **kwargs) -> httpx.Response:
    """One request to an ASGI app in process (httpx's ASGI transport; no server, no lifespan needed)."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(send())


def test_upload_guard_passes_good_uploads_with_their_names() -> None:
    response = _request(
        _guarded_app(), "POST", "/embed", files=[("images", ("a.png", b"x")), ("images", ("b.png", b"y"))]
    )
    assert response.status_code == 200 and response.json() == {"files": 2, "names": ["a.png", "b.png"]}


@pytest.mark.parametrize(
    ("request_kwargs", "status", "says"),
    [
        ({"files": [("image", ("a.png", b"x"))]}, 400, "unexpected multipart field 'image'"),
        ({"files": [("images", ("a.png", b"x"))] * 3}, 413, "more than 2 images"),
        ({"files": [("images", ("a.png", b"x"))] * 4}, 413, "more than 2 images"),  # was 400 past max + 1
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
        ({"content": b"x" * 10_001, "headers": {"content-type": "multipart/form-data; boundary=z"}}, 413, "10,000"),
        (
            {"content": b"--z\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=z"}},
            400,
            "malformed",
        ),
    ],
)
def test_upload_guard_and_size_limit_refuse_with_json(request_kwargs, status, says) -> None:
    response = _request(_guarded_app(), "POST", "/embed", **request_kwargs)
    assert response.status_code == status and says in response.json()["error"]


def test_size_limit_counts_streamed_bodies_without_content_length() -> None:
    async def chunks():
        for _ in range(20):
            yield b"y" * 1000

    headers = {"content-type": "multipart/form-data; boundary=z"}
    response = _request(_guarded_app(), "POST", "/embed", content=chunks(), headers=headers)
    assert response.status_code == 413


def test_bearer_token() -> None:
    token = "0123456789abcdef0123"
    app = _guarded_app(token=token)
    assert _request(app, "GET", "/info").status_code == 401
    assert _request(app, "GET", "/info", headers={"Authorization": "Basic abc"}).status_code == 401
    assert _request(app, "GET", "/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert _request(app, "GET", "/readyz").status_code == 200


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
    from serving.calibration import CombinedCalibration, public_calibration

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
