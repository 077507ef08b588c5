"""Epochs from a wall-clock budget: `tsimcne train --time-budget 30m`.

How much a CPU trains in 30 minutes differs six-fold between machines (measured: the same step on an
AVX512-BF16 EPYC in bf16 and on an AVX2-only EPYC in fp32). A fixed epoch count is either too short for
the fast machine or hours long on the slow one; a budget gives every machine the best map it can draw
in the time the user has. Before training, a few real steps of each kind are timed on throwaway copies
of the network (so the run itself is untouched and stays exactly resumable), and the budget is split
between the stages by fixed shares of time. Those few steps run slower than the steady state (measured:
2.6 s against 1.9 s a step, so a 10-minute budget trained for 6.4), so the plan is made once more after
the first epoch of stage 1 from that epoch's steady step time (`replan`). A machine's speed also changes
during a run (another job starts on the next core: measured, a 120-minute budget trained 126 minutes), so
before stages 2 and 3 the stages still to run share what is left of the budget, at the speed of the last
epoch (`replan_remaining`): stage 1's drift is absorbed by the later stages instead of overrunning. The
epochs chosen are written into config.json (and the checkpoint); `--resume` continues with them, whatever
the machine is doing then (a resumed run does not plan again: the time spent before the stop is history).

Shares (`STAGE_SHARES`): 70 % stage 1, 5 % stage 2, 25 % stage 3. The paper's schedule spends about
69 / 1 / 30 % of its compute that way (1000 / 50 / 450 epochs; a stage-2 epoch costs about a third);
stage 2 gets a little more here because a handful of its epochs is what places the clusters at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from tsimcne_core.errors import UserError

if TYPE_CHECKING:
    pass

STAGE_SHARES = (0.70, 0.05, 0.25)
SAFETY = 0.97  # leave 3 % for checkpoints, the final embedding and timing noise


@dataclass(frozen=True)
class StageReplan:
    """One re-plan before a later stage: how much training time had been spent and what it then planned."""

    stage: int
    elapsed_s: float
    step_s: tuple[float, float]
    epochs: tuple[int, int, int]


@dataclass(frozen=True)
class BudgetPlan:
    budget_s: float
    step_s: tuple[float, float]  # measured seconds per full step (stages 1 and 3) and per stage-2 step
    steps_per_epoch: int
    epochs: tuple[int, int, int]
    calibration_s: float
    timed_step_s: tuple[float, float] | None = None  # before training; set once re-planned after epoch 1
    stage_replans: tuple[StageReplan, ...] = ()  # before stages 2 and 3 (`replan_remaining`)

    @property
    def replanned(self) -> bool:
        return self.timed_step_s is not None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def usable_s(self) -> float:
        """Training seconds the stages may fill: the budget less the timing before training and SAFETY."""
        return (self.budget_s - self.calibration_s) * SAFETY

    def describe(self) -> str:
        per_epoch = epoch_seconds(self.step_s, self.steps_per_epoch)
        planned = sum(e * seconds for e, seconds in zip(self.epochs, per_epoch, strict=True))
        return (
            f"time budget {format_budget(self.budget_s)}: {self.step_s[0]:.2f} s per training step, "
            f"{self.step_s[1]:.2f} s per stage-2 step -> epochs {'/'.join(map(str, self.epochs))} "
            f"(~{format_budget(planned)} of training)"
        )

    def describe_replan(self) -> str:
        assert self.timed_step_s is not None
        return (
            f"time budget re-planned after the first epoch: {self.step_s[0]:.2f} s per step "
            f"(timed before training: {self.timed_step_s[0]:.2f} s) -> epochs {'/'.join(map(str, self.epochs))}"
        )

    def describe_stage_replan(self) -> str:
        last = self.stage_replans[-1]
        left = self.usable_s - last.elapsed_s
        return (
            f"time budget re-planned before stage {last.stage}: {format_budget(max(0.0, left))} left for the "
            f"stages to come, {last.step_s[0]:.2f} s per step now -> epochs {'/'.join(map(str, self.epochs))}"
        )

    @property
    def stage_step_s(self) -> tuple[float, float, float]:
        return stage_step_seconds(self.step_s)


def stage_step_seconds(step_s: tuple[float, float]) -> tuple[float, float, float]:
    """Seconds a step of stages 1, 2 and 3 from (full step, stage-2 step): stage 3 trains the whole network."""
    return (step_s[0], step_s[1], step_s[0])


def epoch_seconds(step_s: tuple[float, float], steps_per_epoch: int) -> tuple[float, ...]:
    """Seconds an epoch of each stage takes."""
    return tuple(seconds * steps_per_epoch for seconds in stage_step_seconds(step_s))


def parse_budget(text: str | None) -> float | None:
    """'30m', '2h', '90s', '1h30m' or a bare number of minutes -> seconds."""
    if text is None:
        return None
    value = text.strip().lower()
    try:
        if value.replace(".", "", 1).isdigit():
            seconds = float(value) * 60
        else:
            seconds, number = 0.0, ""
            for char in value:
                if char.isdigit() or char == ".":
                    number += char
                elif char in "hms" and number:
                    seconds += float(number) * {"h": 3600, "m": 60, "s": 1}[char]
                    number = ""
                else:
                    raise ValueError(char)
            if number:
                raise ValueError(number)
    except ValueError:
        raise UserError(f"--time-budget {text!r}: give a duration such as 30m, 2h, 1h30m or 90s") from None
    if seconds <= 0:
        raise UserError(f"--time-budget {text!r}: must be positive")
    return seconds


def format_budget(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes / 60:.1f} h" if minutes >= 90 else f"{minutes:.1f} min"


def epochs_for_budget(budget_s: float, step_s: tuple[float, float], steps_per_epoch: int) -> tuple[int, int, int]:
    """Split `budget_s` by STAGE_SHARES; every stage gets at least one epoch or the budget is refused."""
    per_epoch = epoch_seconds(step_s, steps_per_epoch)
    minimum = sum(per_epoch)
    if budget_s * SAFETY < minimum:
        raise UserError(
            f"a time budget of {format_budget(budget_s)} is too short: one epoch of each stage takes "
            f"~{format_budget(minimum)} here; give a longer --time-budget or fewer/smaller images"
        )
    usable = budget_s * SAFETY
    first, second, third = (
        max(1, math.floor(usable * share / seconds)) for share, seconds in zip(STAGE_SHARES, per_epoch, strict=True)
    )
    return first, second, third


def replan(plan: BudgetPlan, measured_step_s: float) -> BudgetPlan:
    """`plan` with stage 1's steady step time measured in its first epoch; the stage-2 step time is scaled
    by the same factor (its few timed steps err the same way). The first epoch is part of the new stage-1
    epochs, so the whole run still fits the budget; it never plans fewer than one epoch a stage."""
    scale = measured_step_s / plan.step_s[0]
    step_s = (measured_step_s, plan.step_s[1] * scale)
    try:
        epochs = epochs_for_budget(plan.budget_s - plan.calibration_s, step_s, plan.steps_per_epoch)
    except UserError:  # slower than timed: the shortest run there is
        epochs = (1, 1, 1)
    return replace(plan, step_s=step_s, epochs=epochs, timed_step_s=plan.step_s)


def replan_remaining(plan: BudgetPlan, stage: int, elapsed_s: float, measured_step_s: float) -> BudgetPlan:
    """Before `stage` (2 or 3): the stages from `stage` on share what is left of the budget after `elapsed_s`
    seconds of training, in the proportions of STAGE_SHARES, at the speed measured in the last epoch run
    (`measured_step_s`, a step of stage `stage - 1`; the other kind of step is scaled by the same factor).
    Earlier stages keep their epochs; every stage still to run gets at least one epoch."""
    if stage not in (2, 3):
        raise ValueError(f"stage must be 2 or 3, not {stage}")
    scale = measured_step_s / plan.stage_step_s[stage - 2]
    step_s = (plan.step_s[0] * scale, plan.step_s[1] * scale)
    per_epoch = epoch_seconds(step_s, plan.steps_per_epoch)
    left = plan.usable_s - elapsed_s
    shares_left = sum(STAGE_SHARES[stage - 1 :])
    epochs = list(plan.epochs)
    for index in range(stage - 1, 3):
        epochs[index] = max(1, math.floor(max(0.0, left) * STAGE_SHARES[index] / shares_left / per_epoch[index]))
    new_epochs = (epochs[0], epochs[1], epochs[2])
    record = StageReplan(stage, round(elapsed_s, 2), step_s, new_epochs)
    return replace(plan, step_s=step_s, epochs=new_epochs, stage_replans=(*plan.stage_replans, record))
