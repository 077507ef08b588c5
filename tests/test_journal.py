"""The journal (tsimcne_core/journal.py, issue 26): every placed image kept in SQLite, what a 2xx promises, the
client's metadata checked, and GET /placements reading it back, against a real `bentoml serve`."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.harness.cli import run_cli
from benchmarks.harness.postgres import new_database
from benchmarks.harness.servers import start_server
from tsimcne_core.journal import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CursorGone,
    JournalError,
    JournalRow,
    PlacementFilter,
    now,
    open_journal,
)
from tsimcne_core.journal_input import ClientMetadata, MetadataError, utc_time

SQL_LOOKING = "scope-2'; DROP TABLE placements; --"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def journal_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'journal.db'}"
    return new_database(request.getfixturevalue("postgres"))


@pytest.fixture(params=[*BACKENDS, "postgresql-spool"])
def journal_settings(request, tmp_path: Path) -> dict[str, str]:
    """The service's journal settings: SQLite (its spool beside it), PostgreSQL committing each batch, and
    PostgreSQL with a spool folder (journal_spool)."""
    if request.param == "sqlite":
        return {"journal": f"sqlite:///{tmp_path / 'journal.db'}"}
    settings = {"journal": new_database(request.getfixturevalue("postgres"))}
    if request.param == "postgresql-spool":
        settings["journal_spool"] = str(tmp_path / "spool")
    return settings


def _spool(settings: dict[str, str]) -> Path | None:
    """Where the service's journal spools, if it does."""
    if settings["journal"].startswith("sqlite:///"):
        return Path(settings["journal"].removeprefix("sqlite:///") + ".spool")
    return Path(settings["journal_spool"]) if "journal_spool" in settings else None


def _sql(url: str, statement: str) -> list[tuple]:
    """Run one statement on the journal's database directly (as an operator, or a fault, would)."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as connection, connection:
            return connection.execute(statement).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(statement)
        return cursor.fetchall() if cursor.description else []


def _row(name: str, flag: str = "in_distribution", source: str | None = None) -> JournalRow:
    return JournalRow(
        now(), "request-1", "abc", name, "0" * 64, 1.5, -2.5, flag, 0.4, {"features": 0.3, "pixels": 0.2},
        "lymphocyte", 0.8, [{"id": "ref/1.png", "index": 1, "label": "lymphocyte", "distance": 0.1}], None,
        source, "sample-7", ["validated"], np.full((4, 5, 3), 7, dtype=np.uint8),
    )  # fmt: skip


def test_rows_are_kept_found_by_filter_and_paged_by_cursor(journal_url: str) -> None:
    url = journal_url
    journal = open_journal(url)
    written = journal.write(
        [_row(f"{i}.png", "artefact" if i % 3 == 0 else "in_distribution", SQL_LOOKING) for i in range(7)]
    )
    assert written == 7 and journal.version() == SCHEMA_VERSION
    found = journal.placements(PlacementFilter(source=SQL_LOOKING))  # stored and found verbatim
    assert [row["filename"] for row in found] == [f"{i}.png" for i in range(7)]
    assert found[0]["evidence"] == {"features": 0.3, "pixels": 0.2} and found[0]["tags"] == ["validated"]
    assert [row["id"] for row in journal.placements(PlacementFilter(flag="artefact"))] == [1, 4, 7]
    first = journal.placements(PlacementFilter(), limit=3)
    second = journal.placements(PlacementFilter(), after=first[-1]["id"], limit=3)
    assert [r["id"] for r in first + second] == [1, 2, 3, 4, 5, 6]
    assert journal.placements(PlacementFilter(flag=SQL_LOOKING)) == []
    journal.close()
    reopened = open_journal(url)  # a restart keeps every row
    assert (
        reopened.placement(7)["filename"] == "6.png"
        and (reopened.image(7) == 7).all()
        and reopened.image(7).shape == (4, 5, 3)
    )
    assert reopened.placement(99) is None


def test_a_journal_that_cannot_be_used_is_refused_naming_it(journal_url: str) -> None:
    with pytest.raises(JournalError, match="give sqlite:///PATH or postgresql://"):
        open_journal("mysql://somewhere/db")
    open_journal(journal_url).close()
    _sql(journal_url, "UPDATE journal_schema SET version = 99")
    with pytest.raises(
        JournalError, match=rf"cannot be opened: schema version 99 is newer than this service's {SCHEMA_VERSION}"
    ):
        open_journal(journal_url)


def test_drift_counts_every_row_by_day_and_source_and_prune_keeps_them_true(journal_url: str) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for index in range(300):
        row = _row(f"{index}.png", rng.choice(["in_distribution", "artefact"], p=[0.9, 0.1]), rng.choice(["a", None]))
        rows.append(replace(
            row, time=f"2026-11-{1 + index % 3:02d}T{index % 24:02d}:00:00+00:00",
            majority_label=rng.choice(["lymphocyte", "neutrophil", None]),
            nearest_distance=float(rng.lognormal(0, 1)) if index % 10 else 0.0,
        ))  # fmt: skip
    journal = open_journal(journal_url)
    for start in range(0, len(rows), 7):  # batches, as the service writes them
        journal.write(rows[start : start + 7])

    def expected(kept: list[JournalRow]) -> list[tuple]:
        groups: dict[tuple, list[JournalRow]] = {}
        for row in kept:
            groups.setdefault((row.time[:10], row.source), []).append(row)
        return [
            (day, source, len(group), sum(r.flag != "in_distribution" for r in group),
             float(np.median([r.nearest_distance for r in group])))
            for (day, source), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or ""))
        ]  # fmt: skip

    def found() -> list[tuple]:
        return [
            (d["day"], d["source"], d["images"], d["flagged"], d["median_nearest_distance"]) for d in journal.drift()
        ]

    for got, want in zip(found(), expected(rows), strict=True):
        assert got[:4] == want[:4] and got[4] == pytest.approx(want[4], rel=0.026, abs=1e-9)
    sourceless = journal.placements(PlacementFilter(source=""), limit=1000)
    assert [r["filename"] for r in sourceless] == [
        r.filename for r in sorted(rows, key=lambda r: r.time) if r.source is None
    ]
    assert [d["day"] for d in journal.drift(since="2026-11-02", until="2026-11-02T23:00:00+00:00")] == [
        "2026-11-02"
    ] * 2
    day = journal.drift()[0]
    assert sum(day["labels"].values()) == pytest.approx(1) and set(day["labels"]) <= {
        "lymphocyte",
        "neutrophil",
        "none",
    }
    pruned = journal.prune("2026-11-02T12:00:00+00:00", chunk=7)  # several transactions of 7 rows
    assert pruned == sum(r.time < "2026-11-02T12:00:00+00:00" for r in rows)
    kept = [r for r in rows if r.time >= "2026-11-02T12:00:00+00:00"]
    assert utc_time("since", "2026-11-02T01:00:00Z") == utc_time("since", "2026-11-02T03:00:00+02:00")
    assert utc_time("until", "2026-11-02") == "2026-11-02T00:00:00.000000+00:00"
    assert utc_time("since", "2026-11-02T03:00:00 02:00") == utc_time("since", "2026-11-02T01:00Z")  # '+' unencoded
    with pytest.raises(MetadataError, match="since: 'yesterday' is not an ISO 8601 time"):
        utc_time("since", "yesterday")
    with pytest.raises(CursorGone, match="after: placement 1 no longer exists"):
        journal.placements(PlacementFilter(), after=1)
    for got, want in zip(found(), expected(kept), strict=True):
        assert got[:4] == want[:4] and got[4] == pytest.approx(want[4], rel=0.026, abs=1e-9)


@pytest.mark.parametrize(
    "where",
    [PlacementFilter(), PlacementFilter(flag="artefact"), PlacementFilter(source="a"), PlacementFilter(label="b"),
     PlacementFilter(review="fine"), PlacementFilter(flagged=True), PlacementFilter(flagged=True, review="unreviewed"),
     PlacementFilter(since="2026-01-01", flag="artefact"), PlacementFilter(since="2026-01-01"),
     PlacementFilter(source="a", flag="artefact"), PlacementFilter(flag="in_distribution"),
     PlacementFilter(review="unreviewed"), PlacementFilter(flagged=False), PlacementFilter(source="")],
)  # fmt: skip
def test_every_filtered_page_is_read_in_order_from_an_index(tmp_path: Path, where: PlacementFilter) -> None:
    """No page sorts its matches or scans the table (what keeps a first page fast at 10^7 rows:
    benchmarks/journal/scale.py): SQLite's plan for the page's query, with and without a cursor."""
    journal = open_journal(f"sqlite:///{tmp_path / 'journal.db'}")
    journal.write([_row("1.png")])
    clause, values = where.where("?")
    for keyset in ("", "(time, id) > (?, ?)"):
        condition = " AND ".join(part for part in (clause, keyset) if part)
        sql = f"SELECT * FROM placements {'WHERE ' + condition if condition else ''} ORDER BY time, id LIMIT 100"
        arguments = [*values, *(["2026", 1] if keyset else [])]
        plan = " | ".join(row[3] for row in _sql_plan(tmp_path / "journal.db", sql, arguments))
        assert "INDEX placements_" in plan and "TEMP B-TREE" not in plan, plan


def _sql_plan(path: Path, sql: str, arguments: list) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute(f"EXPLAIN QUERY PLAN {sql}", arguments).fetchall()


def test_a_first_version_journal_is_migrated_keeping_its_rows(journal_url: str) -> None:
    """A journal written by the first release (schema 1: no originals, no daily counts, no spool, PostgreSQL's
    images in TOAST storage) opens migrated."""
    mark, id_type, blob = ("?", "INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB")
    if journal_url.startswith("postgresql"):
        mark, id_type, blob = ("%s", "BIGSERIAL PRIMARY KEY", "BYTEA")
    statements = [step.format(id_type=id_type, blob=blob) for step in MIGRATIONS[1]]
    statements += ["CREATE TABLE journal_schema (version INTEGER NOT NULL)", "INSERT INTO journal_schema VALUES (1)"]
    for statement in statements:
        _sql(journal_url, statement)
    old = [replace(_row(f"{i}.png", source="a"), time=f"2026-10-0{1 + i % 2}T08:00:00+00:00") for i in range(5)]
    names = "time, request_id, bundle_sha256, filename, image_sha256, x, y, flag, score, evidence, majority_label, "
    names += "majority_share, neighbours, duplicate_of, source, sample_id, tags, nearest_distance, image"
    for row in old:  # as version 1 wrote them
        values = ", ".join(
            "NULL" if v is None else (f"'{v}'" if isinstance(v, str) else str(v)) for v in row.values()[:18]
        )
        _sql(journal_url, f"INSERT INTO placements ({names}) VALUES ({values}, NULL)")
    journal = open_journal(journal_url)
    assert journal.version() == SCHEMA_VERSION == 5
    assert len(_sql(journal_url, "SELECT id FROM journal_identity")) == 1  # version 5: spool folders bind to it
    if journal_url.startswith("postgresql"):  # version 4: a row stays in the table's page up to 8 kB
        options = _sql(journal_url, "SELECT reloptions FROM pg_class WHERE relname = 'placements'")
        assert options == [(["toast_tuple_target=8160"],)]
    in_time_order = ["0.png", "2.png", "4.png", "1.png", "3.png"]  # by time, then id
    assert [row["filename"] for row in journal.placements(PlacementFilter())] == in_time_order
    assert [row["filename"] for row in journal.placements(PlacementFilter(), after=5)] == ["1.png", "3.png"]
    assert [(d["day"], d["images"]) for d in journal.drift()] == [("2026-10-01", 3), ("2026-10-02", 2)]
    journal.write([replace(_row("new.png"), original=b"\x89PNG original bytes")])
    assert journal.original(6) == ("new.png", b"\x89PNG original bytes") and journal.original(1) is None
    del mark


def test_client_metadata_is_checked_naming_the_field() -> None:
    parsed = ClientMetadata.parse({"source": [SQL_LOOKING], "sample_id": ["S1"], "tags": ["a, b", "c"]})
    assert parsed == ClientMetadata(SQL_LOOKING, "S1", ("a", "b", "c"))
    with pytest.raises(MetadataError, match="source: given more than once"):
        ClientMetadata.parse({"source": ["a", "b"]})
    with pytest.raises(MetadataError, match="sample_id: control characters") as info:
        ClientMetadata.parse({"sample_id": ["a\nb"]})
    assert not info.value.too_large
    with pytest.raises(MetadataError, match="tags: 21 tags; at most 20") as info:
        ClientMetadata.parse({"tags": [",".join(str(i) for i in range(21))]})
    assert info.value.too_large


def _kill_tree(pid: int) -> None:
    """SIGKILL the server and its workers at once: nothing gets to flush or clean up."""
    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    parent.wait(timeout=20)


def test_every_acknowledged_image_is_in_the_journal_even_after_a_kill(service_bundle, tmp_path, journal_settings):
    bundle, data = service_bundle
    cells = sorted(data.rglob("*.png"))[:24]
    journal_url, spool = journal_settings["journal"], _spool(journal_settings)
    running = start_server(tmp_path, {"bundle": str(bundle), "workers": "2", **journal_settings}, home=tmp_path)
    try:
        running.wait_for_log("journal: ")
        params = {"source": SQL_LOOKING, "sample_id": "S-1", "tags": "validated,morning"}
        with running.client() as client, ThreadPoolExecutor(8) as pool:  # two workers writing at once
            answers = list(
                pool.map(
                    lambda path: client.post(
                        "/embed", params=params, files=[("images", (path.name, path.read_bytes()))]
                    ),
                    cells,
                )
            )
            assert [a.status_code for a in answers] == [200] * len(cells)
            assert len({a.headers["x-request-id"] for a in answers}) == len(cells)
            page = client.get("/placements", params={"source": SQL_LOOKING, "limit": 10}).json()
            assert len(page["placements"]) == 10 and page["next"] == page["placements"][-1]["id"]
            rest = client.get("/placements", params={"source": SQL_LOOKING, "after": page["next"], "limit": 100})
            rows = page["placements"] + rest.json()["placements"]
            assert sorted(r["filename"] for r in rows) == sorted(p.name for p in cells)
            placed = {a.json()["images"][0]["filename"]: a.json()["images"][0] for a in answers}
            for row in rows:  # what the journal keeps is what the client was answered
                assert (row["x"], row["y"], row["flag"]) == (
                    placed[row["filename"]]["x"],
                    placed[row["filename"]]["y"],
                    placed[row["filename"]]["flag"],
                )
                assert row["sample_id"] == "S-1" and row["tags"] == ["validated", "morning"]
            image = client.get(f"/placements/{rows[0]['id']}/image")
            assert image.headers["content-type"] == "image/png" and Image.open(io.BytesIO(image.content)).size == (
                16,
                16,
            )
            assert client.get("/placements", params={"format": "csv"}).text.startswith("id,time,request_id")
            assert client.get("/placements/999999").status_code == 404
            cell = cells[0].read_bytes()
            twice = client.post(
                "/embed", params=[("source", "a"), ("source", "b")], files=[("images", ("c.png", cell))]
            )
            assert twice.status_code == 400 and "source: given more than once" in twice.json()["error"]
            long = client.post("/embed", params={"sample_id": "x" * 201}, files=[("images", ("c.png", cell))])
            assert long.status_code == 413 and "sample_id" in long.json()["error"]
            # under load, killed: every answered image has its row, and no row is half-written
            acknowledged = []

            def post(path: Path) -> None:
                try:
                    reply = client.post(
                        "/embed", params={"source": "load"}, files=[("images", (path.name, path.read_bytes()))]
                    )
                except Exception:
                    return
                if reply.status_code == 200:
                    acknowledged.append(reply.headers["x-request-id"])

            futures = [pool.submit(post, path) for path in cells * 8]
            deadline = time.monotonic() + 120
            while len(acknowledged) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(acknowledged) >= 20
            _kill_tree(running.process.pid)
            for future in futures:
                future.result()
    finally:
        running.stop()
    # as the service's next start does (with a spool: takes in what was spooled)
    restarted = open_journal(journal_url, spool=journal_settings.get("journal_spool"))
    kept = [row[0] for row in _sql(journal_url, "SELECT request_id FROM placements WHERE source = 'load'")]
    half_written = _sql(journal_url, "SELECT count(*) FROM placements WHERE image IS NULL OR x IS NULL")
    assert set(acknowledged) <= set(kept) and len(kept) == len(set(kept)) and half_written == [(0,)]
    assert restarted.placements(PlacementFilter(source="load"), limit=1000)
    if spool is not None:  # the killed workers' spool segments were taken in and deleted
        assert not list(spool.glob("*.spool"))


def test_a_stopping_service_takes_its_spool_into_postgresql(service_bundle, tmp_path, postgres) -> None:
    """SIGTERM (a rollout, a scale-down): each worker takes in what it spooled before it exits, so a replica
    scaled away leaves nothing waiting on its own volume."""
    bundle, data = service_bundle
    cells = sorted(data.rglob("*.png"))[:12]
    url, spool = new_database(postgres), tmp_path / "spool"
    settings = {"bundle": str(bundle), "workers": "2", "journal": url, "journal_spool": str(spool)}
    running = start_server(tmp_path, settings, home=tmp_path)
    try:
        running.wait_for_log(f"batches spooled in {spool}")
        with running.client() as client, ThreadPoolExecutor(4) as pool:
            post = lambda path: client.post("/embed", files=[("images", (path.name, path.read_bytes()))])  # noqa: E731
            answers = list(pool.map(post, cells))
        assert [a.status_code for a in answers] == [200] * len(cells)
    finally:
        assert running.stop() == 0
    kept = _sql(url, "SELECT request_id FROM placements")  # read straight from the database: nobody took it since
    assert sorted(row[0] for row in kept) == sorted(a.headers["x-request-id"] for a in answers)
    assert not list(spool.glob("*.spool")) and "Completed async cleanup hook: shut_down" in running.log_text()


def test_a_journal_that_cannot_be_written_fails_the_request_with_503(service_bundle, tmp_path, journal_settings):
    bundle, data = service_bundle
    cell = sorted(data.rglob("*.png"))[0]
    journal_url, spooled = journal_settings["journal"], _spool(journal_settings) is not None
    running = start_server(tmp_path, {"bundle": str(bundle), "workers": "1", **journal_settings}, home=tmp_path)
    try:
        _sql(journal_url, "DROP TABLE placements")  # the journal breaks under the running service
        with running.client() as client:
            # PostgreSQL without a spool fails the request's own transaction; a spool keeps it (on disk, 200)
            # until the upkeep's next take into the database (within a second) fails, and refuses new requests
            # from then on
            deadline = time.monotonic() + 10
            while (
                reply := client.post("/embed", files=[("images", (cell.name, cell.read_bytes()))])
            ).status_code == 200:
                assert spooled and time.monotonic() < deadline
                time.sleep(0.2)
            assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
            assert f"journal {journal_url}" in reply.json()["error"] and "not kept" in reply.json()["error"]
            assert client.get("/placements").status_code == 503
            assert client.get("/readyz").status_code == 200  # the service itself goes on
    finally:
        running.stop()


def test_review_needs_the_token_and_drift_sums_each_day(service_bundle, tmp_path, journal_url) -> None:
    bundle, data = service_bundle
    cells = sorted(data.rglob("*.png"))[:6]
    token = "journal-token-0123456789abcdef"
    old = replace(_row("old.png"), time="2020-01-01T00:00:00+00:00")
    open_journal(journal_url).write([old])  # older than the retention: pruned when the service starts
    args = {
        "bundle": str(bundle), "workers": "1", "journal": journal_url, "api_token": token, "drift_refresh_s": "1",
        "journal_originals": "true", "journal_original_max_mb": "0.05", "journal_retention_days": "30",
    }  # fmt: skip
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(big)
    running = start_server(tmp_path, args, home=tmp_path)
    bearer = {"Authorization": f"Bearer {token}"}
    try:
        with running.client() as client:
            for index, path in enumerate(cells):
                source = "scope-a" if index < 4 else "scope-b"
                files = [("images", (path.name, path.read_bytes()))]
                assert client.post("/embed", params={"source": source}, files=files, headers=bearer).status_code == 200
            first = client.get("/placements", headers=bearer).json()["placements"][0]
            verdict = {"verdict": "fine", "reviewer": "dr. o'brien", "note": "clean cell; '); DROP TABLE x; --"}
            assert client.post(f"/placements/{first['id']}/review", json=verdict).status_code == 401
            reviewed = client.post(f"/placements/{first['id']}/review", json=verdict, headers=bearer)
            assert reviewed.status_code == 200, reviewed.text
            assert reviewed.json()["review"] == "fine" and reviewed.json()["review_note"] == verdict["note"]
            wrong = client.post(f"/placements/{first['id']}/review", json={"verdict": "maybe"}, headers=bearer)
            assert wrong.status_code == 400 and "verdict: 'maybe' is not one of fine, artefact" in wrong.json()["error"]
            unknown = client.post("/placements/999999/review", json=verdict, headers=bearer)
            assert unknown.status_code == 404
            only_fine = client.get("/placements", params={"review": "fine"}, headers=bearer).json()["placements"]
            assert [row["id"] for row in only_fine] == [first["id"]]
            drift = client.get("/drift", headers=bearer).json()
            assert [(d["source"], d["images"]) for d in drift["days"]] == [("scope-a", 4), ("scope-b", 2)]
            day = drift["days"][0]
            assert 0 <= day["flagged_share"] <= 1 and day["median_nearest_distance"] > 0
            assert (
                abs(sum(day["labels"].values()) - 1) < 1e-9 and abs(sum(drift["reference_labels"].values()) - 1) < 1e-9
            )
            too_big = client.post("/embed", files=[("images", ("big.png", big.read_bytes()))], headers=bearer)
            assert too_big.status_code == 413, too_big.text
            assert too_big.json()["error"].startswith(
                "big.png: 0.1 MiB; the journal keeps uploaded files up to 0.05 MiB"
            )
            bad_time = client.get("/placements", params={"since": "yesterday"}, headers=bearer)
            assert bad_time.status_code == 400 and "since: 'yesterday' is not an ISO 8601 time" in bad_time.text
            in_utc = client.get("/placements", params={"since": "2000-01-01T00:00:00Z", "limit": 1}, headers=bearer)
            assert in_utc.json()["placements"][0]["id"] == first["id"]
            kept = client.get(f"/placements/{first['id']}/original", headers=bearer)
            assert kept.status_code == 200 and kept.content == cells[0].read_bytes()
            assert cells[0].name in kept.headers["content-disposition"]
            assert all(
                row["filename"] != "old.png" for row in client.get("/placements", headers=bearer).json()["placements"]
            )
            table = pq.read_table(
                io.BytesIO(client.get("/placements?format=parquet&source=scope-b", headers=bearer).content)
            )
            assert table.column("filename").to_pylist() == [path.name for path in cells[4:]]
            assert json.loads(table.column("neighbours")[0].as_py())[0]["index"] >= 0
            deadline = time.monotonic() + 20
            while True:  # the drift gauges follow the journal within drift_refresh_s
                metrics = client.get("/metrics", headers=bearer).text
                if 'tsimcne_drift_images{source="scope-a"} 4.0' in metrics or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert (
                'tsimcne_drift_images{source="scope-a"} 4.0' in metrics
                and 'tsimcne_drift_images{source="scope-b"} 2.0' in metrics
            )
            assert (
                "tsimcne_flag_target_rate 0.01" in metrics
                and 'tsimcne_drift_flagged_share{source="scope-a"}' in metrics
            )
            assert "tsimcne_journal_rows_total 6.0" in metrics and "tsimcne_journal_write_seconds_count" in metrics
    finally:
        running.stop()


def test_the_journal_commands_export_count_and_prune(journal_url: str, tmp_path: Path) -> None:
    journal = open_journal(journal_url)
    rows = [_row(f"{i}.png", source=SQL_LOOKING if i % 2 else None) for i in range(5)]
    rows[:2] = [replace(row, time="2020-01-01T00:00:00+00:00") for row in rows[:2]]  # old rows
    journal.write(rows)
    stats = run_cli("journal", "stats", journal_url)
    assert stats.returncode == 0, stats.stderr
    assert "rows            5" in stats.stdout and f"schema_version  {SCHEMA_VERSION}" in stats.stdout
    out = tmp_path / "placements.csv"
    exported = run_cli("journal", "export", journal_url, "--out", str(out), "--source", SQL_LOOKING)
    assert exported.returncode == 0, exported.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,time,request_id") and len(lines) == 3 and not list(tmp_path.glob("*.partial"))
    jsonl = tmp_path / "all.jsonl"
    assert run_cli("journal", "export", journal_url, "--out", str(jsonl)).returncode == 0
    assert [json.loads(line)["filename"] for line in jsonl.read_text().splitlines()] == [f"{i}.png" for i in range(5)]
    pruned = run_cli("journal", "prune", journal_url, "--older-than-days", "365")
    assert pruned.returncode == 0 and "deleted 2 placements" in pruned.stdout
    assert [row["filename"] for row in journal.placements(PlacementFilter())] == ["2.png", "3.png", "4.png"]
    assert [day["images"] for day in journal.drift()] == [2, 1]  # the pruned day's counts went with it
    wrong = run_cli("journal", "stats", "mysql://nowhere/db")
    assert wrong.returncode == 2 and "give sqlite:///PATH" in wrong.stderr and "Traceback" not in wrong.stderr
