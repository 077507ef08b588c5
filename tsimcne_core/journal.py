"""The journal: every placed image, kept durably, so the service remembers what came in and where it landed.

One row per placed image: when, the request, the bundle, the file's name and sha256, x, y, flag, score,
evidence, majority label and share, neighbours, duplicate_of, the image at model size (raw RGB pixels: no
encoding on the way in; PNG when it is read) and the client's metadata (source, sample id, tags). Rows are
committed before their requests are answered, so a 2xx means they are kept; a journal that cannot be
written fails the request (the service answers 503 naming it), never a 200 without its rows.

`sqlite:///PATH` is the embedded default (WAL, synchronous=FULL: a committed row survives the process being
killed; several worker processes share the file); `postgresql://...` is for several replicas (psycopg, read
lazily). The schema is versioned in a table of its own and migrated forward when a journal is opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MAX_TEXT = 200  # characters of source, sample_id and each tag
MAX_TAGS = 20
MAX_PAGE = 1000  # rows of one /placements page
SYNC_MODES = ("normal", "full")

COLUMNS = (
    "time", "request_id", "bundle_sha256", "filename", "image_sha256", "x", "y", "flag", "score", "evidence",
    "majority_label", "majority_share", "neighbours", "duplicate_of", "source", "sample_id", "tags",
    "nearest_distance",
)  # fmt: skip
REVIEW_COLUMNS = ("review", "reviewer", "review_note", "reviewed_at")
MAX_NOTE = 2000  # characters of a review's note
JSON_COLUMNS = ("evidence", "neighbours", "tags")
# Version 1; later versions add statements to MIGRATIONS[n] (from n - 1 to n), never edit these.
CREATE = (
    "CREATE TABLE IF NOT EXISTS journal_schema (version INTEGER NOT NULL)",
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
)
MIGRATIONS: dict[int, tuple[str, ...]] = {}
SELECTED = ", ".join(("id", *COLUMNS, *REVIEW_COLUMNS))


class JournalError(RuntimeError):
    """The journal could not be opened, read or written; the message names it."""


class MetadataError(ValueError):
    """Client metadata that is refused: `field` names it, `too_large` tells 413 from 400."""

    def __init__(self, field_name: str, message: str, too_large: bool = False) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.too_large = too_large


@dataclass(frozen=True, slots=True)
class ClientMetadata:
    """What a client may send with its images (query parameters of POST /embed)."""

    source: str | None = None  # the instrument or pipeline
    sample_id: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, values: Mapping[str, Sequence[str]]) -> ClientMetadata:
        """From parsed query parameters; refuses repeated or unknown-shaped values naming the field."""
        source = _one_text(values, "source")
        sample_id = _one_text(values, "sample_id")
        tags: list[str] = []
        for value in values.get("tags", ()):
            tags += [tag.strip() for tag in value.split(",") if tag.strip()]
        if len(tags) > MAX_TAGS:
            raise MetadataError("tags", f"{len(tags)} tags; at most {MAX_TAGS}", too_large=True)
        for tag in tags:
            _check_text("tags", tag)
        return cls(source, sample_id, tuple(tags))


def _one_text(values: Mapping[str, Sequence[str]], name: str) -> str | None:
    given = values.get(name, ())
    if len(given) > 1:
        raise MetadataError(name, "given more than once")
    if not given or given[0] == "":
        return None
    _check_text(name, given[0])
    return given[0]


def _check_text(name: str, text: str) -> None:
    if len(text) > MAX_TEXT:
        raise MetadataError(name, f"{len(text)} characters; at most {MAX_TEXT}", too_large=True)
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise MetadataError(name, "control characters are not allowed")


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

    def __post_init__(self) -> None:
        if self.nearest_distance is None and self.neighbours:
            self.nearest_distance = float(self.neighbours[0]["distance"])

    def values(self) -> tuple:
        """The row's column values, in COLUMNS order, then the image and its height and width."""
        image = self.image
        pixels = (image.tobytes(), image.shape[0], image.shape[1]) if image is not None else (None, None, None)
        return (
            self.time, self.request_id, self.bundle_sha256, self.filename, self.image_sha256, self.x, self.y,
            self.flag, self.score, json.dumps(self.evidence), self.majority_label, self.majority_share,
            json.dumps(self.neighbours), self.duplicate_of, self.source, self.sample_id, json.dumps(self.tags),
            self.nearest_distance, *pixels,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PlacementFilter:
    """What GET /placements selects: a time range (ISO 8601, UTC), flag, majority label, source, review, flagged."""

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
            clauses.append("flag <> 'in_distribution'" if self.flagged else "flag = 'in_distribution'")
        for column, operator, value in (
            ("time", ">=", self.since), ("time", "<", self.until), ("flag", "=", self.flag),
            ("majority_label", "=", self.label), ("source", "=", self.source), ("review", "=", self.review),
        ):  # fmt: skip
            if value is not None:
                clauses.append(f"{column} {operator} {mark}")
                values.append(value)
        return " AND ".join(clauses), values


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class SqlJournal:
    """The journal on a DB-API connection (one per thread); SQLite and PostgreSQL differ only in `_connect`,
    the parameter mark and the id column."""

    mark = "?"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        try:
            self._migrate()
        except Exception as exc:
            raise JournalError(f"journal {self.describe()}: cannot be opened: {exc}") from exc

    def describe(self) -> str:
        return self.url

    def _connect(self) -> Any:
        raise NotImplementedError

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def _lock_schema(self, cursor: Any) -> None:
        """Hold off other processes opening the journal until this one's migration commits (several workers
        start at once; two `CREATE TABLE IF NOT EXISTS` at the same moment collide on PostgreSQL)."""
        raise NotImplementedError

    def _migrate(self) -> None:
        connection = self._connection()
        cursor = connection.cursor()
        self._lock_schema(cursor)
        for statement in CREATE:
            cursor.execute(statement.format(id_type=self.id_type, blob=self.blob))
        cursor.execute("SELECT version FROM journal_schema")
        found = cursor.fetchone()
        if found is None:
            cursor.execute(f"INSERT INTO journal_schema (version) VALUES ({self.mark})", (SCHEMA_VERSION,))
            version = SCHEMA_VERSION
        else:
            version = int(found[0])
        if version > SCHEMA_VERSION:
            raise JournalError(f"schema version {version} is newer than this service's {SCHEMA_VERSION}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                cursor.execute(statement)
            cursor.execute(f"UPDATE journal_schema SET version = {self.mark}", (target,))
        connection.commit()

    def _recover(self, connection: Any) -> None:
        """After a failed statement: roll back, or drop a connection that cannot even do that."""
        try:
            connection.rollback()
        except Exception:
            self._local.connection = None

    def version(self) -> int:
        cursor = self._connection().cursor()
        cursor.execute("SELECT version FROM journal_schema")
        return int(cursor.fetchone()[0])

    def write(self, rows: Sequence[JournalRow]) -> int:
        """All `rows` in one transaction; how many. JournalError (naming the journal) when it fails: then none
        of them is written."""
        if not rows:
            return 0
        connection = self._connection()
        names = ", ".join((*COLUMNS, "image", "image_height", "image_width"))
        marks = ", ".join([self.mark] * (len(COLUMNS) + 3))
        try:
            connection.cursor().executemany(
                f"INSERT INTO placements ({names}) VALUES ({marks})", [r.values() for r in rows]
            )
            connection.commit()
            return len(rows)
        except Exception as exc:
            self._recover(connection)
            raise JournalError(f"journal {self.describe()}: the placements could not be written: {exc}") from exc

    def placements(self, where: PlacementFilter, after: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Rows matching `where` with ids above `after`, oldest first, at most `limit` (<= MAX_PAGE)."""
        clause, values = where.where(self.mark)
        if after is not None:
            clause = f"{clause} AND id > {self.mark}" if clause else f"id > {self.mark}"
            values.append(after)
        sql = f"SELECT {SELECTED} FROM placements"
        sql += f" WHERE {clause}" if clause else ""
        sql += f" ORDER BY id LIMIT {int(min(max(limit, 1), MAX_PAGE))}"
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

    def _read(self, sql: str, values: list[Any]) -> Any:
        connection = self._connection()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, values)
            return cursor
        except Exception as exc:
            self._recover(connection)
            raise JournalError(f"journal {self.describe()}: cannot be read: {exc}") from exc

    def _rows(self, sql: str, values: list[Any]) -> Iterator[dict[str, Any]]:
        cursor = self._read(sql, values)
        names = ("id", *COLUMNS, *REVIEW_COLUMNS)
        for found in cursor.fetchall():
            row = dict(zip(names, found, strict=True))
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

    def prune(self, before: str) -> int:
        """Delete the placements made before `before` (ISO 8601); how many went."""
        return self._change(f"DELETE FROM placements WHERE time < {self.mark}", [before])

    def _change(self, sql: str, values: list[Any]) -> int:
        connection = self._connection()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, values)
            connection.commit()
            return int(cursor.rowcount)
        except Exception as exc:
            self._recover(connection)
            raise JournalError(f"journal {self.describe()}: cannot be written: {exc}") from exc

    def drift(self, since: str | None = None, until: str | None = None) -> list[dict[str, Any]]:
        """Per day (UTC) and source: images, the flagged share, the mix of majority labels and the median
        distance to the nearest reference image; oldest day first."""
        where = PlacementFilter(since=since, until=until)
        clause, values = where.where(self.mark)
        sql = "SELECT substr(time, 1, 10), source, flag, majority_label, nearest_distance FROM placements"
        sql += f" WHERE {clause}" if clause else ""
        cursor = self._read(sql, values)
        groups: dict[tuple[str, str | None], dict[str, Any]] = {}
        for day, source, flag, label, distance in cursor.fetchall():
            group = groups.setdefault((day, source), {"images": 0, "flagged": 0, "labels": {}, "distances": []})
            group["images"] += 1
            group["flagged"] += flag != "in_distribution"
            key = label if label is not None else "none"
            group["labels"][key] = group["labels"].get(key, 0) + 1
            if distance is not None:
                group["distances"].append(distance)
        self._connection().commit()
        rows = []
        for (day, source), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or "")):
            distances = sorted(group["distances"])
            middle = len(distances) // 2
            median = None
            if distances:
                median = distances[middle] if len(distances) % 2 else (distances[middle - 1] + distances[middle]) / 2
            rows.append({
                "day": day, "source": source, "images": group["images"], "flagged": group["flagged"],
                "flagged_share": group["flagged"] / group["images"],
                "labels": {label: count / group["images"] for label, count in sorted(group["labels"].items())},
                "median_nearest_distance": median,
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
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class SqliteJournal(SqlJournal):
    def __init__(self, url: str, sync: str = "normal") -> None:
        if sync not in SYNC_MODES:
            raise JournalError(f"journal {url}: sync {sync!r}: give one of {', '.join(SYNC_MODES)}")
        self.path = Path(url.removeprefix("sqlite:///"))
        self.sync = sync
        super().__init__(url)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        # WAL: readers do not block the writer, workers share the file. Switching to it needs the database to
        # itself, and SQLite answers "locked" at once (no busy wait) while another worker is migrating.
        deadline = time.monotonic() + 30
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        # NORMAL (the default): a commit is in the WAL file before the request is answered, so it survives the
        # worker being killed, but not a power cut in the next moments; FULL also waits for the disk (fsync) on
        # every commit: measured, 1-image /embed -22 % with NORMAL, -42 % with FULL (benchmarks/README.md).
        connection.execute(f"PRAGMA synchronous={self.sync.upper()}")
        return connection

    def _lock_schema(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")  # the database's one writer lock, until the migration commits


class PostgresJournal(SqlJournal):
    mark = "%s"
    id_type = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"

    def _lock_schema(self, cursor: Any) -> None:
        cursor.execute("SELECT pg_advisory_xact_lock(2026120326)")  # released when the migration commits

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
        return psycopg.connect(self.url)


def open_journal(url: str, sync: str = "normal") -> SqlJournal:
    """The journal a URL names: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB. `sync` (SQLite): normal
    (commits survive the process being killed) or full (also a power cut: an fsync per commit); PostgreSQL
    follows its server's own synchronous_commit."""
    if url.startswith("sqlite:///"):
        return SqliteJournal(url, sync)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresJournal(url)
    raise JournalError(f"journal {url!r}: give sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
