"""torchrun with two CPU processes (gloo): sharded batches, gathered negatives, DDP, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT


def _torchrun_tiny_training(runs_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`tsimcne train` of the tiny recipe on synthetic cells in two torchrun processes; asserts it succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "tsimcne_cli", "train", "--data", "synthetic:96", "--name", "ddp", "--runs-dir", str(runs_dir)]
    command += ["--recipe", "tiny", "--image-size", "16", "--batch-size", "16", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_two_processes_trains_all_stages(tmp_path: Path) -> None:
    result = _torchrun_tiny_training(tmp_path, "--epochs", "2,1,1")
    assert "2 processes, BatchNorm synchronised" in result.stdout
    assert result.stdout.count("done in") == 1  # only rank 0 reports and writes
    state = torch.load(tmp_path / "ddp" / "stage3.pt", weights_only=True)
    assert state["finished_stage"] == 3 and state["model_out_dim"] == 2
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4


def test_torchrun_ranks_agree_on_every_budget_plan(tmp_path: Path) -> None:
    """A budgeted run plans 4 times (before training, after epoch 1, before stages 2 and 3) from times each
    rank measures itself; the ranks must agree on the slowest, or one would wait forever for the other."""
    _torchrun_tiny_training(tmp_path, "--time-budget", "30s")
    run = tmp_path / "ddp"
    plan = json.loads((run / "budget.json").read_text())
    assert plan["timed_step_s"] is not None and [r["stage"] for r in plan["stage_replans"]] == [2, 3]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trained = [max((r["epoch"] for r in records if r["stage"] == s), default=0) for s in (1, 2, 3)]
    assert trained == plan["epochs"]
