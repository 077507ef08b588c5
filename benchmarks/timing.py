"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(passes: int, run: Callable[[], object]) -> float:
    """The fastest of `passes` calls of `run`, in seconds (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
