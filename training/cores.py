"""How many CPU cores this process may use: torch-free, so decoding and benchmark drivers can ask too."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (taskset, a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
