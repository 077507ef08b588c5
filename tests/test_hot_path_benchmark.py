"""The /embed benchmark (benchmarks/serve/hot_path.py) runs end to end: wrk against a real `bentoml serve` of a
tiny bundle and against the bare-Starlette floor, rows with figures and no failed requests, a JSON report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (scripts/test installs it as root)"),
]


def _run(bundle, only: str, out) -> subprocess.CompletedProcess:
    """hot_path.py on `bundle` (no 1,000,000-image rows), the servers whose name holds `only`, 1 s a row."""
    command = [
        sys.executable, "-m", "benchmarks.serve.hot_path", "--bundle", str(bundle), "--large-bundle", "none",
        "--only", only, "--seconds", "1", "--warm-up", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_hot_path_benchmark_measures_embed_against_a_floor(service_bundle, tmp_path) -> None:
    bundle, _ = service_bundle
    out = tmp_path / "report.json"
    done = _run(bundle, "(1 worker)", out)
    report = json.loads(out.read_text())
    rows = {(row["server"], row["case"]): row for row in report["rows"]}
    assert set(rows) == {
        ("starlette (1 worker)", "multipart-1"), ("starlette (1 worker)", "multipart-8"),
        ("bentoml-default (1 worker)", "multipart-1"), ("bentoml-default (1 worker)", "multipart-8"),
        ("bentoml-tuned (1 worker)", "multipart-1"), ("bentoml-tuned (1 worker)", "multipart-8"),
    }  # fmt: skip
    for row in rows.values():
        assert row["requests"] > 0 and row["non_2xx"] == 0 and row["socket_errors"] == 0, row
        per_request = 8 if row["case"].endswith("8") else 1
        assert row["images_per_s"] == pytest.approx(row["requests_per_s"] * per_request, rel=1e-3)
    assert report["machine"]["usable_cores"] >= 1 and report["machine"]["versions"]["bentoml"]
    assert "| starlette (1 worker) |" in done.stdout


def test_hot_path_benchmark_serves_embed_multipart_and_raw(service_bundle, tmp_path) -> None:
    bundle, _ = service_bundle
    out = tmp_path / "report.json"
    _run(bundle, "embed (workers=1)", out)
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == ["multipart-1", "multipart-8", "raw-1"]
    assert all(row["requests"] > 0 and row["non_2xx"] == 0 and row["bundle"] == bundle.name for row in rows)
