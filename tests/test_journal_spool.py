"""The SQLite journal's spool (tsimcne_core/journal_spool.py): batches appended by several processes are taken
into the database exactly once, whichever process takes them, and nothing in a spool file can run code."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import pytest

from tsimcne_core.journal import JournalError, JournalRow, PlacementFilter, now, open_journal
from tsimcne_core.journal_spool import FRAME_HEAD, MAGIC, spool_folder


def _values(name: str, source: str) -> tuple:
    return JournalRow(
        now(), "request", "abc", name, "0" * 64, 0.5, 1.5, "in_distribution", 0.1, {"pixels": 0.1}, "lymphocyte",
        1.0, [{"id": "r.png", "index": 0, "label": "lymphocyte", "distance": 0.2}], None, source, None, [],
    ).values()  # fmt: skip


def _spool_and_take(url: str, source: str, batches: int) -> None:
    """A worker: spools `batches` batches of 3 rows, taking the spool in now and then as the upkeep does."""
    journal = open_journal(url)
    for batch in range(batches):
        journal.keep([_values(f"{source}-{batch}-{i}.png", source) for i in range(3)])
        if batch % 7 == 0:
            journal.take_spool()
    journal.close()


def test_batches_spooled_by_several_processes_are_taken_in_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    open_journal(url).close()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_spool_and_take, args=(url, f"w{n}", 60)) for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    journal = open_journal(url)
    rows = journal.placements(PlacementFilter(), limit=1000)
    names = [row["filename"] for row in rows]
    assert len(names) == len(set(names)) == 3 * 60 * 3
    assert {row["source"] for row in rows} == {"w0", "w1", "w2"}
    assert sum(day["images"] for day in journal.drift()) == 540  # the daily counts came in with the rows
    assert not list(spool_folder(tmp_path / "journal.db").glob("*.spool"))  # every segment taken and deleted


def test_a_killed_writer_keeps_what_it_spooled_and_its_cut_off_frame_is_dropped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    reader = open_journal(url)
    context = multiprocessing.get_context("fork")
    ready = context.Event()

    def spool_then_hang() -> None:
        journal = open_journal(url)
        journal.keep([_values(f"kept-{i}.png", "killed") for i in range(4)])
        segment = next(spool_folder(tmp_path / "journal.db").glob("*.spool"))
        with open(segment, "ab") as handle:  # a frame its process died writing: its head and half its payload
            handle.write(FRAME_HEAD.pack(MAGIC, 1000) + b"\x80" * 500)
        ready.set()
        signal.pause()

    writer = context.Process(target=spool_then_hang)
    writer.start()
    assert ready.wait(30)
    assert [row["filename"] for row in reader.placements(PlacementFilter())] == [f"kept-{i}.png" for i in range(4)]
    assert list(spool_folder(tmp_path / "journal.db").glob("*.spool"))  # still held by its writer: kept
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(30)
    reader.take_spool()
    reader.take_spool()
    assert not list(spool_folder(tmp_path / "journal.db").glob("*.spool"))
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
