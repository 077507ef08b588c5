"""Warmup + cosine per step, without the reference's lr = 0 epoch and with warmup capped for short stages."""

from __future__ import annotations

import itertools

import pytest

from training.config import TrainConfig
from training.schedule import effective_warmup_epochs, learning_rate


def test_warmup_starts_above_zero_and_peaks_at_base() -> None:
    lrs = [learning_rate(t, 100, 10, 0.1) for t in range(100)]
    assert lrs[0] == pytest.approx(0.01)
    assert max(lrs) == pytest.approx(0.1) and lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.1)
    assert all(x > 0 for x in lrs[:-1]) and lrs[-1] < 0.1 * 1e-2
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_no_warmup_starts_at_base() -> None:
    assert learning_rate(0, 50, 0, 0.06) == pytest.approx(0.06)


def test_warmup_capped_at_a_tenth_of_the_stage() -> None:
    assert effective_warmup_epochs(10, 1000) == 10
    assert effective_warmup_epochs(10, 40) == 4
    assert effective_warmup_epochs(10, 5) == 0
    assert effective_warmup_epochs(0, 50) == 0


def test_reference_learning_rates() -> None:
    config = TrainConfig(data="synthetic")
    assert config.lr_for_stage(1, 1024) == pytest.approx(0.12)
    assert config.lr_for_stage(2, 1024) == pytest.approx(0.12)
    assert config.lr_for_stage(3, 1024) == pytest.approx(1.2e-4)
    assert config.lr_for_stage(1, 512) == pytest.approx(0.06)


def test_cpu_recipe_doubles_the_lr_per_batch_size_and_an_explicit_lr_wins() -> None:
    from training.config import build_config

    cpu = build_config("cpu", {"data": "synthetic"})
    assert cpu.lr_for_stage(1, 512) == pytest.approx(0.12) and cpu.lr_for_stage(3, 512) == pytest.approx(0.012)
    assert build_config("cpu", {"data": "synthetic", "batch_size": 256}).lr_for_stage(1, 256) == pytest.approx(0.06)
    assert build_config("cpu", {"data": "synthetic", "base_lr": 0.05}).lr_for_stage(1, 512) == pytest.approx(0.05)
    old_run = TrainConfig.model_validate({"data": "synthetic", "batch_size": 512})  # a config.json from before
    assert old_run.lr_for_stage(1, 512) == pytest.approx(0.06)
