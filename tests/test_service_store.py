"""Bundles in BentoML's model store: `tsimcne export --register`, serving by tag, `bentoml build`."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.harness.cli import run_cli
from benchmarks.harness.servers import BENTOML, server_env, start_server
from tests.conftest import ROOT
from tsimcne_map import Bundle

pytestmark = pytest.mark.slow


def test_register_serve_by_tag_and_build_a_bento(service_bundle, tmp_path, monkeypatch) -> None:
    bundle, data = service_bundle
    cell = sorted(data.rglob("*.png"))[0]
    expected = Bundle.open(bundle).place([cell])[0]  # the same image placed in-process, for comparison
    run = bundle.parent.parent / "runs" / "cells"
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    result = run_cli("export", str(run), "--out", str(tmp_path / "cells"), "--register")
    assert result.returncode == 0, result.stderr
    assert "registered in BentoML's model store as cells:" in result.stdout

    running = start_server(tmp_path, {"model_tag": "cells:latest"}, home=home)
    try:
        with running.client() as client:
            assert client.get("/info").json()["bundle"] == "cells"
    finally:
        running.stop()

    env = server_env(home)
    built = subprocess.run(
        [str(BENTOML), "build", "--arg", "model_tag=cells:latest"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stdout + built.stderr
    listed = subprocess.run([str(BENTOML), "list", "-o", "json"], env=env, capture_output=True, text=True)
    assert '"tsimcne:' in listed.stdout
    # The Bento carries the bundle: served from outside the repository, by Bento tag alone.
    running = start_server(tmp_path, {}, home=home, serve_target="tsimcne:latest", cwd=tmp_path)
    try:
        with running.client() as client:
            info = client.get("/info").json()
            page, script = client.get("/"), client.get("/ui/map.js")
            placed = client.post(
                "/embed",
                params={"filename": cell.name},
                content=cell.read_bytes(),
                headers={"Content-Type": "image/png"},
            )
        assert info["bundle"] == "cells" and info["provider"] == "CPUExecutionProvider"
        # The map page travels in the Bento too (bentofile.yaml includes serving/web/).
        assert page.status_code == 200 and "tsimcne map" in page.text and script.status_code == 200
        # and it places images as the bundle does in-process (the model and reference came with the Bento)
        assert placed.status_code == 200, placed.text
        answer = placed.json()["images"][0]
        assert answer["filename"] == cell.name and answer["flag"] == expected.flag
        assert (answer["x"], answer["y"]) == pytest.approx((expected.x, expected.y), abs=1e-4)
    finally:
        running.stop()
