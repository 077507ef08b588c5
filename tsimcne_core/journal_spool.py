"""The journal's spool: placed rows appended to a file, taken into the database in bulk.

Why: an SQLite commit per model batch (a few rows) cost /embed 16-19 % of its throughput on 2 cores, most of it
SQLite's fixed work per transaction and the workers waiting for each other's write lock; a PostgreSQL commit
per batch, even gathered, 28-30 % (benchmarks/README.md, section 16). Appending a batch to a file is one
write() call; the database then takes everything spooled in one transaction about once a second (the journal's
`take_spool`, called by the service's upkeep thread and before every read, so a read sees every acknowledged
row). SQLite's spool is beside its database; a PostgreSQL journal's (setting journal_spool) is on the
replica's own volume, and is keyed in the database by the spool's identity (`spool_identity`).

What a 2xx keeps: a batch is answered once its frame is written to the spool; like a WAL commit with
synchronous=NORMAL it survives the worker being killed, and with journal_sync=full each append is also
fsynced. A frame is taken into the database exactly once: the offset each segment has been read up to is
stored in the same transaction as its rows (table journal_spool).

Files: `<folder>/<writer>.<sequence>.spool`, one writer per process (its name: pid, start time, random), a new
segment every SEGMENT_BYTES. A writer holds a shared flock on its open segment; a segment read to its end whose
flock can be taken exclusively is finished (rotated away from, or its process is gone) and is deleted.
Frames: magic, payload length, then the batch's rows pickled (values of str, int, float, bytes and None only;
unpickled with no globals allowed, so a spool file cannot run code).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pickle
import secrets
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"TSJ1"  # a frame of this layout: a later change of the rows' columns gets a magic of its own
FRAME_HEAD = struct.Struct("<4sQ")  # magic, payload bytes
SEGMENT_BYTES = 16 * 1024 * 1024  # a writer starts a new segment beyond this
SUFFIX = ".spool"


class SpoolError(OSError):
    """A batch could not be appended to the spool (nothing of it is kept)."""


def spool_folder(database: Path) -> Path:
    """Where a journal database's spool lives: beside it, on the same volume."""
    return database.with_name(database.name + ".spool")


IDENTITY_FILE = "spool-id"
JOURNAL_FILE = "journal-id"


def spool_identity(folder: Path, journal: str) -> str:
    """The spool's identity, made by whichever process asks first and kept in its folder: what a PostgreSQL
    journal keys this spool's segments by, apart from other replicas' spools (tsimcne_core/journal.py). The
    folder is bound to the journal (its identity, `journal`) it was first used with; ValueError naming both
    when it is another's, whose takers would take the same files into two databases."""
    bound = _written_once(folder / JOURNAL_FILE, journal)
    if bound != journal:
        raise ValueError(
            f"spool folder {folder} belongs to another journal (journal id {bound}, this one's is {journal}): "
            "give each journal a spool folder of its own"
        )
    return _written_once(folder / IDENTITY_FILE, secrets.token_hex(12))


def _written_once(path: Path, text: str) -> str:
    """The content of `path`, written as `text` by whichever process gets there first (never replaced)."""
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    making = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    with open(making, "w", encoding="ascii") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(making, path)  # only the first process's text takes: a link never replaces a file
    except FileExistsError:
        pass
    finally:
        making.unlink()
    _sync(path.parent)
    return path.read_text(encoding="ascii").strip()


def _sync(folder: Path) -> None:
    """A folder's entries (a new file's name) on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolWriter:
    """Appends batches of rows for one process; thread-safe. A forked process makes its own (the journal checks
    the pid: tsimcne_core/journal.py `SqlJournal._spool_writer`)."""

    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        self.pid = os.getpid()
        self.name = f"{self.pid}-{time.time_ns()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._sequence = 0
        self._fd = -1
        self._size = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._sync_folder()
        self._open_segment()

    def _sync_folder(self) -> None:
        """With fsync: the folder's entries (a new segment's name) on disk too, not only the frames."""
        if self.fsync:
            _sync(self.folder)

    def _rotate(self) -> None:
        self._sequence += 1
        self._open_segment()

    def _open_segment(self) -> None:
        path = self.folder / f"{self.name}.{self._sequence:08d}{SUFFIX}"
        making = path.with_name(path.name + ".new")  # no reader lists it before it is locked
        fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # "still being written": a reader deletes only segments it can lock
        os.replace(making, path)
        self._sync_folder()
        previous, self._fd, self._size = self._fd, fd, 0
        if previous >= 0:
            os.close(previous)  # its flock goes with it: the reader may delete it once it has read it all

    def append(self, rows: Sequence[tuple]) -> None:
        """One frame holding `rows`, on disk (in the page cache; fsynced with fsync=True) when this returns.
        SpoolError when it cannot be written; a partly written frame is cut off again."""
        payload = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
        frame = FRAME_HEAD.pack(MAGIC, len(payload)) + payload
        with self._lock:
            written = 0
            try:
                while written < len(frame):
                    written += os.write(self._fd, frame[written:] if written else frame)
                self._size += len(frame)  # whole in the file: another process may take it from here on
                if self.fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                # A half frame is cut off (no reader takes half a frame); a whole one stays (another process may
                # have taken it already: kept, though answered 503). Either way the next frame goes into a new
                # segment, never below an offset a reader may have stored.
                with contextlib.suppress(OSError):
                    if written < len(frame):
                        os.ftruncate(self._fd, self._size)
                    self._rotate()
                raise SpoolError(exc.errno, f"spool {self.folder}: {exc.strerror or exc}") from exc
            if self._size >= SEGMENT_BYTES:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class _RowsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> None:  # type: ignore[override]
        raise pickle.UnpicklingError(f"spool frames hold plain values only, not {module}.{name}")


@dataclass(slots=True)
class SegmentRead:
    name: str
    path: Path
    offset: int  # read up to here: the end of its last whole frame
    rows: list[tuple]
    damaged_at: int | None = None  # where bytes that are not a frame start (a power cut's zeros, say)


def segments(folder: Path) -> dict[str, int]:
    """The spool's segment files and their sizes (none when the folder does not exist)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        if entry.name.endswith(SUFFIX):
            try:
                found[entry.name] = entry.stat().st_size
            except FileNotFoundError:  # deleted meanwhile by another process's reader
                continue
    return found


def read_segment(folder: Path, name: str, offset: int) -> SegmentRead:
    """The whole frames of a segment from `offset` on (a frame still being written is left for next time), up
    to bytes that are not a frame, if any (`damaged_at`). ValueError naming the file for a frame whose payload
    is not plain values."""
    path = folder / name
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:  # taken to its end and deleted by another process meanwhile
        return SegmentRead(name, path, offset, [])
    rows: list[tuple] = []
    at = 0
    while len(data) - at >= FRAME_HEAD.size:
        magic, length = FRAME_HEAD.unpack_from(data, at)
        if magic != MAGIC:
            return SegmentRead(name, path, offset + at, rows, damaged_at=offset + at)
        end = at + FRAME_HEAD.size + length
        if end > len(data):
            break
        try:
            rows += _RowsOnly(io.BytesIO(data[at + FRAME_HEAD.size : end])).load()
        except Exception as exc:
            raise ValueError(f"{path}: the spool frame at byte {offset + at}: {exc}") from exc
        at = end
    return SegmentRead(name, path, offset + at, rows)


def set_aside(path: Path) -> Path:
    """Rename a damaged segment out of the spool (kept beside it for a person to look at)."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside


def finished(path: Path, offset: int) -> bool:
    """Whether nothing more can come into the segment: no writer holds it open any more (it rotated away from
    it, or its process is gone) and it was read to its end (`offset`). Bytes after the last whole frame of a
    segment no writer holds are a frame its process died writing (never acknowledged): it is finished too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        tail = os.pread(fd, FRAME_HEAD.size, offset)
        if len(tail) < FRAME_HEAD.size:
            return True  # read to its end, or a frame cut off within its head
        magic, length = FRAME_HEAD.unpack(tail)
        if magic != MAGIC:
            return True  # not a frame: what a dead writer left (the caller sets the segment aside)
        return os.fstat(fd).st_size < offset + FRAME_HEAD.size + length  # a whole frame not read yet: not done
    finally:
        os.close(fd)
