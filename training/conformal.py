"""How many clean images the flag will really flag, given the calibration images it was set on.

The flag's threshold is one order statistic of the scores of n calibration images. For a new clean image
exchangeable with them, the share of clean images above the r-th smallest of n scores (the realised
false-flag rate F, fixed once the calibration images are drawn) follows Beta(n + 1 - r, r) whatever the
scores' distribution (the order statistics of a uniform sample). So:
- the threshold is the score of rank r = ceil((n + 1)(1 - target)) (the conformal rank): then the expected F,
  (n + 1 - r) / (n + 1), is at most the target; the plain (1 - target) quantile of the n scores flags more
  (about (target n + 1) / (n + 1): 1.2 % for 1 % of 500);
- F itself lies in the central `level` interval of that Beta distribution: with 500 images and a 1 % target,
  90 % of calibration sets give a true rate between 0.39 % and 1.82 %, which a user should know;
- the number of images that puts that interval within +-25 % of the target is what `images_for_interval`
  finds (about 4,600 for 1 %).
Fewer than 1 / target - 1 images cannot meet the target (the largest score still leaves 1 / (n + 1) above).
"""

from __future__ import annotations

import math

from scipy.stats import beta

from tsimcne_core.calibration import FalseFlagInterval

LEVEL = 0.9  # the interval's probability
TIGHT = 0.25  # "tight": the interval within +-25 % of the target


def conformal_rank(images: int, target_rate: float) -> int:
    """The 1-based rank of the calibration score used as the threshold (at most `images`)."""
    if images < 1 or not 0 < target_rate < 1:
        raise ValueError(f"need images >= 1 and 0 < target_rate < 1, got {images}, {target_rate}")
    return min(images, math.ceil((images + 1) * (1 - target_rate) - 1e-9))


def rate_distribution(images: int, rank: int):
    """The distribution of the realised false-flag rate for a threshold at `rank` of `images` scores."""
    return beta(images + 1 - rank, rank)


def false_flag_interval(images: int, target_rate: float, level: float = LEVEL) -> FalseFlagInterval:
    """The rate the flag will really have, for `images` calibration images at `target_rate` (see the module)."""
    rank = conformal_rank(images, target_rate)
    rate = rate_distribution(images, rank)
    low, high = (float(x) for x in rate.ppf([(1 - level) / 2, (1 + level) / 2]))
    return FalseFlagInterval(
        level=level,
        low=low,
        high=high,
        expected=float(rate.mean()),
        rank=rank,
        images=images,
        images_for_tight=images_for_interval(target_rate, TIGHT, level),
        tight=TIGHT,
    )


def _is_tight(images: int, target_rate: float, relative: float, level: float) -> bool:
    rate = rate_distribution(images, conformal_rank(images, target_rate))
    low, high = rate.ppf([(1 - level) / 2, (1 + level) / 2])
    return bool(low >= target_rate * (1 - relative) and high <= target_rate * (1 + relative))


def images_for_interval(target_rate: float, relative: float = TIGHT, level: float = LEVEL) -> int:
    """The fewest calibration images whose `level` interval lies within target x (1 +- relative) (the
    interval narrows with the images, apart from the steps of the rank: searched by doubling, then bisection)."""
    high = max(16, math.ceil(1 / target_rate))
    while not _is_tight(high, target_rate, relative, level):
        high *= 2
        if high > 10**9:
            raise ValueError(f"no calibration set of under 10^9 images reaches +-{relative:.0%} at {target_rate}")
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        if _is_tight(middle, target_rate, relative, level):
            high = middle
        else:
            low = middle
    return high


def threshold_at_rank(scores, target_rate: float) -> tuple[float, FalseFlagInterval]:
    """The conformal threshold of calibration `scores` (the score of rank `conformal_rank`) and its interval."""
    import numpy as np

    values = np.sort(np.asarray(scores, dtype=np.float64))
    interval = false_flag_interval(len(values), target_rate)
    return float(values[interval.rank - 1]), interval
