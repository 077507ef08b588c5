"""`--time-budget`: epochs planned from timed steps, split by the stage shares, kept on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from training.budget import STAGE_SHARES, epochs_for_budget, parse_budget
from training.errors import UserError


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("45", 2700), ("0.5h", 1800)]
)
def test_parse_budget(text: str, seconds: float) -> None:
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "30x", "m30", "0", "1h30"])
def test_parse_budget_refuses_nonsense(text: str) -> None:
    with pytest.raises(UserError, match="--time-budget"):
        parse_budget(text)


def test_epochs_follow_the_stage_shares() -> None:
    # 1 s per full step, 0.5 s per stage-2 step, 10 steps per epoch: an epoch costs 10 s (5 s in stage 2)
    epochs = epochs_for_budget(10_000, (1.0, 0.5), 10)
    seconds = [epochs[0] * 10, epochs[1] * 5, epochs[2] * 10]
    assert sum(seconds) <= 10_000
    for spent, share in zip(seconds, STAGE_SHARES, strict=True):
        assert spent == pytest.approx(share * sum(seconds), rel=0.02)


def test_too_short_a_budget_is_refused_with_the_time_one_epoch_needs() -> None:
    with pytest.raises(UserError, match="too short: one epoch of each stage takes"):
        epochs_for_budget(20, (1.0, 0.5), 10)


def test_budget_and_epochs_together_are_refused(tmp_path: Path) -> None:
    result = run_cli(
        *("train", "--data", "synthetic:64", "--name", "b", "--runs-dir", str(tmp_path), "--recipe", "tiny"),
        *("--epochs", "1,1,1", "--time-budget", "1m"),
    )
    assert result.returncode == 2 and "either --epochs or --time-budget" in result.stderr
    assert "Traceback" not in result.stderr


def test_budgeted_run_trains_the_planned_epochs_and_resume_keeps_them(tmp_path: Path) -> None:
    args = ["--data", "synthetic:96", "--recipe", "tiny", "--image-size", "16", "--time-budget", "25s"]
    result = run_cli("train", "--name", "b", "--runs-dir", str(tmp_path), *args)
    assert result.returncode == 0, result.stderr
    assert "time budget 0.4 min" in result.stdout
    run = tmp_path / "b"
    plan = json.loads((run / "budget.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == plan["epochs"] and config["time_budget_s"] == 25
    assert plan["epochs"][0] > plan["epochs"][2] >= 1 and plan["step_s"][0] > plan["step_s"][1] > 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trained = [max((r["epoch"] for r in records if r["stage"] == s), default=0) for s in (1, 2, 3)]
    assert trained == plan["epochs"]
    again = run_cli("train", "--resume", str(run))
    assert again.returncode == 0 and "already finished" in again.stdout and "time budget" not in again.stdout


def test_cpu_recipe_trains_for_thirty_minutes_unless_epochs_are_given() -> None:
    from training.config import build_config

    assert build_config("cpu", {"data": "x"}).time_budget_s == 1800
    assert build_config("cpu", {"data": "x", "time_budget_s": 600.0}).time_budget_s == 600
    explicit = build_config("cpu", {"data": "x", "epochs": (3, 1, 1)})
    assert explicit.time_budget_s is None and explicit.epochs == (3, 1, 1)
    assert build_config("reference", {"data": "x"}).time_budget_s is None
