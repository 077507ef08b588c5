"""The journal's writer thread: group commit, so keeping every placed image costs the model little.

The model thread hands each placed batch's rows over (a function that builds them) and goes on with the
next batch; this thread gathers batches (see JournalWriter) and commits them in one transaction. A request
is answered only once its rows are committed (its asyncio future is settled from here, once a commit, with
one call into the event loop), so a 2xx still means they are kept. Used for PostgreSQL without a spool,
whose commit (a network round trip and the server's fsync) would otherwise hold the model for every batch; a
spooling journal (SQLite; PostgreSQL with journal_spool) appends each batch to its spool in the model thread
(one write call: tsimcne_core/journal_spool.py), where this hand-over would cost more than the append
(benchmarks/README.md, section 16).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence

from serving import metrics
from tsimcne_core.journal import JournalError, SqlJournal

RowMaker = Callable[[], Sequence[tuple]]  # builds a batch's rows (tsimcne_core.journal.ROW_COLUMNS values)
GATHER_S = 0.005  # the longest a batch waits for others to share its transaction
GATHER_SLICE_S = 0.0005  # how often a gathering writer looks again whether anyone is still on the way
GATHER_REQUESTS = 256


def keep_rows(journal: SqlJournal, rows: Sequence[tuple], batches: int = 1) -> None:
    """`rows` kept durably (`SqlJournal.keep`: the spool, or a PostgreSQL transaction), counted in the
    journal's metrics (rows, seconds); a JournalError is counted as `batches` failed model batches and raised
    again."""
    started = time.perf_counter()
    try:
        journal.keep(rows)
    except JournalError:
        metrics.JOURNAL_FAILURES.inc(batches)
        raise
    metrics.JOURNAL_WRITE_SECONDS.observe(time.perf_counter() - started)
    metrics.JOURNAL_ROWS.inc(len(rows))


class JournalWriter:
    """One thread per worker. `submit(make_rows, waiters)`: the asyncio futures `waiters` get None once those
    rows are committed, or the JournalError that failed their transaction (none of its rows is kept then).

    A transaction costs the service ~250 µs of CPU whatever it holds (psycopg's statements and round trips:
    benchmarks/README.md, section 16), so the writer gathers: it commits once no other request is on its way
    to it (`joining()`: queued for the model, its rows not handed over yet), when GATHER_S has passed since
    the first batch it holds, or at GATHER_REQUESTS requests, whichever comes first; a lone request is
    committed at once."""

    def __init__(self, journal: SqlJournal, joining: Callable[[], int] = lambda: 0) -> None:
        self.journal = journal
        self.joining = joining
        self._queue: queue.SimpleQueue[tuple[RowMaker, list[asyncio.Future]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def submit(self, make_rows: RowMaker, waiters: list[asyncio.Future]) -> None:
        self._queue.put((make_rows, waiters))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending = [item]
            waiting = len(item[1])
            deadline = time.monotonic() + GATHER_S
            while True:  # what is handed over meanwhile goes into the same transaction
                left = deadline - time.monotonic()
                gather = left > 0 and waiting < GATHER_REQUESTS and self.joining() > 0
                try:
                    if gather:
                        following = self._queue.get(timeout=min(left, GATHER_SLICE_S))
                    else:
                        following = self._queue.get_nowait()
                except queue.Empty:
                    if gather:
                        continue  # look again: still someone on the way, and time left?
                    break
                if following is None:
                    self._commit(pending)
                    return
                pending.append(following)
                waiting += len(following[1])
            self._commit(pending)

    def _commit(self, pending: list[tuple[RowMaker, list[asyncio.Future]]]) -> None:
        rows: list[tuple] = []
        outcomes: list[tuple[asyncio.Future, BaseException | None]] = []
        built: list[asyncio.Future] = []
        batches = 0
        for make_rows, waiters in pending:
            try:
                rows += make_rows()
                built += waiters
                batches += 1
            except Exception as exc:  # a fault of ours building one batch's rows fails that batch alone
                outcomes += [(waiter, exc) for waiter in waiters]
        failure: JournalError | None = None
        if built:
            try:
                keep_rows(self.journal, rows, batches)
            except JournalError as exc:
                failure = exc
        outcomes += [(waiter, failure) for waiter in built]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, BaseException | None]]] = {}
        for waiter, outcome in outcomes:  # one call into each event loop a commit
            by_loop.setdefault(waiter.get_loop(), []).append((waiter, outcome))
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(_settle, settled)


def _settle(outcomes: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    """In the event loop: each request learns its rows' fate (a request that gave up meanwhile is skipped)."""
    for waiter, failure in outcomes:
        if waiter.done():
            continue
        if failure is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failure)
