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

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.errors import UserError

CHECKPOINT_FORMAT = "tsimcne-checkpoint"
CHECKPOINT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync, then rename over `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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
