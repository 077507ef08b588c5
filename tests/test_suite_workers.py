"""The suite's own set-up: pytest-xdist workers must not share cores (tests/conftest.py pins them)."""

from __future__ import annotations

import os

import pytest

from tsimcne_core.cores import usable_cores


def test_each_worker_has_cores_of_its_own() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        pytest.skip("the suite runs in one process (TEST_WORKERS=0 or one core)")
    if (os.cpu_count() or 1) < workers:
        pytest.skip("fewer cores than workers: the workers share them")
    # What torch and every subprocess a test starts size their thread pools to.
    assert usable_cores() <= (os.cpu_count() or 1) // workers
