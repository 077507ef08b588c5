"""Errors that carry a message for the user. The library raises them; the CLI prints the message without a
traceback and exits 2 (TrainingStopped: 130), and Python callers catch them like any exception."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class UserError(Exception):
    """Bad input or a refused operation; the message says what was wrong and how to fix it."""


class DataError(UserError):
    """A dataset that cannot be read: names the file, field or limit that failed."""


class UnknownNameError(UserError, KeyError):
    """An unknown recipe, augmentation preset or switch; the message lists the known ones. (Also a
    KeyError: a name looked up in a table that does not have it.)"""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingStopped(Exception):
    """Training stopped on Ctrl-C / SIGTERM (or a notebook's interrupt) after saving a checkpoint; the
    run continues where it stopped with `TSimCNE.resume(run_dir)` or `tsimcne train --resume run_dir`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        super().__init__(
            f"training stopped; the checkpoint is saved: continue with TSimCNE.resume({str(self.run_dir)!r}) "
            f"or `tsimcne train --resume {self.run_dir}`"
        )


def invalid_settings(exc: ValidationError) -> UserError:
    """A pydantic validation error as one line naming each bad setting and the rule."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return UserError(f"invalid settings: {problems}")
