"""Atomic checkpoint files and the run folder layout.

runs/<name>/
  config.json           the TrainConfig of the run
  log.jsonl             one line per finished epoch (stage, epoch, loss, lr, img/s, seconds)
  stage1.pt stage2.pt stage3.pt   the state at the end of each finished stage
  last.pt               the newest state (periodic, stage end, or Ctrl-C); what --resume reads
  embedding.npz         2-D coordinates of the training images (after stage 3)

A checkpoint holds only tensors and plain Python values, so it loads with `weights_only=True`: weights,
optimiser state, the position to continue from (stage, epoch, step within the epoch), the config,
the dataset fingerprint and torch's RNG state. Every file is written to a temporary name in the same
folder, flushed to disk and renamed, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tsimcne_core.errors import UserError
from tsimcne_core.files import atomic_write

CHECKPOINT_FORMAT = "tsimcne-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; a missing, foreign or corrupt file gives a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint file there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors: all mean "not a checkpoint we can read"
        raise UserError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a tsimcne checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{path}: checkpoint version {state.get('version')} is not supported (need {CHECKPOINT_VERSION})"
        )
    return state
