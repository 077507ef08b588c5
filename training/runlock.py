"""One training process per run folder.

Two processes training the same run (a `--resume` started while the first still runs, or an
`--overwrite` of a live run) would write over each other's checkpoints. An advisory lock beside the
folder (not in it, so `--overwrite` cannot delete it) refuses the second one. training/run_training.py
closes the lock when training ends, however it ends (so one Python process can stop and resume a run),
and the kernel drops it when its holder exits, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from tsimcne_core.errors import UserError


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def hold_run_lock(run_dir: Path) -> IO[str]:
    """Take the run's lock; it is held until the returned file is closed (or the process exits)."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(
            f"{run_dir} is being trained by another process (pid {holder}); wait for it to finish or stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
