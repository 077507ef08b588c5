"""Position-based out-of-distribution score: calibrated false-flag rate, far points flagged."""

from __future__ import annotations

import numpy as np
import pytest

from tsimcne_core.flag import calibrate_position, position_scores
from tsimcne_core.neighbours import kth_neighbour_distance


def test_kth_neighbour_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    points, reference = rng.normal(size=(7, 2)), rng.normal(size=(50, 2))
    brute = np.sort(np.linalg.norm(points[:, None] - reference[None], axis=2), axis=1)[:, 2]
    assert np.allclose(kth_neighbour_distance(points, reference, 3, budget=3 * 50 * 8), brute)


def test_false_flag_rate_on_new_in_distribution_points_is_near_target() -> None:
    rng = np.random.default_rng(1)
    reference = np.concatenate([rng.normal(0, 1, (3000, 2)), rng.normal(8, 1, (3000, 2))])
    calibration = calibrate_position(reference, target_rate=0.05)
    fresh = np.concatenate([rng.normal(0, 1, (2000, 2)), rng.normal(8, 1, (2000, 2))])
    _, flagged = position_scores(fresh, reference, calibration)
    assert 0.01 <= flagged.mean() <= 0.075  # at most 1.5x the target, and not vacuous


def test_points_far_from_the_map_are_flagged_and_scale_free() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, (2000, 2))
    for scale in (1.0, 50.0):
        calibration = calibrate_position(reference * scale)
        scores, flagged = position_scores(np.array([[0.0, 0.0], [6.0, 6.0]]) * scale, reference * scale, calibration)
        assert not flagged[0] and flagged[1] and scores[1] > 3


def test_bad_target_rate() -> None:
    with pytest.raises(ValueError, match="target_rate"):
        calibrate_position(np.zeros((10, 2)), target_rate=1.5)
