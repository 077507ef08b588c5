"""torchrun with two CPU processes (gloo): sharded batches, gathered negatives, DDP, one writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT


def test_torchrun_two_processes_trains_all_stages(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "training.cli", "train", "--data", "synthetic:96", "--name", "ddp", "--runs-dir", str(tmp_path)]
    command += ["--recipe", "tiny", "--epochs", "2,1,1", "--image-size", "16", "--batch-size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes, BatchNorm synchronised" in result.stdout
    assert result.stdout.count("done in") == 1  # only rank 0 reports and writes
    state = torch.load(tmp_path / "ddp" / "stage3.pt", weights_only=True)
    assert state["finished_stage"] == 3 and state["model_out_dim"] == 2
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4
