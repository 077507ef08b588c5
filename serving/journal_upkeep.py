"""The journal's upkeep in each worker: the spool taken in (SQLite's WAL also checkpointed), today's drift as
Prometheus gauges, and pruning by age, off the request path.

A thread of its own (its own database connection) wakes every second: it takes what the workers spooled into
the database in one transaction, and checkpoints an SQLite journal's WAL (tsimcne_core/journal.py
`SqlJournal.maintain`), every `refresh_s` reads today's daily counts (a
few rows, whatever the journal's size) into the drift gauges, and, in the worker told to prune, deletes
placements older than the retention setting once an hour. Every replica reads the same journal, so the
gauges agree across workers and replicas (Prometheus takes the most recent or the max).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import UTC, datetime, timedelta

from serving import metrics
from tsimcne_core.journal import JournalError, SqlJournal

logger = logging.getLogger("tsimcne.journal")
MAX_SOURCES = 20  # gauge label values: the busiest sources of the day, the rest summed as "other"
PRUNE_EVERY_S = 3600.0
CHECKPOINT_EVERY_S = 1.0


class JournalUpkeep:
    def __init__(
        self, journal: SqlJournal, refresh_s: float, retention_days: float | None = None, prunes: bool = False
    ) -> None:
        self.journal = journal
        self.refresh_s = refresh_s
        self.retention_days = retention_days if prunes else None
        self._stop = threading.Event()
        self._pruned_at = -math.inf
        self._sources: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="journal-upkeep", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        refreshed = -math.inf
        while True:
            try:
                self.journal.maintain()
                if time.monotonic() - refreshed >= self.refresh_s:
                    self.refresh_gauges()
                    refreshed = time.monotonic()
                self._prune_when_due()
            except JournalError as exc:  # logged and tried again; /embed's own writes report failures as 503
                logger.warning("journal upkeep: %s", exc)
            except Exception:  # a fault of ours: logged with its traceback, and the thread goes on
                logger.exception("journal upkeep failed; trying again in a second")
            if self._stop.wait(CHECKPOINT_EVERY_S):
                return

    def refresh_gauges(self) -> None:
        """Today's (UTC) images, flagged share and median nearest distance per source into the gauges."""
        today = datetime.now(UTC).date().isoformat()
        days = self.journal.drift(since=today, until=today)
        days.sort(key=lambda day: -day["images"])
        shown = {(day["source"] or "none"): day for day in days[:MAX_SOURCES]}
        rest = days[MAX_SOURCES:]
        if rest:
            images = sum(day["images"] for day in rest)
            flagged = sum(day["flagged"] for day in rest)
            shown["other"] = {"images": images, "flagged": flagged, "median_nearest_distance": None}
        for source in self._sources - shown.keys():  # a source of yesterday: nothing today yet
            metrics.set_drift(source, 0, None, None)
        for source, day in shown.items():
            share = day["flagged"] / day["images"] if day["images"] else None
            metrics.set_drift(source, day["images"], share, day["median_nearest_distance"])
        self._sources |= shown.keys()

    def _prune_when_due(self) -> None:
        if self.retention_days is None or time.monotonic() - self._pruned_at < PRUNE_EVERY_S:
            return
        before = (datetime.now(UTC) - timedelta(days=self.retention_days)).isoformat(timespec="microseconds")
        gone = self.journal.prune(before)
        self._pruned_at = time.monotonic()
        logger.info(
            "journal retention (%g days): deleted %d placements made before %s", self.retention_days, gone, before
        )
