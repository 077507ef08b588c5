"""The journal's daily counts, which /drift and the drift gauges read instead of the rows.

Each write adds its rows to counts per UTC day and source: images by majority label and flag, and a
histogram of the distance to the nearest reference image in bins 5 % wide, whose median is within 2.5 % of
the rows' own. Kept in the same transaction as the rows, so the counts are what the rows say.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

DISTANCE_BIN = 1.05  # drift's distance histogram: bins 5 % wide, so its median is within 2.5 % of the true one
ZERO_BIN = -(10**6)  # the bin of a distance of 0 (an image the map already holds)

# What the counts are made from, a row's columns in this order (drift_counts' input; the SQL that reads them).
COUNTED_COLUMNS = ("time", "source", "majority_label", "flag", "nearest_distance")
Inserter = Callable[..., None]  # (cursor, mark, table, columns, rows, tail): a multi-row INSERT


def distance_bin(distance: float) -> int:
    """The drift histogram's bin of a distance to the nearest reference image."""
    return ZERO_BIN if distance <= 0 else math.floor(math.log(distance) / math.log(DISTANCE_BIN))


def bin_centre(index: int) -> float:
    return 0.0 if index == ZERO_BIN else DISTANCE_BIN ** (index + 0.5)


Counts = dict[tuple[str, str, str, str], int]  # (day, source, majority label, flag) -> images
Bins = dict[tuple[str, str, int], int]  # (day, source, distance bin) -> images


def drift_counts(rows: Iterable[tuple[str, str | None, str | None, str, float | None]]) -> tuple[Counts, Bins]:
    """The daily counts of rows given as their COUNTED_COLUMNS (time, source, majority label, flag, nearest
    distance); a missing source or label counts as ''."""
    counts: Counts = {}
    bins: Bins = {}
    for time_text, source, label, flag, distance in rows:
        day, source = time_text[:10], source or ""
        key = (day, source, label or "", flag)
        counts[key] = counts.get(key, 0) + 1
        if distance is not None:
            where = (day, source, distance_bin(float(distance)))
            bins[where] = bins.get(where, 0) + 1
    return counts, bins


def upsert_counts(cursor: Any, mark: str, counts: Counts, bins: Bins, insert: Inserter) -> None:
    """Add to the daily counts, in key order (transactions of several replicas lock the same rows in the same
    order: no deadlock), with `insert` (tsimcne_core/journal.py `insert_rows`)."""
    if counts:
        keys = ("day", "source", "majority_label", "flag")
        rows = [(*key, count) for key, count in sorted(counts.items())]
        tail = f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET images = drift_counts.images + excluded.images"
        insert(cursor, mark, "drift_counts", (*keys, "images"), rows, tail)
    if bins:
        rows = [(*key, count) for key, count in sorted(bins.items())]
        tail = " ON CONFLICT (day, source, bin) DO UPDATE SET images = drift_distances.images + excluded.images"
        insert(cursor, mark, "drift_distances", ("day", "source", "bin", "images"), rows, tail)


def binned_median(bins: Mapping[int, int]) -> float | None:
    """The median of a distance histogram from its bins' centres (within 2.5 % of the true median): with an
    even count split between two bins, the mean of their centres, as the median of the values would be."""
    total = sum(bins.values())
    if not total:
        return None
    ordered = sorted(bins)
    seen = 0
    for position, index in enumerate(ordered):
        seen += bins[index]
        if seen * 2 == total:
            return (bin_centre(index) + bin_centre(ordered[position + 1])) / 2
        if seen * 2 > total:
            return bin_centre(index)
    return None  # not reached
