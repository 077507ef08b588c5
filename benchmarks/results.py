"""Benchmark results as files: the figures with the machine, date and command that made them.

Every benchmark writes its result with `record`: JSON, written atomically, with `command` (how to run it
again), `started` / `finished` (UTC) and `machine` (CPU, usable cores, memory, kernel, Python, the versions
that matter to it) beside its own fields. Scratch results go to benchmarks/scratch/ (ignored); the ones a
section of benchmarks/README.md cites are kept in benchmarks/results/, and `python -m benchmarks.tables`
renders their tables into the README from those files, so a table cannot drift from its figures.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(__file__).resolve().parent / "scratch"  # ignored by git
STARTED = datetime.now(UTC)  # when the benchmark began: it imports this module first


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(packages: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """What a figure depends on besides the code: the CPU, the cores this process may use, memory, kernel,
    Python and the given packages' versions (None where not installed)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu_model(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        **extra,
    }


def command_line() -> str:
    """How this benchmark was run, as `python -m benchmarks.<module> ARGS`."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([program, *sys.argv[1:]])


def record(
    payload: dict[str, Any],
    out: Path,
    *,
    started: datetime | None = None,
    packages: Sequence[str] = ("numpy", "torch", "onnxruntime", "bentoml", "faiss-cpu"),
    **extra: Any,
) -> Path:
    """Write `payload` to `out` with the command, times and machine it was measured with (atomically);
    these four fields replace any of the same name in `payload`."""
    stamp = {
        "command": command_line(),
        "started": (started or STARTED).isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(packages, **extra),
    }
    report = {**stamp, **{key: value for key, value in payload.items() if key not in stamp}}
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(out.name + ".tmp")
    scratch.write_text(json.dumps(report, indent=1) + "\n")
    scratch.replace(out)
    return out
