"""Learning-rate schedule: linear warmup then cosine decay, evaluated per optimisation step.

The reference steps a per-epoch table whose first warmup entry is 0 (a whole epoch at lr = 0) and
always warms up for 10 epochs, however short the stage. Here (docs/deviations.md):
- the lr is interpolated per step, so step t of T uses
      warmup:  eta * (t + 1) / W                      for t < W  (never 0)
      cosine:  eta * 0.5 * (1 + cos(pi * (t - W) / (T - W)))
- the warmup length is min(requested, 10 % of the stage) epochs, so a 20-epoch stage warms up for 2.
"""

from __future__ import annotations

import math


def effective_warmup_epochs(requested: int, stage_epochs: int) -> int:
    """Reference warmup (10 epochs) capped at a tenth of the stage."""
    return max(0, min(requested, stage_epochs // 10))


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """lr at optimisation step `step` (0-based) of a stage with `total_steps` steps."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
