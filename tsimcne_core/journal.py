"""The journal: every placed image, kept durably, so the service remembers what came in and where it landed.

One row per placed image: when, the request, the bundle, the file's name and sha256, x, y, flag, score,
evidence, majority label and share, neighbours, duplicate_of, the image at model size (raw RGB pixels: no
encoding on the way in; PNG when it is read) and the client's metadata (source, sample id, tags). Rows are
kept before their requests are answered (SQLite, and PostgreSQL with a spool folder: appended to the spool,
tsimcne_core/journal_spool.py, and taken into the database within a second; PostgreSQL without one:
committed), so a 2xx means they are kept; a journal that cannot be written fails the request (the service
answers 503 naming it), never a 200 without its rows.

The uploaded file itself is kept too when the service is told to (setting journal_originals). Each write also
adds to the daily counts (tsimcne_core/journal_drift.py), so /drift reads days, not rows, at any size; what
clients send is checked in tsimcne_core/journal_input.py.

`sqlite:///PATH` is the embedded default (WAL; synchronous per the journal_sync setting: a committed row
survives the process being killed; several worker processes share the file); `postgresql://...` is for
several replicas (psycopg, read lazily). The schema is versioned in a table of its own and migrated forward
when a journal is opened (MIGRATIONS: every journal, new or old, goes through the same steps).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tsimcne_core.journal_drift import COUNTED_COLUMNS, binned_median, drift_counts, upsert_counts
from tsimcne_core.journal_spool import (
    SpoolError,
    SpoolWriter,
    finished,
    read_segment,
    segments,
    set_aside,
    spool_folder,
    spool_identity,
)

logger = logging.getLogger("tsimcne.journal")
MAX_PAGE = 1000  # rows of one /placements page
PRUNE_CHUNK = 5000  # rows deleted a transaction when pruning
SYNC_MODES = ("normal", "full")
LOCK_WAIT_S = 30.0  # SQLite: how long a write waits for another worker's lock before it fails
WAL_PAGES = 2_500  # SQLite: the WAL's size in pages (40 MB of 16 kB pages) at which a commit checkpoints it itself
PAGE_BYTES = 16_384  # SQLite: the page size of a new journal

COLUMNS = (
    "time", "request_id", "bundle_sha256", "filename", "image_sha256", "x", "y", "flag", "score", "evidence",
    "majority_label", "majority_share", "neighbours", "duplicate_of", "source", "sample_id", "tags",
    "nearest_distance",
)  # fmt: skip
ROW_COLUMNS = (*COLUMNS, "image", "image_height", "image_width", "original")  # what a new row is written with
# PostgreSQL's types of ROW_COLUMNS, for COPY in binary (PostgresJournal._insert): exactly the columns' types
ROW_TYPES = (
    "text", "text", "text", "text", "text", "float8", "float8", "text", "float8", "text", "text", "float8", "text",
    "text", "text", "text", "text", "float8", "bytea", "int4", "int4", "bytea",
)  # fmt: skip
COUNTED_AT = tuple(ROW_COLUMNS.index(name) for name in COUNTED_COLUMNS)  # where a row's values hold them
REVIEW_COLUMNS = ("review", "reviewer", "review_note", "reviewed_at")
JSON_COLUMNS = ("evidence", "neighbours", "tags")
FLAGGED = "flag <> 'in_distribution'"
REVIEWED = "review <> 'unreviewed'"
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS journal_schema (version INTEGER NOT NULL)"


def insert_rows(
    cursor: Any, mark: str, table: str, columns: Sequence[str], rows: Sequence[tuple], tail: str = ""
) -> None:
    """INSERT `rows` with one multi-row statement per 400: one call into the database for a batch, not one
    a row (each call hands the GIL back and forth between the model thread and the event loop's)."""
    one = f"({', '.join([mark] * len(columns))})"
    for start in range(0, len(rows), 400):
        chunk = rows[start : start + 400]
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(chunk))}{tail}"
        cursor.execute(sql, [value for row in chunk for value in row])


def _backfill_drift(cursor: Any, mark: str) -> None:
    """Version 2's daily counts for the rows a version-1 journal already holds."""
    cursor.execute(f"SELECT {', '.join(COUNTED_COLUMNS)} FROM placements")
    counts, bins = drift_counts(cursor.fetchall())
    upsert_counts(cursor, mark, counts, bins, insert_rows)


def _rows_inline_in_postgres(cursor: Any, mark: str) -> None:
    """PostgreSQL: keep a row in the table's own page up to 8 kB. A 28 px row (~3 kB) is over the 2 kB at which
    PostgreSQL tries to compress it (pixels barely compress) and moves the image to a TOAST table: a second
    insert and index entry a row, a quarter of the server's work per row (benchmarks/README.md, section 16).
    SQLite keeps rows in its pages anyway."""
    if mark == "%s":
        cursor.execute("ALTER TABLE placements SET (toast_tuple_target = 8160)")


def _make_identity(cursor: Any, mark: str) -> None:
    """A random identity for the journal, made once: what PostgreSQL spool folders are bound to."""
    cursor.execute(f"INSERT INTO journal_identity (id) VALUES ({mark})", [secrets.token_hex(12)])


# MIGRATIONS[n] takes a journal from version n - 1 to n (1 creates it); a step is an SQL statement ({id_type} and
# {blob} filled in per database) or a function of (cursor, parameter mark). Released steps are never edited:
# a change is a new step, so every journal, new or old, goes through the same ones.
MIGRATIONS: dict[int, tuple[str | Callable[[Any, str], None], ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS placements (
            id {id_type}, time TEXT NOT NULL, request_id TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
            filename TEXT NOT NULL, image_sha256 TEXT NOT NULL, x DOUBLE PRECISION NOT NULL,
            y DOUBLE PRECISION NOT NULL, flag TEXT NOT NULL, score DOUBLE PRECISION NOT NULL, evidence TEXT NOT NULL,
            majority_label TEXT, majority_share DOUBLE PRECISION, neighbours TEXT NOT NULL, duplicate_of TEXT,
            source TEXT, sample_id TEXT, tags TEXT NOT NULL, nearest_distance DOUBLE PRECISION,
            review TEXT NOT NULL DEFAULT 'unreviewed', reviewer TEXT, review_note TEXT, reviewed_at TEXT,
            image {blob}, image_height INTEGER, image_width INTEGER)""",
        "CREATE INDEX IF NOT EXISTS placements_time ON placements (time)",
        "CREATE INDEX IF NOT EXISTS placements_flag ON placements (flag, id)",
        "CREATE INDEX IF NOT EXISTS placements_source ON placements (source, id)",
        "CREATE INDEX IF NOT EXISTS placements_label ON placements (majority_label, id)",
        "CREATE INDEX IF NOT EXISTS placements_review ON placements (review, id)",
    ),
    2: (  # the uploaded file itself (setting journal_originals), daily counts so /drift reads days, not rows,
        # and pages in time order read straight from an index at any size: each filter's index ends in (time, id)
        "ALTER TABLE placements ADD COLUMN original {blob}",
        *(f"DROP INDEX placements_{name}" for name in ("time", "flag", "source", "label", "review")),
        "CREATE INDEX placements_time ON placements (time, id)",
        "CREATE INDEX placements_source ON placements (source, time, id)",
        "CREATE INDEX placements_label ON placements (majority_label, time, id)",
        # Flagged and reviewed rows are a few % of all: partial indexes over them cost a new row nearly nothing
        # (PlacementFilter.where repeats their condition so the databases use them); the other values of flag
        # and review match nearly every row, so the time index finds a page of them at once.
        f"CREATE INDEX placements_flag ON placements (flag, time, id) WHERE {FLAGGED}",
        f"CREATE INDEX placements_flagged ON placements (time, id) WHERE {FLAGGED}",
        f"CREATE INDEX placements_flagged_review ON placements (review, time, id) WHERE {FLAGGED}",
        f"CREATE INDEX placements_review ON placements (review, time, id) WHERE {REVIEWED}",
        """CREATE TABLE drift_counts (day TEXT NOT NULL, source TEXT NOT NULL, majority_label TEXT NOT NULL,
            flag TEXT NOT NULL, images BIGINT NOT NULL, PRIMARY KEY (day, source, majority_label, flag))""",
        """CREATE TABLE drift_distances (day TEXT NOT NULL, source TEXT NOT NULL, bin INTEGER NOT NULL,
            images BIGINT NOT NULL, PRIMARY KEY (day, source, bin))""",
        _backfill_drift,
    ),
    3: (  # how far each spool segment has been taken into the database (SQLite: tsimcne_core/journal_spool.py)
        "CREATE TABLE journal_spool (segment TEXT PRIMARY KEY, read_to BIGINT NOT NULL)",
    ),
    4: (_rows_inline_in_postgres,),
    5: (  # the journal's own identity, which a PostgreSQL spool folder is bound to
        "CREATE TABLE journal_identity (id TEXT NOT NULL)",
        _make_identity,
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)
READ_COLUMNS = ("id", *COLUMNS, *REVIEW_COLUMNS)  # what a placement read back holds, in this order
SELECTED = ", ".join(READ_COLUMNS)


def flat_values(row: dict[str, Any]) -> list[Any]:
    """A placement read back as flat values in READ_COLUMNS order, its JSON columns (evidence, neighbours,
    tags) as JSON text: one row of a CSV or Parquet export."""
    return [json.dumps(row[name]) if name in JSON_COLUMNS else row[name] for name in READ_COLUMNS]


class JournalError(RuntimeError):
    """The journal could not be opened, read or written; the message names it."""


class CursorGone(ValueError):
    """A /placements cursor whose row is no longer in the journal."""


@dataclass(slots=True)
class JournalRow:
    """One placed image as the journal keeps it."""

    time: str
    request_id: str
    bundle_sha256: str
    filename: str
    image_sha256: str
    x: float
    y: float
    flag: str
    score: float
    evidence: dict[str, float | None]
    majority_label: str | None
    majority_share: float | None
    neighbours: list[dict[str, Any]]
    duplicate_of: str | None
    source: str | None
    sample_id: str | None
    tags: list[str]
    image: np.ndarray | None = field(default=None, repr=False)  # uint8 (H, W, 3): the model's input
    nearest_distance: float | None = None  # to the nearest reference image on the map (drift)
    original: bytes | None = field(default=None, repr=False)  # the uploaded file (setting journal_originals)

    def __post_init__(self) -> None:
        if self.nearest_distance is None and self.neighbours:
            self.nearest_distance = float(self.neighbours[0]["distance"])

    def values(self) -> tuple:
        """The row's values in ROW_COLUMNS order: COLUMNS, then the image, its height and width, the original."""
        image = self.image
        pixels = (image.tobytes(), image.shape[0], image.shape[1]) if image is not None else (None, None, None)
        return (
            self.time, self.request_id, self.bundle_sha256, self.filename, self.image_sha256, self.x, self.y,
            self.flag, self.score, json.dumps(self.evidence), self.majority_label, self.majority_share,
            json.dumps(self.neighbours), self.duplicate_of, self.source, self.sample_id, json.dumps(self.tags),
            self.nearest_distance, *pixels, self.original,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PlacementFilter:
    """What GET /placements selects: a time range (ISO 8601, UTC), flag, majority label, source ('' for rows
    sent without one), review, flagged."""

    since: str | None = None
    until: str | None = None
    flag: str | None = None
    label: str | None = None
    source: str | None = None
    review: str | None = None
    flagged: bool | None = None  # True: out_of_distribution or artefact; False: in_distribution only

    def where(self, mark: str) -> tuple[str, list[Any]]:
        clauses, values = [], []
        if self.flagged is not None:
            clauses.append(FLAGGED if self.flagged else "flag = 'in_distribution'")
        for column, operator, value in (
            ("time", ">=", self.since), ("time", "<", self.until), ("flag", "=", self.flag),
            ("majority_label", "=", self.label), ("source", "=", self.source), ("review", "=", self.review),
        ):  # fmt: skip
            if value == "" and column == "source":  # rows whose client sent no source
                clauses.append("source IS NULL")
            elif value is not None:
                clauses.append(f"{column} {operator} {mark}")
                values.append(value)
        # the partial indexes' conditions, implied by these filters, said so the query planners use them
        if self.flag is not None and self.flag != "in_distribution" and self.flagged is None:
            clauses.append(FLAGGED)
        if self.review is not None and self.review != "unreviewed":
            clauses.append(REVIEWED)
        return " AND ".join(clauses), values


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class SqlJournal:
    """The journal on a DB-API connection (one per thread); SQLite and PostgreSQL differ in `_connect`, the
    parameter mark, the id column, how rows go in (`_insert`) and how a spool is keyed and locked. With a spool
    folder (`spool`: always for SQLite, setting journal_spool for PostgreSQL) the service's batches are appended
    there and taken in by `take_spool`; without one, each is a transaction of its own."""

    mark = "?"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"

    def __init__(self, url: str, spool: Path | None = None, sync: str = "normal") -> None:
        if sync not in SYNC_MODES:
            raise JournalError(f"journal {url}: sync {sync!r}: give one of {', '.join(SYNC_MODES)}")
        self.url = url
        self.sync = sync
        self._local = threading.local()
        self.spool_folder = spool  # None: each batch is a transaction of its own (`keep`)
        self._spool_prefix = ""  # what this spool's segments are keyed by in journal_spool (`_spool_keys`)
        self._writer: SpoolWriter | None = None
        self._writer_made = threading.Lock()
        self._taking = threading.Lock()
        self._taken_sizes: dict[str, int] | None = None  # the spool's segment sizes when this process last took it
        self._failing: str | None = None  # why the last take failed: new writes are refused until one succeeds
        self._listed: set[str] = set()  # segments this process has seen in its spool folder (`_may_forget`)
        try:
            self._migrate()
            if spool is not None:
                self._spool_prefix = self._spool_keys(spool)
        except Exception as exc:
            raise JournalError(f"journal {self.describe()}: cannot be opened: {exc}") from exc
        if spool is not None:
            self.take_spool()  # what an earlier run spooled and had not taken in yet (it was killed, say)

    @property
    def spools(self) -> bool:
        """Whether /embed's batches are appended to a spool (a file write on this machine, no transaction)."""
        return self.spool_folder is not None

    def _spool_keys(self, folder: Path) -> str:
        """The prefix of this spool's segments in table journal_spool: none for SQLite (one spool per database)."""
        return ""

    def _lock_spool(self, cursor: Any) -> None:
        """Hold off every other process taking this spool until the caller's transaction ends (SQLite: its
        write transaction already does)."""

    def _may_forget(self, segment: str) -> bool:
        """Whether a segment's offset row may go now that its file is gone: only when this process saw the file
        in its own folder. Another folder whose spool has the same identity (a volume cloned from this one)
        keys its segments under the same prefix; their files are never here, and forgetting their offsets
        would make that folder's takers read them again from the start. Offsets of segments deleted just
        before every process of a replica stopped stay behind (a few short rows; they match no file)."""
        return segment in self._listed

    def describe(self) -> str:
        return self.url

    def _connect(self) -> Any:
        raise NotImplementedError

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def _connected(self, failure: str) -> Any:
        """This thread's connection; JournalError naming the journal and `failure` when none can be made (the
        server is down, say), as for a failed statement."""
        try:
            return self._connection()
        except Exception as exc:
            raise JournalError(f"journal {self.describe()}: {failure}: {exc}") from exc

    def _lock_schema(self, cursor: Any) -> None:
        """Hold off other processes opening the journal until this one's migration commits (several workers
        start at once; two `CREATE TABLE IF NOT EXISTS` at the same moment collide on PostgreSQL)."""
        raise NotImplementedError

    def _migrate(self) -> None:
        connection = self._connection()
        cursor = connection.cursor()
        self._lock_schema(cursor)
        cursor.execute(VERSION_TABLE)
        cursor.execute("SELECT version FROM journal_schema")
        found = cursor.fetchone()
        if found is None:
            cursor.execute(f"INSERT INTO journal_schema (version) VALUES ({self.mark})", (0,))
        version = int(found[0]) if found is not None else 0
        if version > SCHEMA_VERSION:
            raise JournalError(f"schema version {version} is newer than this service's {SCHEMA_VERSION}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for step in MIGRATIONS[target]:
                if callable(step):
                    step(cursor, self.mark)
                else:
                    cursor.execute(step.format(id_type=self.id_type, blob=self.blob))
            cursor.execute(f"UPDATE journal_schema SET version = {self.mark}", (target,))
        connection.commit()

    def _recover(self, connection: Any) -> None:
        """After a failed statement: roll back, or drop a connection that cannot even do that."""
        try:
            connection.rollback()
        except Exception:
            self._local.connection = None

    def _begin_write(self, connection: Any) -> None:
        """Start a write transaction (PostgreSQL starts one with the first statement)."""

    def maintain(self) -> None:
        """Housekeeping the service's upkeep thread does every second: take the spool in (SQLite also copies
        the WAL into the database)."""
        if self.spools:
            self.take_spool()

    def keep(self, values: Sequence[tuple]) -> None:
        """The service's write of a placed batch (ROW_COLUMNS values): kept durably when this returns, or
        JournalError. With a spool: appended to this process's segment (one write; fsynced with sync=full),
        taken into the database within a second or before the next read in this replica (`take_spool`);
        JournalError while the database does not take what is spooled (a 2xx is then no longer given).
        Without one: a transaction of its own (`write_values`)."""
        if not values:
            return
        if not self.spools:
            self.write_values(values)
            return
        if self._failing is not None:
            raise self._unwritten(self._failing)
        try:
            self._spool_writer().append(values)
        except SpoolError as exc:
            raise self._unwritten(str(exc)) from exc
        except OSError as exc:  # the writer could not be made (its folder, its first segment)
            raise self._unwritten(f"spool {self.spool_folder}: {exc}") from exc

    def _unwritten(self, why: str) -> JournalError:
        return JournalError(f"journal {self.describe()}: the placements could not be written: {why}")

    def _spool_writer(self) -> SpoolWriter:
        """This process's spool writer, made in the process that writes (after a fork, a new one)."""
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            with self._writer_made:
                writer = self._writer
                if writer is None or writer.pid != os.getpid():
                    writer = self._writer = SpoolWriter(self.spool_folder, fsync=self.sync == "full")
        return writer

    def take_spool(self) -> int:
        """Take every whole frame spooled by any process into the database, in one transaction with each
        segment's new offset (so a frame is taken exactly once, whichever process takes it); delete the
        segments taken to their end whose writer is done with them, and set aside (`*.damaged`, logged) those
        a dead writer left with bytes that are not a frame after its whole ones (a power cut's zeros). How
        many rows came in; JournalError naming the journal when the take fails (new writes are then refused
        until one succeeds)."""
        with self._taking:
            try:
                try:
                    return self._take_spool()
                except OSError as exc:  # the spool's folder or files (descriptors run out, permissions)
                    raise JournalError(f"journal {self.describe()}: the spool could not be read: {exc}") from exc
            except JournalError as exc:
                self._failing = str(exc).removeprefix(f"journal {self.describe()}: ")
                raise

    def _take_spool(self) -> int:
        assert self.spool_folder is not None
        sizes = segments(self.spool_folder)
        if (
            self._failing is None
            and sizes == self._taken_sizes
            and not any(finished(self.spool_folder / name, size) for name, size in sizes.items())
        ):
            return 0  # nothing new since this process last took it, and no writer has let go of a segment
        with self._transaction("the spooled placements could not be taken in") as cursor:
            # Listed again under the write lock: a segment with an offset row that is not listed now has been
            # deleted (no take can commit meanwhile), so its row may go; listed before the lock, a segment
            # taken in and created meanwhile would lose its row and be taken twice.
            self._lock_spool(cursor)
            sizes = segments(self.spool_folder)
            cursor.execute("SELECT segment, read_to FROM journal_spool")
            prefix = self._spool_prefix  # other replicas' spools (PostgreSQL) are theirs to take
            offsets = {key[len(prefix) :]: at for key, at in cursor.fetchall() if key.startswith(prefix)}
            taken = [read_segment(self.spool_folder, name, offsets.get(name, 0)) for name in sorted(sizes)]
            for segment in taken:
                if segment.damaged_at is not None and not finished(segment.path, segment.offset):
                    raise ValueError(
                        f"{segment.path}: bytes that are not a spool frame at byte {segment.damaged_at}, and its "
                        "writer still holds it"
                    )
            rows = [row for segment in taken for row in segment.rows]
            if rows:
                self._insert(cursor, rows)
            moved = [(prefix + s.name, s.offset) for s in taken if s.offset != offsets.get(s.name, 0)]
            if moved:
                tail = " ON CONFLICT (segment) DO UPDATE SET read_to = excluded.read_to"
                insert_rows(cursor, self.mark, "journal_spool", ("segment", "read_to"), moved, tail)
            for name in offsets.keys() - sizes.keys():  # deleted after an earlier take
                if not (self.spool_folder / name).exists() and self._may_forget(name):
                    cursor.execute(f"DELETE FROM journal_spool WHERE segment = {self.mark}", [prefix + name])
                    self._listed.discard(name)
            self._listed.update(sizes)
        self._failing = None
        gone = set()
        for segment in taken:
            if segment.damaged_at is not None:
                aside = set_aside(segment.path)
                logger.warning(
                    "journal %s: %s ends in bytes that are not a spool frame (from byte %d; its process is gone: "
                    "a power cut?); its whole frames were taken in, the file set aside as %s",
                    self.describe(), segment.path, segment.damaged_at, aside,
                )  # fmt: skip
                gone.add(segment.name)
            elif finished(segment.path, segment.offset):
                segment.path.unlink(missing_ok=True)  # its offset row goes with the next take
                gone.add(segment.name)
        # What was listed under the lock, all of it read: a frame appended since shows as a new size.
        self._taken_sizes = {name: size for name, size in sizes.items() if name not in gone}
        return len(rows)

    def _catch_up(self) -> None:
        """Before a read or a change: make every kept row visible (take this replica's spool in)."""
        if self.spools:
            self.take_spool()

    def version(self) -> int:
        cursor = self._connection().cursor()
        cursor.execute("SELECT version FROM journal_schema")
        return int(cursor.fetchone()[0])

    def write(self, rows: Sequence[JournalRow]) -> int:
        """All `rows` in one transaction; how many. JournalError (naming the journal) when it fails: then none
        of them is written."""
        return self.write_values([row.values() for row in rows])

    def write_values(self, values: Sequence[tuple]) -> int:
        """`write` for rows given as their ROW_COLUMNS values (what JournalRow.values gives; the service builds
        them directly, which costs a third)."""
        if not values:
            return 0
        with self._transaction("the placements could not be written") as cursor:
            self._insert(cursor, values)
        return len(values)

    def _insert(self, cursor: Any, values: Sequence[tuple]) -> None:
        """Rows and their daily counts, in the caller's transaction."""
        insert_rows(cursor, self.mark, "placements", ROW_COLUMNS, values)
        counted = ([row[at] for at in COUNTED_AT] for row in values)
        upsert_counts(cursor, self.mark, *drift_counts(counted), insert_rows)

    @contextmanager
    def _transaction(self, failure: str) -> Iterator[Any]:
        """A write transaction's cursor, committed at the end; on any fault rolled back and JournalError
        raised, naming the journal and `failure` (nothing of the transaction is kept)."""
        connection = self._connected(failure)
        try:
            self._begin_write(connection)
            yield connection.cursor()
            connection.commit()
        except Exception as exc:
            self._recover(connection)
            raise JournalError(f"journal {self.describe()}: {failure}: {exc}") from exc

    def placements(self, where: PlacementFilter, after: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows matching `where`, oldest first (by time, then id), after the row with id `after` (the cursor), at
        most `limit` (<= MAX_PAGE). Every filter has an index led by its column and then (time, id), so a page
        is read in order from an index, at any size; CursorGone when the cursor's row was pruned meanwhile."""
        clause, values = where.where(self.mark)
        if after is not None:
            cursor = self._read(f"SELECT time FROM placements WHERE id = {self.mark}", [after]).fetchone()
            if cursor is None:
                self._connection().commit()
                raise CursorGone(f"after: placement {after} no longer exists (pruned): start again without after")
            keyset = f"(time, id) > ({self.mark}, {self.mark})"
            clause = f"{clause} AND {keyset}" if clause else keyset
            values += [cursor[0], after]
        sql = f"SELECT {SELECTED} FROM placements"
        sql += f" WHERE {clause}" if clause else ""
        sql += f" ORDER BY time, id LIMIT {int(min(max(limit, 1), MAX_PAGE))}"
        return list(self._rows(sql, values))

    def placement(self, row_id: int) -> dict[str, Any] | None:
        found = list(self._rows(f"SELECT {SELECTED} FROM placements WHERE id = {self.mark}", [row_id]))
        return found[0] if found else None

    def image(self, row_id: int) -> np.ndarray | None:
        """The image a placement was made from, at model size (uint8 RGB), or None."""
        cursor = self._read(f"SELECT image, image_height, image_width FROM placements WHERE id = {self.mark}", [row_id])
        found = cursor.fetchone()
        self._connection().commit()
        if not found or found[0] is None:
            return None
        return np.frombuffer(bytes(found[0]), dtype=np.uint8).reshape(int(found[1]), int(found[2]), 3)

    def original(self, row_id: int) -> tuple[str, bytes] | None:
        """The uploaded file of a placement and its name, when the journal kept it (journal_originals)."""
        found = self._read(f"SELECT filename, original FROM placements WHERE id = {self.mark}", [row_id]).fetchone()
        self._connection().commit()
        return (found[0], bytes(found[1])) if found and found[1] is not None else None

    def _read(self, sql: str, values: list[Any]) -> Any:
        self._catch_up()
        connection = self._connected("cannot be read")
        try:
            cursor = connection.cursor()
            cursor.execute(sql, values)
            return cursor
        except Exception as exc:
            self._recover(connection)
            raise JournalError(f"journal {self.describe()}: cannot be read: {exc}") from exc

    def _rows(self, sql: str, values: list[Any]) -> Iterator[dict[str, Any]]:
        cursor = self._read(sql, values)
        for found in cursor.fetchall():
            row = dict(zip(READ_COLUMNS, found, strict=True))
            for column in JSON_COLUMNS:
                row[column] = json.loads(row[column])
            yield row
        self._connection().commit()  # end the read transaction (PostgreSQL keeps one open otherwise)

    def review(self, row_id: int, verdict: str, reviewer: str | None, note: str | None) -> dict[str, Any] | None:
        """Record a person's verdict on a placement (the latest one counts); the row, or None if there is none."""
        sql = f"UPDATE placements SET review = {self.mark}, reviewer = {self.mark}, review_note = {self.mark}, "
        sql += f"reviewed_at = {self.mark} WHERE id = {self.mark}"
        self._change(sql, [verdict, reviewer, note, now(), row_id])
        return self.placement(row_id)

    def prune(self, before: str, chunk: int = PRUNE_CHUNK) -> int:
        """Delete the placements made before `before` (ISO 8601) and their daily counts; how many went. Rows
        go `chunk` a transaction, oldest first, so the service's own writes wait for one short transaction at
        a time, not for the whole deletion (a day of a busy journal is 10^5 rows and more); the day `before`
        falls in is then counted again from the rows it keeps."""
        mark = self.mark
        gone = 0
        while True:
            deleted = self._change(
                f"DELETE FROM placements WHERE id IN (SELECT id FROM placements WHERE time < {mark} "
                f"ORDER BY time, id LIMIT {int(chunk)})",
                [before],
            )
            gone += deleted
            if deleted < chunk:
                break
        day = before[:10]
        with self._transaction("cannot be written") as cursor:
            for table in ("drift_counts", "drift_distances"):
                cursor.execute(f"DELETE FROM {table} WHERE day <= {mark}", [day])
            cursor.execute(
                f"SELECT {', '.join(COUNTED_COLUMNS)} FROM placements WHERE time >= {mark} AND time < {mark}",
                [before, day + "\uffff"],
            )
            upsert_counts(cursor, mark, *drift_counts(cursor.fetchall()), insert_rows)
        return gone

    def _change(self, sql: str, values: list[Any]) -> int:
        self._catch_up()
        with self._transaction("cannot be written") as cursor:
            cursor.execute(sql, values)
        return int(cursor.rowcount)

    def drift(self, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        """Per day (UTC) and source, from the day of `since` through the day of `until`: images, the flagged
        share, the mix of majority labels and the median distance to the nearest reference image (from 5 %
        bins: within 2.5 %); oldest day first. Read from the daily counts, so 30 days cost the same at any
        number of rows."""
        clauses, values = [], []
        if since is not None:
            clauses.append(f"day >= {self.mark}")
            values.append(since[:10])
        if until is not None:
            clauses.append(f"day <= {self.mark}")
            values.append(until[:10])
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        counted = self._read(f"SELECT day, source, majority_label, flag, images FROM drift_counts{where}", values)
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for day, source, label, flag, images in counted.fetchall():
            group = groups.setdefault((day, source), {"images": 0, "flagged": 0, "labels": {}, "bins": {}})
            group["images"] += images
            group["flagged"] += images if flag != "in_distribution" else 0
            key = label or "none"
            group["labels"][key] = group["labels"].get(key, 0) + images
        binned = self._read(f"SELECT day, source, bin, images FROM drift_distances{where}", values)
        for day, source, index, images in binned.fetchall():
            if (day, source) in groups:
                groups[(day, source)]["bins"][int(index)] = int(images)
        self._connection().commit()
        rows = []
        for (day, source), group in sorted(groups.items()):
            images = int(group["images"])
            rows.append({
                "day": day, "source": source or None, "images": images, "flagged": int(group["flagged"]),
                "flagged_share": group["flagged"] / images,
                "labels": {label: count / images for label, count in sorted(group["labels"].items())},
                "median_nearest_distance": binned_median(group["bins"]),
            })  # fmt: skip
        return rows

    def stats(self) -> dict[str, Any]:
        """How many rows, from when to when, by flag and by source, and how many are reviewed."""
        cursor = self._read("SELECT count(*), min(time), max(time) FROM placements", [])
        count, first, last = cursor.fetchone()
        by_flag = dict(self._read("SELECT flag, count(*) FROM placements GROUP BY flag", []).fetchall())
        by_source = {
            source if source is not None else "none": n
            for source, n in self._read("SELECT source, count(*) FROM placements GROUP BY source", []).fetchall()
        }
        reviewed = self._read("SELECT count(*) FROM placements WHERE review <> 'unreviewed'", []).fetchone()[0]
        self._connection().commit()
        return {
            "rows": int(count), "first": first, "last": last, "by_flag": by_flag, "by_source": by_source,
            "reviewed": int(reviewed), "schema_version": self.version(),
        }  # fmt: skip

    def close(self) -> None:
        """Stop spooling and take in what this process spooled (a service shutting down leaves none behind)."""
        writer, self._writer = self._writer, None
        if writer is not None and writer.pid == os.getpid():
            writer.close()
            with contextlib.suppress(JournalError):  # else kept in the spool: the next process takes it in
                self.take_spool()
        self._close_connection()

    def _close_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class SqliteJournal(SqlJournal):
    def __init__(self, url: str, sync: str = "normal") -> None:
        self.path = Path(url.removeprefix("sqlite:///"))
        super().__init__(url, spool_folder(self.path), sync)

    def maintain(self) -> None:
        """Take the spool in, then copy committed pages from the WAL into the database."""
        super().maintain()
        self.checkpoint()

    def _may_forget(self, segment: str) -> bool:
        """Always: the spool folder is named after the database file, so no other folder keys into it."""
        return True

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, check_same_thread=False)
        # A row (the image at model size and its record: ~3.5 kB for 28 px) fills most of a 4 kB page: 16 kB
        # pages cut SQLite's work a row by a third (benchmarks/README.md, section 16). Takes effect only in a new,
        # empty database; an existing one keeps its page size.
        connection.execute(f"PRAGMA page_size={PAGE_BYTES}")
        # WAL: readers do not block the writer, workers share the file. Switching to it needs the database to
        # itself, and SQLite answers "locked" at once (no busy wait) while another worker is migrating.
        _while_locked(lambda: connection.execute("PRAGMA journal_mode=WAL"), pause=0.05)
        # NORMAL (the default): a commit (and a spooled batch) is in the file before the request is answered, so
        # it survives the worker being killed, but not a power cut in the next moments; FULL also waits for the
        # disk (fsync) on every commit and every spooled batch (what each costs /embed: benchmarks/README.md,
        # section 16).
        connection.execute(f"PRAGMA synchronous={self.sync.upper()}")
        # Copying the WAL back into the database (a checkpoint, with an fsync) is left to `maintain`, which the
        # service calls from a thread of its own every second, not to the commit that crosses SQLite's 1,000
        # pages; WAL_PAGES (40 MB) keeps the WAL bounded should nobody call it.
        connection.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        return connection

    def _begin_write(self, connection: sqlite3.Connection) -> None:
        """Take the database's one write lock, waiting (SQLite's busy wait, up to LOCK_WAIT_S) while another
        process holds it. Nothing on a request's path waits here: /embed's batches go to the spool, and the
        takes, reviews and prunes that write can wait their turn."""
        connection.execute("BEGIN IMMEDIATE")

    def checkpoint(self) -> None:
        """Copy committed pages from the WAL into the database without waiting for readers or writers."""
        try:
            self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.describe()}: checkpoint failed: {exc}") from exc

    def _lock_schema(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")  # the database's one writer lock, until the migration commits


def _while_locked(statement: Callable[[], Any], pause: float) -> None:
    """Run `statement`, again every `pause` seconds while SQLite answers that the database is locked (another
    worker holds it), for at most LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)


class PostgresJournal(SqlJournal):
    """The journal in PostgreSQL, for several replicas. Without a spool each batch is committed before its
    requests are answered (every replica reads it at once); with one (setting journal_spool: a folder on the
    replica's own persistent volume) a batch is answered once appended there, and is in the database within a
    second (on this replica's reads at once), at a small part of a transaction's cost (benchmarks/README.md,
    section 16)."""

    mark = "%s"
    id_type = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"

    def _lock_schema(self, cursor: Any) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(2026120326)")  # released when the migration commits

    def _spool_keys(self, folder: Path) -> str:
        """Every replica has a spool of its own, all keyed in the one journal_spool table: by the spool's
        identity (made once, kept in its folder), so a replica takes and tidies only its own segments. The
        folder is bound to this journal: another journal's is refused."""
        connection = self._connection()
        journal = connection.execute("SELECT id FROM journal_identity").fetchone()[0]
        connection.commit()
        identity = spool_identity(folder, journal)
        digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
        self._spool_lock_key = int.from_bytes(digest, "big", signed=True)  # this spool's advisory lock
        return identity + "/"

    def _lock_spool(self, cursor: Any) -> None:
        """Several worker processes of a replica take its spool: one at a time (else two could take the same
        frames before either commits its offsets). A lock for this spool only, released at commit."""
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [self._spool_lock_key])

    def _insert(self, cursor: Any, values: Sequence[tuple]) -> None:
        """The rows by COPY in binary, their daily counts by INSERT ... ON CONFLICT, in the caller's transaction.
        Binary: no text to make (the pixels as hex) on this side nor to parse on the server's: 5 and 22 µs a
        row, against 13 and 34 µs in text and more for a multi-row INSERT (benchmarks/README.md, section 16)."""
        with cursor.copy(f"COPY placements ({', '.join(ROW_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(ROW_TYPES)
            for row in values:
                copy.write_row(row)
        counted = ([row[at] for at in COUNTED_AT] for row in values)
        upsert_counts(cursor, self.mark, *drift_counts(counted), insert_rows)

    def describe(self) -> str:
        """The URL without its password."""
        scheme, _, rest = self.url.partition("://")
        credentials, at, host = rest.rpartition("@")
        return f"{scheme}://{credentials.split(':', 1)[0]}{at}{host}" if at else self.url

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:
            raise JournalError(
                f"journal {self.describe()}: PostgreSQL needs psycopg (pip install 'psycopg[binary]')"
            ) from exc
        # A server or network that stops answering fails a statement instead of hanging it (a take holding the
        # spool's lock would hold every other worker's take, and their reads, with it); READ COMMITTED whatever
        # the database's default, so a take sees the offsets the previous taker committed while it waited.
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        defaults = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10}
        connection = psycopg.connect(self.url, **{k: v for k, v in defaults.items() if k not in given})
        connection.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        connection.execute(f"SET lock_timeout = '{int(LOCK_WAIT_S)}s'")
        connection.commit()
        return connection


def open_journal(url: str, sync: str = "normal", spool: str | Path | None = None) -> SqlJournal:
    """The journal a URL names: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB. `sync`: normal (what
    was answered survives the process being killed) or full (also a power cut: an fsync per commit and per
    spooled batch); PostgreSQL's own commits follow its server's synchronous_commit. `spool` (PostgreSQL
    only; SQLite's is always beside its database): the folder /embed's batches are appended to before they
    are taken into the database."""
    if url.startswith("sqlite:///"):
        if spool is not None:
            raise JournalError(f"journal {url}: a spool folder is for PostgreSQL (SQLite's is beside its database)")
        return SqliteJournal(url, sync)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJournal(url, Path(spool) if spool is not None else None, sync)
    raise JournalError(f"journal {url!r}: give sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
