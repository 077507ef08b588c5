"""Where a journal write's time goes (SQLite, issue 26), timed in one process.

First a transaction per model batch (what the service did before the spool): taking the write lock, the
multi-row INSERT, the daily counts, the commit (the WAL write) and the checkpoint (copying the WAL into the
database, with its fsync), per batch of 1, 4 and 16 rows. Then the spool (what it does now): appending a
batch of 4 to the spool (the request's share), and taking a second's worth of batches into the database in
one transaction, with the checkpoint after it (the upkeep thread's share).

    .venv/bin/python -m benchmarks.journal.write_cost
    .venv/bin/python -m benchmarks.journal.write_cost --postgresql    # a PostgreSQL spool's take

Rows as the service writes them for a 28 px bundle (tsimcne_core/journal.py `write_values`); a checkpoint
every 50 batches (about what the service's one-second checkpoint sees at 2,000 rows/s). Run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import numpy as np

from tsimcne_core.journal import COUNTED_AT, ROW_COLUMNS, insert_rows, now, open_journal
from tsimcne_core.journal_drift import drift_counts, upsert_counts

NEIGHBOURS = '[{"id":"pbc/lymphocyte/LY_123456.jpg","index":12345,"label":"lymphocyte","distance":0.12345678901}]'


def row(index: int, image: bytes) -> tuple:
    flag = "artefact" if index % 50 == 0 else "in_distribution"
    return (
        now(), "0123456789abcdef0123456789abcdef", "a" * 64, f"cell-{index}.png", "b" * 64, 1.0, 2.0, flag, 0.3,
        '{"features":0.2,"pixels":0.1,"position":0.3}', "lymphocyte", 0.8, NEIGHBOURS * 5, None, f"scope-{index % 5}",
        None, "[]", 0.1, image, 28, 28, None,
    )  # fmt: skip


def measure(batch: int, batches: int, checkpoint_every: int = 50) -> dict[str, float]:
    """Microseconds a row for each step, over `batches` commits after 300 to warm up."""
    image = np.random.default_rng(0).integers(0, 256, 28 * 28 * 3, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory() as folder:
        journal = open_journal(f"sqlite:///{folder}/journal.db")
        connection = journal._connection()
        rows = [row(i, image) for i in range(batch)]
        for _ in range(300):
            journal.write_values(rows)
        steps = dict.fromkeys(("lock", "insert", "counts", "commit", "checkpoint"), 0.0)
        for number in range(batches):
            marks = [time.perf_counter()]
            journal._begin_write(connection)
            marks.append(time.perf_counter())
            cursor = connection.cursor()
            insert_rows(cursor, "?", "placements", ROW_COLUMNS, rows)
            marks.append(time.perf_counter())
            counted = drift_counts([row[at] for at in COUNTED_AT] for row in rows)
            upsert_counts(cursor, "?", *counted, insert_rows)
            marks.append(time.perf_counter())
            connection.commit()
            marks.append(time.perf_counter())
            if number % checkpoint_every == 0:
                journal.checkpoint()
            marks.append(time.perf_counter())
            for name, start, stop in zip(steps, marks[:-1], marks[1:], strict=True):
                steps[name] += stop - start
        journal.close()
    return {name: 1e6 * seconds / (batches * batch) for name, seconds in steps.items()}


def measure_spool(batches: int = 500, batch: int = 4) -> dict[str, float]:
    """Microseconds a row: appending `batches` batches of `batch` rows to the spool, taking them all in (one
    transaction), and the checkpoint after it; the best of 5 rounds after one to warm up."""
    image = np.random.default_rng(0).integers(0, 256, 28 * 28 * 3, dtype=np.uint8).tobytes()
    rows = [row(i, image) for i in range(batch)]
    best = {"append": float("inf"), "take": float("inf"), "checkpoint": float("inf")}
    with tempfile.TemporaryDirectory() as folder:
        journal = open_journal(f"sqlite:///{folder}/journal.db")
        for round_ in range(6):
            marks = [time.perf_counter()]
            for _ in range(batches):
                journal.keep(rows)
            marks.append(time.perf_counter())
            journal.take_spool()
            marks.append(time.perf_counter())
            journal.checkpoint()
            marks.append(time.perf_counter())
            if round_:
                for name, start, stop in zip(best, marks[:-1], marks[1:], strict=True):
                    best[name] = min(best[name], 1e6 * (stop - start) / (batches * batch))
        journal.close()
    return best


def _server_cpu_seconds() -> float:
    """CPU time of every PostgreSQL server process on this machine (the throwaway one is the only one)."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def measure_postgres_spool(batches: int = 2500, batch: int = 4) -> dict[str, float]:
    """Microseconds a row of taking `batches` spooled batches of `batch` rows into a throwaway PostgreSQL in
    one transaction (the upkeep thread's share with setting journal_spool): this process's CPU and the
    server's (read from its processes: 10 ms ticks, so 10,000 rows a round), the best of 5 rounds after one."""
    from benchmarks.harness.postgres import new_database, start_postgres

    image = np.random.default_rng(0).integers(0, 256, 28 * 28 * 3, dtype=np.uint8).tobytes()
    rows = [row(i, image) for i in range(batch)]
    best = {"take, service CPU": float("inf"), "take, server CPU": float("inf")}
    server = start_postgres()
    try:
        with tempfile.TemporaryDirectory() as folder:
            journal = open_journal(new_database(server), spool=folder)
            for round_ in range(6):
                for _ in range(batches):
                    journal.keep(rows)
                client, database = time.process_time(), _server_cpu_seconds()
                taken = journal.take_spool()
                client, database = time.process_time() - client, _server_cpu_seconds() - database
                if round_:
                    best["take, service CPU"] = min(best["take, service CPU"], 1e6 * client / taken)
                    best["take, server CPU"] = min(best["take, server CPU"], 1e6 * database / taken)
            journal.close()
    finally:
        server.stop()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument(
        "--postgresql", action="store_true", help="only the take of a PostgreSQL spool (a throwaway server)"
    )
    args = parser.parse_args()
    if args.postgresql:
        cost = measure_postgres_spool()
        print("| PostgreSQL spool: take (10,000 rows a transaction), service CPU | server CPU | all, µs a row |")
        print("|---|---|---|")
        print(f"| {cost['take, service CPU']:.1f} | {cost['take, server CPU']:.1f} | **{sum(cost.values()):.1f}** |")
        return
    print("| rows a commit | lock | insert | counts | commit | checkpoint | all, µs a row |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 4, 16):
        cost = measure(batch, max(args.batches // batch, 100))
        cells = " | ".join(f"{value:.1f}" for value in cost.values())
        print(f"| {batch} | {cells} | **{sum(cost.values()):.1f}** |")
    spool = measure_spool()
    print("\n| spool: append (batches of 4) | take (2,000 rows a transaction) | checkpoint | all, µs a row |")
    print("|---|---|---|---|")
    print(" | ".join(["", *(f"{value:.1f}" for value in spool.values()), f"**{sum(spool.values()):.1f}** |"]).strip())


if __name__ == "__main__":
    main()
