"""The flag's threshold at the conformal rank, and the interval of its true false-flag rate, checked against
the rates realised on real images (PBC blood cells) over many random calibration / test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.conformal import conformal_rank, false_flag_interval, images_for_interval, threshold_at_rank
from tsimcne_core.flag_evidence import PixelModel, channel_statistics

PBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodcells" / "pbc_28.npz"


def test_the_rank_and_the_interval_for_500_images_at_one_percent() -> None:
    assert conformal_rank(500, 0.01) == 496  # 5 of 500 above: 5 / 501 = 0.998 % expected
    assert conformal_rank(99, 0.01) == 99  # (n + 1)(1 - target) = 99 exactly: the largest score
    assert conformal_rank(50, 0.01) == 50  # too few to meet 1 %: the largest score, expected 1 / 51
    interval = false_flag_interval(500, 0.01)
    assert interval.expected == pytest.approx(5 / 501)
    assert interval.low == pytest.approx(0.00394, abs=5e-5) and interval.high == pytest.approx(0.01821, abs=5e-5)
    assert false_flag_interval(50, 0.01).expected == pytest.approx(1 / 51)
    needed = images_for_interval(0.01)
    tight = false_flag_interval(needed, 0.01)
    assert tight.low >= 0.0075 and tight.high <= 0.0125 and 4000 < needed < 5000
    assert "cannot meet the target" in false_flag_interval(50, 0.01).describe(0.01)
    assert "would put it within" not in tight.describe(0.01)


@pytest.fixture(scope="module")
def pbc_scores() -> np.ndarray:
    """A score of every real PBC cell: its pixel statistics' Mahalanobis distance (the flag's pixel part), the
    model fitted on 3,000 other cells, so the remaining 14,092 scores are exchangeable."""
    if not PBC.is_file():
        pytest.skip(f"{PBC} not found")
    with np.load(PBC, allow_pickle=False) as data:
        images = data["images"]
    order = np.random.default_rng(0).permutation(len(images))
    batch = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    statistics = channel_statistics(batch)
    model = PixelModel.fit(statistics[order[:3000]])
    return model.distance(statistics[order[3000:]])


def test_realised_false_flag_rates_over_random_splits_match_the_interval(pbc_scores) -> None:
    """1,000 random splits of the real scores: 500 calibrate, the other 13,592 are the clean images to come.
    The conformal threshold flags 1 % of them on average, and 90 % of the splits' rates lie in the interval
    (less the test set's own binomial noise); the plain 99 % quantile flags ~1.2 %."""
    rng = np.random.default_rng(1)
    ordered = np.sort(pbc_scores)
    interval = false_flag_interval(500, 0.01)
    realised, plain = [], []
    for _ in range(1000):
        picked = rng.choice(len(pbc_scores), 500, replace=False)
        calibration = pbc_scores[picked]
        test_size = len(pbc_scores) - 500

        def rate(threshold: float, calibration=calibration, test_size=test_size) -> float:
            above_all = len(ordered) - np.searchsorted(ordered, threshold, side="right")
            return (above_all - int((calibration > threshold).sum())) / test_size

        realised.append(rate(threshold_at_rank(calibration, 0.01)[0]))
        plain.append(rate(float(np.quantile(calibration, 0.99))))
    realised = np.array(realised)
    assert np.mean(realised) == pytest.approx(interval.expected, abs=0.0008)
    inside = np.mean((realised >= interval.low) & (realised <= interval.high))
    assert 0.85 <= inside <= 0.95, inside
    assert np.mean(plain) > np.mean(realised) + 0.001  # the plain quantile's bias, which the rank removes
