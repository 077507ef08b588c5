"""The journal's spool (tsimcne_core/journal_spool.py): batches appended by several processes are taken into
the database exactly once, whichever process takes them, for SQLite (its spool beside the database) and for
PostgreSQL with a spool folder per replica (several replicas, one database); nothing in a spool file can run
code."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.harness.postgres import new_database
from tsimcne_core.journal import JournalError, JournalRow, PlacementFilter, SqlJournal, now, open_journal
from tsimcne_core.journal_spool import FRAME_HEAD, MAGIC, spool_folder


@dataclass(frozen=True)
class Spooled:
    """A journal with a spool: `open()` as one worker process of a replica would."""

    url: str
    folder: Path
    spool: Path | None = None  # PostgreSQL's spool folder (setting journal_spool)

    def open(self) -> SqlJournal:
        return open_journal(self.url, spool=self.spool)


@pytest.fixture(params=["sqlite", "postgresql"])
def spooled(request, tmp_path: Path) -> Spooled:
    if request.param == "sqlite":
        return Spooled(f"sqlite:///{tmp_path / 'journal.db'}", spool_folder(tmp_path / "journal.db"))
    url = new_database(request.getfixturevalue("postgres"))
    return Spooled(url, tmp_path / "spool", tmp_path / "spool")


def _values(name: str, source: str) -> tuple:
    return JournalRow(
        now(), "request", "abc", name, "0" * 64, 0.5, 1.5, "in_distribution", 0.1, {"pixels": 0.1}, "lymphocyte",
        1.0, [{"id": "r.png", "index": 0, "label": "lymphocyte", "distance": 0.2}], None, source, None, [],
    ).values()  # fmt: skip


def _spool_and_take(spooled: Spooled, source: str, batches: int) -> None:
    """A worker: spools `batches` batches of 3 rows, taking the spool in now and then as the upkeep does."""
    journal = spooled.open()
    for batch in range(batches):
        journal.keep([_values(f"{source}-{batch}-{i}.png", source) for i in range(3)])
        if batch % 7 == 0:
            journal.take_spool()
    journal.close()


def _run_workers(replicas: list[Spooled], per_replica: int, batches: int) -> None:
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_spool_and_take, args=(replica, f"r{r}w{n}", batches))
        for r, replica in enumerate(replicas)
        for n in range(per_replica)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0


def test_batches_spooled_by_several_processes_are_taken_in_exactly_once(spooled: Spooled) -> None:
    spooled.open().close()
    _run_workers([spooled], per_replica=3, batches=60)
    journal = spooled.open()
    rows = journal.placements(PlacementFilter(), limit=1000)
    names = [row["filename"] for row in rows]
    assert len(names) == len(set(names)) == 3 * 60 * 3
    assert {row["source"] for row in rows} == {"r0w0", "r0w1", "r0w2"}
    assert sum(day["images"] for day in journal.drift()) == 540  # the daily counts came in with the rows
    assert not list(spooled.folder.glob("*.spool"))  # every segment taken and deleted


def test_replicas_with_spools_of_their_own_share_one_postgresql_journal(postgres, tmp_path: Path) -> None:
    """Each replica takes and tidies only its own spool: one replica's take never drops another's offsets
    (which would take that replica's frames a second time)."""
    url = new_database(postgres)
    first, second = (Spooled(url, tmp_path / name, tmp_path / name) for name in ("a", "b"))
    one, two = first.open(), second.open()
    two.keep([_values("b-early.png", "b")])
    two.take_spool()  # its offset row now stands in the database
    one.keep([_values("a-early.png", "a")])
    one.take_spool()  # lists its own folder only: must leave b's offset row alone
    two.keep([_values("b-late.png", "b")])
    two.take_spool()
    names = sorted(row["filename"] for row in one.placements(PlacementFilter()))
    assert names == ["a-early.png", "b-early.png", "b-late.png"]
    one.close(), two.close()
    _run_workers([first, second], per_replica=2, batches=30)  # and under load, two workers a replica
    rows = first.open().placements(PlacementFilter(), limit=1000)
    assert len(rows) == len({row["filename"] for row in rows}) == 3 + 2 * 2 * 30 * 3
    assert not list(first.folder.glob("*.spool")) and not list(second.folder.glob("*.spool"))


def test_a_killed_writer_keeps_what_it_spooled_and_its_cut_off_frame_is_dropped(spooled: Spooled) -> None:
    reader = spooled.open()
    context = multiprocessing.get_context("fork")
    ready = context.Event()

    def spool_then_hang() -> None:
        journal = spooled.open()
        journal.keep([_values(f"kept-{i}.png", "killed") for i in range(4)])
        segment = next(spooled.folder.glob("*.spool"))
        with open(segment, "ab") as handle:  # a frame its process died writing: its head and half its payload
            handle.write(FRAME_HEAD.pack(MAGIC, 1000) + b"\x80" * 500)
        ready.set()
        signal.pause()

    writer = context.Process(target=spool_then_hang)
    writer.start()
    assert ready.wait(30)
    assert [row["filename"] for row in reader.placements(PlacementFilter())] == [f"kept-{i}.png" for i in range(4)]
    assert list(spooled.folder.glob("*.spool"))  # still held by its writer: kept
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(30)
    reader.take_spool()
    reader.take_spool()
    assert not list(spooled.folder.glob("*.spool"))
    assert len(reader.placements(PlacementFilter())) == 4


def test_a_spool_frame_that_is_not_plain_values_is_refused_and_stops_new_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    journal = open_journal(url)
    journal.keep([_values("first.png", "a")])
    segment = next(spool_folder(tmp_path / "journal.db").glob("*.spool"))
    payload = pickle.dumps([(os.system, ("echo spooled code ran",))])
    with open(segment, "ab") as handle:
        handle.write(FRAME_HEAD.pack(MAGIC, len(payload)) + payload)
    with pytest.raises(JournalError, match=r"spooled placements could not be taken in: .*plain values only, not"):
        journal.placements(PlacementFilter())
    with pytest.raises(JournalError, match=f"journal {url}: the placements could not be written"):
        journal.keep([_values("second.png", "a")])  # a 503, not a 200 the database would never take in


def test_a_power_cut_tail_of_zeros_is_set_aside_and_the_whole_frames_before_it_kept(tmp_path: Path) -> None:
    """A segment whose writer is gone ends in zeros (what a power cut can leave with journal_sync=normal): the
    journal still opens, takes the frames before them, and sets the file aside instead of failing for ever."""
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    context = multiprocessing.get_context("fork")

    def spool_and_die() -> None:
        journal = open_journal(url)
        journal.keep([_values(f"before-{i}.png", "cut") for i in range(3)])
        segment = next(spool_folder(tmp_path / "journal.db").glob("*.spool"))
        with open(segment, "ab") as handle:
            handle.write(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)

    writer = context.Process(target=spool_and_die)
    writer.start()
    writer.join(30)
    journal = open_journal(url)  # takes the spool in as it opens: no error
    assert [row["filename"] for row in journal.placements(PlacementFilter())] == [f"before-{i}.png" for i in range(3)]
    folder = spool_folder(tmp_path / "journal.db")
    assert not list(folder.glob("*.spool")) and len(list(folder.glob("*.spool.damaged"))) == 1
    journal.keep([_values("after.png", "cut")])  # and the journal goes on
    assert len(journal.placements(PlacementFilter())) == 4


def test_a_spool_folder_belongs_to_one_postgresql_journal(postgres, tmp_path: Path) -> None:
    """Two journals taking one folder's files would each take them in: the folder is bound to the first."""
    folder = tmp_path / "spool"
    first = open_journal(new_database(postgres), spool=folder)
    first.keep([_values("first.png", "a")])
    with pytest.raises(JournalError, match=rf"spool folder {folder} belongs to another journal"):
        open_journal(new_database(postgres), spool=folder)
    assert [row["filename"] for row in first.placements(PlacementFilter())] == ["first.png"]
    first.close()
    assert first.spools and open_journal(first.url, spool=folder).placements(PlacementFilter())  # its own: fine


def test_a_cloned_spool_folder_does_not_make_its_twin_take_rows_twice(postgres, tmp_path: Path) -> None:
    """A replica's volume restored from another's snapshot carries the same spool identity: each folder's
    takes must leave the other's offsets alone (else the other reads its segments again from the start)."""
    url = new_database(postgres)
    first = open_journal(url, spool=tmp_path / "a")
    (tmp_path / "b").mkdir()
    for name in ("spool-id", "journal-id"):  # the clone: the same identity files, none of the segments
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    second = open_journal(url, spool=tmp_path / "b")
    second.keep([_values("b-early.png", "b")])
    second.take_spool()
    first.keep([_values("a.png", "a")])
    first.take_spool()
    first.take_spool()
    second.keep([_values("b-late.png", "b")])
    second.take_spool()
    names = sorted(row["filename"] for row in first.placements(PlacementFilter()))
    assert names == ["a.png", "b-early.png", "b-late.png"]


def test_a_postgresql_server_that_goes_away_fails_writes_and_reads_naming_the_journal(postgres) -> None:
    """Also in a thread that had no connection yet (a 503 naming the journal, not a 500)."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.harness.postgres import start_postgres

    server = start_postgres()
    url = new_database(server)
    journal = open_journal(url)
    server.stop()
    with ThreadPoolExecutor(1) as fresh_thread:
        for call, says in ((lambda: journal.keep([_values("a.png", "a")]), "could not be written"),
                           (lambda: journal.placements(PlacementFilter()), "cannot be read")):  # fmt: skip
            with pytest.raises(JournalError, match=f"journal {url}: .*{says}"):
                fresh_thread.submit(call).result()
