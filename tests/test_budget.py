"""`--time-budget`: epochs planned from timed steps, split by the stage shares, kept on resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from benchmarks.harness.cli import run_cli
from training.budget import SAFETY, STAGE_SHARES, BudgetPlan, epochs_for_budget, parse_budget, replan, replan_remaining
from tsimcne_core.errors import TrainingStopped, UserError


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


def test_replan_uses_the_measured_step_time_and_keeps_the_timed_one() -> None:
    # timed at 2 s a step before training; the first epoch ran at 1 s a step: about twice the epochs
    plan = BudgetPlan(10_000, (2.0, 1.0), 10, epochs_for_budget(9_990, (2.0, 1.0), 10), calibration_s=10)
    again = replan(plan, 1.0)
    assert again.replanned and not plan.replanned and again.timed_step_s == (2.0, 1.0)
    assert again.step_s == (1.0, 0.5) and again.epochs == epochs_for_budget(9_990, (1.0, 0.5), 10)
    assert again.epochs[0] == pytest.approx(2 * plan.epochs[0], abs=1)
    planned = sum(e * 10 * s for e, s in zip(again.epochs, again.stage_step_s, strict=True))
    assert planned <= 9_990
    assert replan(plan, 1_000.0).epochs == (1, 1, 1)  # far slower than timed: still a whole run, never 0 epochs


def test_later_stages_share_what_is_left_of_the_budget_at_the_speed_measured_last() -> None:
    # 10,000 s at 1 s a step, 10 steps an epoch: stages planned for 70 / 5 / 25 % of the usable time
    plan = BudgetPlan(10_000, (1.0, 0.5), 10, epochs_for_budget(10_000, (1.0, 0.5), 10), calibration_s=0)
    usable = 10_000 * SAFETY
    on_time = replan_remaining(plan, 2, elapsed_s=usable * 0.70, measured_step_s=1.0)
    assert on_time.epochs == plan.epochs  # stage 1 ran as planned: nothing changes
    # stage 1 ran 20 % over (the machine got busier) and steps are now 1.2 s: stages 2-3 shrink to fit
    late = replan_remaining(plan, 2, elapsed_s=usable * 0.70 * 1.2, measured_step_s=1.2)
    left = usable * (1 - 0.70 * 1.2)
    assert late.epochs[0] == plan.epochs[0] and late.step_s == pytest.approx((1.2, 0.6))
    assert late.epochs[1:] == (int(left * 5 / 30 / 6), int(left * 25 / 30 / 12))
    assert late.stage_replans[-1].stage == 2 and late.stage_replans[-1].elapsed_s == pytest.approx(usable * 0.84)
    spent = usable * 0.84 + late.epochs[1] * 6 + late.epochs[2] * 12
    assert spent <= usable < spent + 12 + 6  # fills the budget to within an epoch of each later stage
    # before stage 3, a fast stage 2 (0.25 s a step: half the planned 0.5) hands its speed-up to stage 3
    fast = replan_remaining(late, 3, elapsed_s=usable * 0.84 + late.epochs[1] * 6, measured_step_s=0.3)
    assert fast.step_s == pytest.approx((0.6, 0.3)) and fast.epochs[:2] == late.epochs[:2]
    assert fast.epochs[2] == int((usable - usable * 0.84 - late.epochs[1] * 6) / 6)
    assert len(fast.stage_replans) == 2
    # nothing left: still one epoch of each stage to come, never 0
    assert replan_remaining(plan, 2, elapsed_s=20_000, measured_step_s=1.0).epochs[1:] == (1, 1)


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
    assert plan["timed_step_s"][0] > 0 and "re-planned after the first epoch" in result.stdout
    assert [r["stage"] for r in plan["stage_replans"]] == [2, 3]
    assert plan["stage_replans"][-1]["epochs"] == plan["epochs"]
    assert "re-planned before stage 2" in result.stdout and "re-planned before stage 3" in result.stdout
    assert torch.load(run / "stage3.pt", weights_only=True)["config"]["epochs"] == plan["epochs"]
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


def test_a_run_stopped_after_the_replan_resumes_with_the_replanned_epochs(tmp_path: Path) -> None:
    """Ctrl-C in stage 1's third epoch (the re-plan came after its first): the checkpoint, config.json
    and budget.json all hold the re-planned epochs, and the resumed run trains exactly those."""
    from training.config import build_config
    from training.run_training import load_resume_state, train_run

    config = build_config("tiny", {"data": "synthetic:96", "image_size": (16, 16), "time_budget_s": 8.0})
    run = tmp_path / "run"

    def interrupt_after_second_epoch(record: dict) -> None:
        if (record["stage"], record["epoch"]) == (1, 2):
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the trainer saves after its next step

    with pytest.raises(TrainingStopped):
        train_run(config, run, show_progress=False, echo=lambda _m: None, on_epoch=interrupt_after_second_epoch)
    plan = json.loads((run / "budget.json").read_text())
    assert plan["timed_step_s"] is not None and plan["epochs"][0] > 2
    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["position"]["stage"], saved["position"]["epoch"]) == (1, 2)  # stopped early in the third epoch
    assert saved["config"]["epochs"] == plan["epochs"] == json.loads((run / "config.json").read_text())["epochs"]

    resumed_config, state = load_resume_state(run)
    train_run(resumed_config, run, resume_state=state, show_progress=False, echo=lambda _m: None)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trained = [max((r["epoch"] for r in records if r["stage"] == s), default=0) for s in (1, 2, 3)]
    assert trained == plan["epochs"] and json.loads((run / "budget.json").read_text()) == plan
