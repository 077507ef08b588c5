"""What the journal costs /embed (issue 26): the service without it and with each kind of journal, all started
at once and measured in turn, round after round, the order rotated every round.

    .venv/bin/python -m benchmarks.serve.journal_cost                 # ~10 minutes; alone on the machine
    .venv/bin/python -m benchmarks.serve.journal_cost --record        # kept in benchmarks/results/

Why rounds: on this shared 2-core machine two runs of the same server differ by 3-6 %, and a benchmark that
measures one variant after the other (benchmarks/serve/hot_path.py) lets a slow stretch fall on one variant
only. Here every variant is measured in every round, each round's figures are set against the same round's
service without a journal, and the figure is the median over rounds (with the lowest and highest).

Variants (the PBC bundle of benchmarks/serve/bundles.py, the service's defaults: one worker per core):
- no journal;
- `sqlite`: the embedded default (its spool beside the database);
- `postgresql`: each batch committed before its answer (several batches gathered into one transaction);
- `postgresql-spool`: PostgreSQL with a spool folder (setting journal_spool).
PostgreSQL is a throwaway server (benchmarks/harness/postgres.py) on the same two cores, a database per
variant. Load: wrk, 16 connections, 1 and 8 PBC cells a request (multipart), as in hot_path.py.

Besides requests/s: the CPU time a request of the service's own processes (user + system) and of the
PostgreSQL server's, over the measured seconds. The service's share is what the journal costs the machines
that serve when the database is on a server of its own, which this machine cannot measure directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from benchmarks.harness.postgres import new_database, start_postgres
from benchmarks.results import RESULTS, STARTED, record
from benchmarks.serve import bundles
from benchmarks.serve.hot_path import (
    PACKAGES,
    WORK,
    Server,
    _embed,
    free_port,
    png_bodies,
    start,
    stop,
    wait_for_workers,
    wrk,
    wrk_version,
)

VARIANTS = ("none", "sqlite", "postgresql", "postgresql-spool")
CASES = ("multipart-1", "multipart-8")


@dataclass
class Measured:
    variant: str
    case: str
    round: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    service_cpu_us: float  # the service's processes, a request
    postgres_cpu_us: float  # the PostgreSQL server's processes, a request


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            continue
    return total


def _postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def _service_processes(root: int) -> list[psutil.Process]:
    process = psutil.Process(root)
    return [process, *process.children(recursive=True)]


def _server(variant: str, bundle: Path, work: Path, postgres) -> Server:
    settings: dict[str, str] = {}
    if variant == "sqlite":
        settings["journal"] = f"sqlite:///{work / 'sqlite' / 'journal.db'}"
    elif variant.startswith("postgresql"):
        settings["journal"] = new_database(postgres, variant.replace("-", "_"))
        if variant == "postgresql-spool":
            settings["journal_spool"] = str(work / "spool")
    server = _embed(bundle, variant, **settings)
    server.env["BENTOML_HOME"] = str(work / f"home-{variant}")
    return server


def measure_round(
    number: int, running: dict[str, tuple[int, int]], bodies: dict, seconds: float, warm_up: float
) -> list[Measured]:
    """Every variant in turn (the order rotated by the round's number), each body after `warm_up` seconds of it."""
    order = list(running)
    order = order[number % len(order) :] + order[: number % len(order)]
    rows = []
    for variant in order:
        port, root = running[variant]
        for case in CASES:
            wrk(port, case, bodies[case], warm_up)
            service, database = _service_processes(root), _postgres_processes()
            before = _cpu_seconds(service), _cpu_seconds(database)
            result = wrk(port, case, bodies[case], seconds)
            after = _cpu_seconds(service), _cpu_seconds(database)
            requests = max(result["requests"], 1)
            rate = result["requests"] / (result["duration_us"] / 1e6)
            rows.append(
                Measured(
                    variant=variant,
                    case=case,
                    round=number,
                    requests_per_s=round(rate, 1),
                    images_per_s=round(rate * (8 if case.endswith("-8") else 1), 1),
                    p50_ms=result["latency_us"]["p50"] / 1000,
                    p99_ms=result["latency_us"]["p99"] / 1000,
                    non_2xx=result["errors"]["status"],
                    service_cpu_us=round(1e6 * (after[0] - before[0]) / requests, 1),
                    postgres_cpu_us=round(1e6 * (after[1] - before[1]) / requests, 1),
                )
            )
            row = rows[-1]
            print(
                f"round {number} {variant:18} {case:12} {row.requests_per_s:8,.0f} req/s  service "
                f"{row.service_cpu_us:7.0f} µs  postgres {row.postgres_cpu_us:5.0f} µs a request  "
                f"non-2xx {row.non_2xx}",
                flush=True,
            )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per variant and body: the medians over rounds, and each round's requests/s against the same round's
    service without a journal (median, lowest, highest)."""
    base = {(r["case"], r["round"]): r for r in rows if r["variant"] == "none"}
    found = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for case in CASES:
            mine = [r for r in rows if r["variant"] == variant and r["case"] == case]
            if not mine:
                continue
            against = [100 * (r["requests_per_s"] / base[(case, r["round"])]["requests_per_s"] - 1) for r in mine]
            extra_cpu = [r["service_cpu_us"] - base[(case, r["round"])]["service_cpu_us"] for r in mine]
            found.append({
                "variant": variant, "case": case, "rounds": len(mine),
                "requests_per_s": statistics.median(r["requests_per_s"] for r in mine),
                "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                "against_none_percent": round(statistics.median(against), 1),
                "against_none_low": round(min(against), 1), "against_none_high": round(max(against), 1),
                "p99_ms": statistics.median(r["p99_ms"] for r in mine),
                "service_cpu_us": statistics.median(r["service_cpu_us"] for r in mine),
                "service_cpu_added_percent": round(
                    100 * statistics.median(extra_cpu) / statistics.median(base[(case, r["round"])]["service_cpu_us"]
                                                                          for r in mine), 1),
                "postgres_cpu_us": statistics.median(r["postgres_cpu_us"] for r in mine),
                "non_2xx": sum(r["non_2xx"] for r in mine),
            })  # fmt: skip
    return found


def report_table(report: dict) -> str:
    """The README's table of a result file: where and how, then a row per variant and body."""
    host = report["machine"]
    lines = [
        f"Measured {report['started']} - {report['finished']} on {host['cpu']}, {host['usable_cores']} usable "
        f"cores, {host['memory_gib']} GiB; `{report['command']}`; {report['rounds']} rounds of "
        f"{report['seconds_per_row']:g} s a body and variant, 16 connections.",
        "",
        "| journal | body | requests/s | against none (median; lowest, highest round) | p99 ms | service CPU "
        "µs a request (added) | PostgreSQL CPU µs a request | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["summary"]:
        low, high = row["against_none_low"], row["against_none_high"]
        against = "-" if row["variant"] == "none" else f"{row['against_none_percent']:+.1f} % ({low:+.1f}, {high:+.1f})"
        added = "" if row["variant"] == "none" else f" ({row['service_cpu_added_percent']:+.1f} %)"
        lines.append(
            f"| {row['variant']} | {row['case']} | {row['requests_per_s']:,.0f} | {against} | {row['p99_ms']:.1f} | "
            f"{row['service_cpu_us']:,.0f}{added} | {row['postgres_cpu_us']:,.0f} | {row['non_2xx']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=WORK / "bundles" / "pbc-17k")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warm-up", type=float, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, help="the result file (default: benchmarks/scratch/serve/)")
    parser.add_argument("--record", action="store_true", help="keep the result in benchmarks/results/")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "none" not in variants:
        parser.error(f"--variants: give 'none' and any of {', '.join(VARIANTS[1:])} (not {', '.join(unknown)})")
    if not (args.bundle / "bundle.json").is_file():
        print("making the PBC bundle (benchmarks/serve/bundles.py; minutes) ...", flush=True)
        bundles.small_bundle(WORK, "2,1,1")
    work = Path(tempfile.mkdtemp(prefix="journal-cost-", dir=WORK if WORK.exists() else None))
    bodies = png_bodies(work)
    postgres = start_postgres() if any(v.startswith("postgresql") for v in variants) else None
    processes = {}
    running: dict[str, tuple[int, int]] = {}
    rows: list[Measured] = []
    try:
        for variant in variants:  # all at once: an idle service costs next to nothing
            server = _server(variant, args.bundle.resolve(), work, postgres)
            port, log = free_port(), work / f"{variant}.log"
            processes[variant] = start(server, port, log)
            wait_for_workers(log)
            running[variant] = (port, processes[variant].pid)
        for number in range(args.rounds):
            rows += measure_round(number, running, bodies, args.seconds, args.warm_up)
    finally:
        for process in processes.values():
            stop(process)
        if postgres is not None:
            postgres.stop()
    for variant in variants:
        if "Traceback" in (work / f"{variant}.log").read_text():
            print(f"warning: {work / f'{variant}.log'} holds a traceback", flush=True)
    for scratch in ("sqlite", "spool", *(f"home-{variant}" for variant in variants)):
        shutil.rmtree(work / scratch, ignore_errors=True)  # the journals (a GB a run); the logs stay
    measured = [asdict(row) for row in rows]
    payload = {"rounds": args.rounds, "seconds_per_row": args.seconds, "rows": measured, "summary": summary(measured)}
    default = (RESULTS if args.record else WORK) / f"serve-journal-cost-{STARTED:%Y-%m-%d}.json"
    out = record(payload, args.out or default, packages=PACKAGES, load_generator=wrk_version())
    print(report_table(json.loads(out.read_text())))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
