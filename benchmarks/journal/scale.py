"""The journal at 10,000,000 rows (issue 26): filtered first pages of GET /placements and 30 days of /drift,
through a real `bentoml serve`, on a generated journal; the database's size per row.

    .venv/bin/python -m benchmarks.journal.scale                      # 10M rows in SQLite (~25 GB, made once)
    .venv/bin/python -m benchmarks.journal.scale --rows 100000        # a quick look
    .venv/bin/python -m benchmarks.journal.scale --backend postgresql # the same in a throwaway PostgreSQL

The rows are what the service writes (tsimcne_core/journal.py `write_values`, daily counts included), 30 days
of them in time order: 8 sources (one busy, one rare), 8 labels, 0.8 % artefacts and 0.7 % out of
distribution, a 28 px image each (the PBC bundle's model size; 1,000 different ones reused). Every query is
timed from the client (wall time of the HTTP answer, JSON included) `--repeat` times after one warm-up;
the table gives the median and the worst. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np

from benchmarks.harness.postgres import start_postgres
from benchmarks.harness.servers import start_server
from benchmarks.results import record
from tsimcne_core.journal import SqlJournal, open_journal

WORK = Path(__file__).resolve().parents[1] / "scratch" / "journal"
BUNDLE = Path(__file__).resolve().parents[1] / "scratch" / "serve" / "bundles" / "pbc-17k"
SOURCES = ["scope-1"] * 10 + ["scope-2"] * 5 + ["scope-3"] * 3 + ["scope-4", "scope-5", "scope-6", "scope-7"]
RARE_SOURCE = "scope-rare"  # one row in 50,000
LABELS = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
CHUNK = 20_000
POSTGRES_SETTINGS = {"shared_buffers": "4GB", "max_wal_size": "8GB", "checkpoint_timeout": "15min"}
DAYS = 30


def generate(journal: SqlJournal, rows: int, end: datetime, seed: int = 0) -> float:
    """`rows` rows over the DAYS days before `end`, in time order, CHUNK a transaction; seconds taken."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, 28 * 28 * 3, dtype=np.uint8).tobytes() for _ in range(1000)]
    start = end - timedelta(days=DAYS)
    step = (end - start) / rows
    began = time.perf_counter()
    for first in range(0, rows, CHUNK):
        count = min(CHUNK, rows - first)
        flags = rng.choice(["in_distribution", "artefact", "out_of_distribution"], count, p=[0.985, 0.008, 0.007])
        labels = rng.integers(0, len(LABELS), count)
        sources = rng.integers(0, len(SOURCES), count)
        distances = rng.lognormal(-1, 0.5, count)
        values = []
        for i in range(count):
            index = first + i
            source = RARE_SOURCE if index % 50_000 == 7 else SOURCES[sources[i]]
            label = LABELS[labels[i]]
            neighbours = [
                {"id": f"ref/{(index * 7 + k) % 17092}.png", "index": (index * 7 + k) % 17092, "label": label,
                 "distance": float(distances[i] * (1 + k / 10))}
                for k in range(5)
            ]  # fmt: skip
            values.append((
                (start + step * index).isoformat(timespec="microseconds"), f"req-{index // 4}", "b" * 64,
                f"cell-{index}.png", f"{index:064x}", float(rng.normal()), float(rng.normal()), str(flags[i]),
                float(distances[i]), json.dumps({"features": 0.5, "pixels": 0.3, "position": 0.2}), label, 0.8,
                json.dumps(neighbours), None, source, f"sample-{index // 1000}", "[]", float(distances[i]),
                images[index % 1000], 28, 28, None,
            ))  # fmt: skip
        journal.write_values(values)
        done = first + count
        if done % (CHUNK * 25) == 0 or done == rows:
            rate = done / (time.perf_counter() - began)
            print(f"  {done:,} rows ({rate:,.0f} rows/s)", flush=True)
    return time.perf_counter() - began


QUERIES = {
    "first page, no filter": "/placements?limit=100",
    "flag=artefact": "/placements?flag=artefact&limit=100",
    "flagged=true&review=unreviewed (the review queue)": "/placements?flagged=true&review=unreviewed&limit=100",
    "source=scope-4": "/placements?source=scope-4&limit=100",
    "source=scope-rare (1 row in 50,000)": f"/placements?source={RARE_SOURCE}&limit=100",
    "label=basophil": "/placements?label=basophil&limit=100",
    "since=last day": "/placements?since={last_day}&limit=100",
    "since=last day&flagged=true": "/placements?since={last_day}&flagged=true&limit=100",
    "source=scope-2&flag=artefact": "/placements?source=scope-2&flag=artefact&limit=100",
    "page 1,000 rows, cursor in the middle": "/placements?after={middle}&limit=1000",
    "/drift, 30 days": "/drift?since={month_ago}",
    "/drift, all": "/drift",
}


def time_queries(url: str, rows: int, end: datetime, repeat: int) -> list[dict]:
    values = {
        "last_day": (end - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "month_ago": (end - timedelta(days=DAYS)).date().isoformat(),
        "middle": rows // 2,
    }
    results = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, path in QUERIES.items():
            path = path.format(**values)
            answer = client.get(path)  # warm-up (and a check)
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")
            found = len(answer.json().get("placements", answer.json().get("days", [])))
            seconds = []
            for _ in range(repeat):
                began = time.perf_counter()
                client.get(path).raise_for_status()
                seconds.append(time.perf_counter() - began)
            results.append({
                "query": name, "path": path, "rows_answered": found,
                "median_ms": 1000 * statistics.median(seconds), "max_ms": 1000 * max(seconds),
            })  # fmt: skip
            print(f"  {name:<52} {results[-1]['median_ms']:8.1f} ms (max {results[-1]['max_ms']:.1f}), {found} rows")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--make-only", action="store_true", help="generate the journal, time nothing")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    end = datetime(2026, 12, 1, tzinfo=UTC)
    postgres = None
    if args.backend == "sqlite":
        path = WORK / f"journal-{args.rows}.db"
        url = f"sqlite:///{path}"
        fresh = not path.exists()
    else:
        # a server sized for a 40 GB table on this machine (the defaults' 128 MB of buffers are a laptop's)
        postgres = start_postgres(POSTGRES_SETTINGS)
        url, fresh = postgres.url, True
    try:
        journal = open_journal(url)
        made = None
        if fresh or journal.stats()["rows"] != args.rows:
            print(f"generating {args.rows:,} rows in {journal.describe()} ...")
            made = generate(journal, args.rows, end)
        if args.backend == "sqlite":
            journal._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the size is the database's alone
        size = _size(journal, url)
        print(f"{args.rows:,} rows, {size / 1e9:.2f} GB: {size / args.rows:,.0f} bytes a row")
        if args.make_only:
            return
        with tempfile.TemporaryDirectory() as home:
            server = start_server(
                Path(home), {"bundle": str(args.bundle), "journal": url}, home=Path(home), ready_timeout=600
            )
            try:
                queries = time_queries(server.url, args.rows, end, args.repeat)
            finally:
                server.stop()
    finally:
        if postgres is not None:
            postgres.stop()
    payload = {
        "postgres_settings": POSTGRES_SETTINGS if args.backend == "postgresql" else None,
        "backend": args.backend, "rows": args.rows, "days": DAYS, "database_bytes": size,
        "bytes_per_row": size / args.rows, "generation_seconds": made, "repeat": args.repeat, "queries": queries,
    }  # fmt: skip
    out = args.out or WORK / f"journal-scale-{args.backend}-{args.rows}.json"
    print(f"wrote {record(payload, out, packages=('bentoml', 'psycopg'))}")


def report_table(report: dict) -> str:
    """The result as benchmarks/README.md shows it (benchmarks/tables.py draws it from the file)."""
    machine = report["machine"]
    lines = [
        f"Measured {report['started']} - {report['finished']} on {machine['cpu']}, {machine['usable_cores']} usable "
        f"cores, {machine['memory_gib']} GiB; `{report['command']}`; {report['backend']}, {report['rows']:,} rows "
        f"over {report['days']} days, {report['database_bytes'] / 1e9:.1f} GB: **{report['bytes_per_row']:,.0f} "
        f"bytes a row**; each query {report.get('repeat', 10)} times after a warm-up, from the client.",
        "",
        "| query | rows answered | median ms | worst ms |",
        "|---|---|---|---|",
    ]
    for query in report["queries"]:
        lines.append(
            f"| {query['query']} | {query['rows_answered']:,} | {query['median_ms']:.1f} | {query['max_ms']:.1f} |"
        )
    return "\n".join(lines)


def _size(journal: SqlJournal, url: str) -> int:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    cursor = journal._connection().cursor()
    cursor.execute("SELECT pg_database_size(current_database())")
    size = int(cursor.fetchone()[0])
    journal._connection().commit()
    return size


if __name__ == "__main__":
    main()
