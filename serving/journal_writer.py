"""The journal's writer thread: group commit, so keeping every placed image costs little.

The model thread hands each placed batch over and goes on with the next one; this thread builds the rows
(PNG of each image at model size, JSON of its record) and commits everything handed over since its last
commit in one transaction: under load, one commit (one fsync) serves several model batches. Each request
waits for the commit of its own rows before it is answered, so a 2xx still means they are kept.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from serving import metrics
from tsimcne_core.journal import JournalError, JournalRow, SqlJournal


class JournalWriter:
    """One thread per worker; `submit(make_rows)` -> a Future that completes when those rows are committed
    (with JournalError when the transaction failed: none of its rows is kept)."""

    def __init__(self, journal: SqlJournal, max_rows: int = 4096) -> None:
        self.journal = journal
        self.max_rows = max_rows
        self._queue: queue.SimpleQueue[tuple[Callable[[], Sequence[JournalRow]], Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def submit(self, make_rows: Callable[[], Sequence[JournalRow]]) -> Future:
        future: Future = Future()
        self._queue.put((make_rows, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending = [item]
            while True:  # everything handed over meanwhile goes into the same transaction
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    self._commit(pending)
                    return
                pending.append(following)
            self._commit(pending)

    def _commit(self, pending: list[tuple[Callable[[], Sequence[JournalRow]], Future]]) -> None:
        rows: list[JournalRow] = []
        built: list[Future] = []
        for make_rows, future in pending:
            try:
                rows += make_rows()
                built.append(future)
            except Exception as exc:  # a fault of ours building one batch's rows fails that batch alone
                future.set_exception(exc)
        if not built:
            return
        started = time.perf_counter()
        try:
            self.journal.write(rows)
        except JournalError as exc:
            metrics.JOURNAL_FAILURES.inc(len(built))
            for future in built:
                future.set_exception(exc)
            return
        metrics.JOURNAL_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.JOURNAL_ROWS.inc(len(rows))
        for future in built:
            future.set_result(None)
