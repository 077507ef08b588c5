"""A killed or interrupted run, resumed, reaches exactly the weights of an uninterrupted run (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.cli import run_cli
from tests.conftest import ROOT
from training.runlock import hold_run_lock

ARGS = ["--data", "synthetic:160", "--recipe", "tiny", "--epochs", "4,2,3", "--image-size", "16", "--batch-size", "16"]
ARGS += ["--checkpoint-every", "1", "--precision", "fp32"]


def _start(runs: Path, name: str, args: list[str] = ARGS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tsimcne_cli", "train", "--name", name, "--runs-dir", str(runs), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_log_lines(run: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    log = run / "log.jsonl"
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the expected epoch in time")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_kill_and_resume_reaches_the_same_weights(tmp_path: Path) -> None:
    reference = run_cli("train", "--name", "straight", "--runs-dir", str(tmp_path), *ARGS)
    assert reference.returncode == 0, reference.stderr

    process = _start(tmp_path, "killed")
    _wait_for_log_lines(tmp_path / "killed", 2, process)  # two stage-1 epochs done, checkpoints written
    process.kill()
    process.wait()
    state = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert state["position"]["stage"] == 1, "the kill should land in stage 1"

    resumed = run_cli("train", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at stage 1" in resumed.stdout
    _assert_same_weights(tmp_path / "straight" / "stage3.pt", tmp_path / "killed" / "stage3.pt")
    records = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    expected = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    assert [(r["stage"], r["epoch"]) for r in records] == expected


def test_ctrl_c_saves_mid_epoch_and_resume_matches(tmp_path: Path) -> None:
    reference = run_cli("train", "--name", "straight", "--runs-dir", str(tmp_path), *ARGS)
    assert reference.returncode == 0, reference.stderr

    process = _start(tmp_path, "interrupted")
    _wait_for_log_lines(tmp_path / "interrupted", 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "tsimcne train --resume" in stderr and "Traceback" not in stderr
    state = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert state["optimizer"] is not None and state["position"]["stage"] < 4

    resumed = run_cli("train", "--resume", str(tmp_path / "interrupted"))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(tmp_path / "straight" / "stage3.pt", tmp_path / "interrupted" / "stage3.pt")


def test_second_process_on_a_live_run_is_refused(tmp_path: Path) -> None:
    """A `--resume` of a run another process is still training stops with a clear message; once that
    process is gone (killed, here) the lock is free again."""
    runs = tmp_path / "runs"
    args = [a if a != "4,2,3" else "500,2,3" for a in ARGS]  # long enough to still be running
    first = _start(runs, "live", args)
    try:
        _wait_for_log_lines(runs / "live", 1, first)
        second = run_cli("train", "--resume", str(runs / "live"))
        assert first.poll() is None, "the first run ended before the second started; the test proves nothing"
        assert second.returncode == 2
        assert f"is being trained by another process (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
    hold_run_lock(runs / "live").close()  # free after a SIGKILL: no stale lock
