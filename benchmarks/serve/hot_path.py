"""POST /embed against the floors of the servers under it, in one run on the same cores (issue 24).

    .venv/bin/python -m benchmarks.serve.hot_path                # the table (~15 minutes; the first time it
                                                                 # also makes the two bundles: ~35 minutes)
    .venv/bin/python -m benchmarks.serve.hot_path --soak 600     # + 10 minutes at full load, worker RSS every 10 s

Every server gets the whole machine in turn and is driven by wrk (Debian's `wrk`: a C load generator that
takes a fraction of one core, so the figures are the server's), `-t1 -c16` (16 connections), `--seconds`
per row after `--warm-up` seconds of the same load. The bodies are real PBC cells (28 px PNG, a seeded
sample of ../shared/data/bloodcells/pbc_28.npz), 64 different bodies sent in turn, with 1 and with 8
images per request, as multipart/form-data and (for /embed) as a raw image body. Rows:
- `starlette`: a plain Starlette app parsing the same multipart upload, reading each file, answering a
  small JSON (benchmarks/serve/floors/starlette_app.py), 1 and 2 uvicorn workers;
- `bentoml-default` / `bentoml-tuned`: a BentoML service with /embed's upload type answering a constant
  (benchmarks/serve/floors/bentoml_service.py), BentoML's defaults / access log, tracing and request
  metrics off; 1 and 2 workers;
- `embed`: the service (`bentoml serve serving.service:MapService`) with its defaults (one worker per
  core) and with `workers=1`, on the PBC bundle (17,092 reference images), and with its defaults on the
  1,000,000-image bundle.
Results: JSON with the machine, date, command, versions and every row (requests/s, images/s, latency
percentiles, wrk's error counts, non-2xx answers) in benchmarks/scratch/serve/hot_path-<date>.json, and a
markdown table printed for benchmarks/README.md. Run it alone: anything else on the machine is measured too.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
from benchmarks.results import RESULTS, record  # noqa: E402
from benchmarks.serve import bundles  # noqa: E402

PACKAGES = ("bentoml", "uvicorn", "starlette", "uvloop", "httptools", "onnxruntime", "numpy", "orjson", "faiss-cpu")

PBC = ROOT.parent / "shared" / "data" / "bloodcells" / "pbc_28.npz"
WORK = ROOT / "benchmarks" / "scratch" / "serve"
LUA = Path(__file__).with_name("post.lua")
BIN = Path(sys.executable).parent
BOUNDARY = "tsimcne-benchmark-7f3a9c"
BODIES = 64
WRK = os.environ.get("WRK", "wrk")  # the load generator (WRK=path: a copy carried to a machine without it)


@dataclass
class Server:
    name: str  # row label
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cases: tuple[str, ...] = ("multipart-1", "multipart-8")
    bundle: str = ""


@dataclass
class Row:
    server: str
    case: str
    bundle: str
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    seconds: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bodies(work: Path) -> dict[str, list[Path]]:
    """Request bodies of real PBC cells: multipart with 1 and 8 images, and raw PNG, BODIES of each."""
    with np.load(PBC, allow_pickle=False) as data:
        picked = np.random.default_rng(0).permutation(len(data["images"]))[: BODIES * 8]
        images = data["images"][np.sort(picked)]
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    folder = work / "bodies"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cases: dict[str, list[Path]] = {"multipart-1": [], "multipart-8": [], "raw-1": []}
    for body in range(BODIES):
        for per_request in (1, 8):
            parts = [
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="cell{body}-{i}.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + pngs[body * 8 + i]
                + b"\r\n"
                for i in range(per_request)
            ]
            path = folder / f"multipart-{per_request}-{body}.bin"
            path.write_bytes(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
            cases[f"multipart-{per_request}"].append(path)
        path = folder / f"raw-{body}.png"
        path.write_bytes(pngs[body * 8])
        cases["raw-1"].append(path)
    return cases


def start(server: Server, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "PYTHONUNBUFFERED": "1", **server.env}
    env = {k: v for k, v in env.items() if not (k.startswith("TSIMCNE_") and k not in server.env)}
    command = [part.replace("{port}", str(port)) for part in server.command]
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {process.returncode}; see {log}")
        if _ready(port, server):
            return process
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"{server.name} not ready after 180 s; see {log}")


def _ready(port: int, server: Server) -> bool:
    """/readyz for BentoML (every worker logs 'initialized' first when there are several), a POST otherwise."""
    import httpx

    try:
        if "uvicorn" in server.command[0]:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code in (404, 405)
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for_workers(log: Path, workers: int | None = None, timeout: float = 180) -> None:
    """Until every worker logged that it started: `workers`, or as many as the service says it plans."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        planned = re.search(r"(\d+) worker\(s\) x", text)
        expected = workers or (int(planned.group(1)) if planned else None)
        started = set(re.findall(r"\[entry_service:\w+:(\d+)\] Service \w+ initialized", text))
        if expected is not None and len(started) >= expected:
            return
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wrk(port: int, case: str, bodies: list[Path], seconds: float) -> dict:
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if case.startswith("multipart") else "image/png"
    url = f"http://127.0.0.1:{port}/embed" + ("?filename=cell.png" if case.startswith("raw") else "")
    duration = max(1, math.ceil(seconds))  # wrk takes whole seconds
    command = [WRK, "-t1", "-c16", f"-d{duration}s", "--latency", "-s", str(LUA), url, "--", content_type]
    result = subprocess.run([*command, *map(str, bodies)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    found = re.search(r"^WRK_RESULT (.*)$", result.stdout, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{result.stdout}\n{result.stderr}")
    return json.loads(found.group(1))


def measure(server: Server, bodies: dict[str, list[Path]], seconds: float, warm_up: float, logs: Path) -> list[Row]:
    port = free_port()
    log = logs / f"{server.name}-{server.bundle or 'floor'}.log"
    process = start(server, port, log)
    rows = []
    try:
        if "bentoml" in server.command[0]:
            workers = server.env.get("TSIMCNE_WORKERS") or server.env.get("TSIMCNE_FLOOR_WORKERS")
            wait_for_workers(log, int(workers) if workers else None)  # None: as many as the service plans
        for case in server.cases:
            wrk(port, case, bodies[case], warm_up)
            result = wrk(port, case, bodies[case], seconds)
            per_request = 8 if case.endswith("-8") else 1
            duration = result["duration_us"] / 1e6
            errors = result["errors"]
            rate = result["requests"] / duration
            latency = result["latency_us"]
            rows.append(
                Row(
                    server=server.name,
                    case=case,
                    bundle=server.bundle,
                    requests_per_s=round(rate, 1),
                    images_per_s=round(rate * per_request, 1),
                    p50_ms=latency["p50"] / 1000,
                    p90_ms=latency["p90"] / 1000,
                    p99_ms=latency["p99"] / 1000,
                    p999_ms=latency["p999"] / 1000,
                    requests=result["requests"],
                    non_2xx=errors["status"],
                    socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
                    seconds=round(duration, 1),
                )
            )
            print(_line(rows[-1]), flush=True)
    finally:
        stop(process)
    if "Traceback" in log.read_text():
        print(f"warning: {log} holds a traceback", flush=True)
    return rows


def soak(bundle: Path, bodies: list[Path], seconds: float, logs: Path, provider: str = "cpu") -> dict:
    """`seconds` of /embed at full load (16 connections, one image a request) with every worker's RSS read
    every 10 s; the figure: the last reading against the one after the first minute."""
    import psutil

    server = _embed(bundle, "embed", provider=provider)
    server.env["BENTOML_HOME"] = str(logs / "bentoml-home")
    port = free_port()
    log = logs / "soak.log"
    process = start(server, port, log)
    wait_for_workers(log)
    samples: list[dict] = []
    try:
        load = subprocess.Popen(
            [WRK, "-t1", "-c16", f"-d{max(1, math.ceil(seconds))}s", "-s", str(LUA), f"http://127.0.0.1:{port}/embed",
             "--",
             f"multipart/form-data; boundary={BOUNDARY}", *map(str, bodies)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started = time.monotonic()
        while load.poll() is None:
            time.sleep(10 - (time.monotonic() - started) % 10)
            workers = [
                p
                for p in psutil.Process(process.pid).children(recursive=True)
                if "_bentoml_impl" in " ".join(p.cmdline())
            ]
            rss = {str(p.pid): round(p.memory_info().rss / 2**20, 1) for p in workers}
            samples.append({"t": round(time.monotonic() - started), "rss_mib": rss})
            print(f"  {samples[-1]}", flush=True)
        out = load.stdout.read() if load.stdout else ""
    finally:
        stop(process)
    found = re.search(r"^WRK_RESULT (.*)$", out, flags=re.MULTILINE)
    result = json.loads(found.group(1)) if found else {}
    first = next(s for s in samples if s["t"] >= 60)["rss_mib"]
    last = samples[-2]["rss_mib"] if samples[-1]["t"] > seconds else samples[-1]["rss_mib"]
    growth = {pid: round(100 * (last[pid] - first[pid]) / first[pid], 2) for pid in first if pid in last}
    return {"seconds": seconds, "samples": samples, "growth_percent_after_first_minute": growth, "wrk": result}


def _embed(bundle: Path, name: str, **settings: str) -> Server:
    env = {f"TSIMCNE_{key.upper()}": value for key, value in settings.items()}
    command = [str(BIN / "bentoml"), "serve", "serving.service:MapService", "--host", "127.0.0.1", "--port", "{port}"]
    return Server(
        name, [*command, "--arg", f"bundle={bundle}"], env, ("multipart-1", "multipart-8", "raw-1"), bundle.name
    )


def servers(small: Path, large: Path | None, home: Path) -> list[Server]:
    uvicorn = [str(BIN / "uvicorn"), "benchmarks.serve.floors.starlette_app:app", "--host", "127.0.0.1"]
    floor = [str(BIN / "bentoml"), "serve", "benchmarks.serve.floors.bentoml_service:Floor", "--host", "127.0.0.1"]
    rows = []
    for workers in (1, 2):
        rows.append(
            Server(
                f"starlette ({workers} worker)",
                [*uvicorn, "--port", "{port}", "--no-access-log", "--workers", str(workers)],
            )
        )
    for kind in ("default", "tuned"):
        for workers in (1, 2):
            env = {"TSIMCNE_FLOOR": kind, "TSIMCNE_FLOOR_WORKERS": str(workers), "BENTOML_HOME": str(home)}
            rows.append(Server(f"bentoml-{kind} ({workers} worker)", [*floor, "--port", "{port}"], env))
    home_env = {"BENTOML_HOME": str(home)}
    embed_default = _embed(small, "embed (defaults)")
    embed_default.env.update(home_env)
    one = _embed(small, "embed (workers=1)", workers="1")
    one.env.update(home_env)
    rows += [embed_default, one]
    if large is not None:
        big = _embed(large, "embed (defaults)")
        big.env.update(home_env)
        rows.append(big)
    return rows


def wrk_version() -> str:
    found = subprocess.run([WRK, "-v"], capture_output=True, text=True).stdout.splitlines()[0:1]
    return found[0] if found else "wrk"


def _line(row: Row) -> str:
    return (
        f"{row.server:28} {row.bundle or '-':9} {row.case:12} {row.requests_per_s:9,.0f} req/s "
        f"{row.images_per_s:9,.0f} img/s  p50 {row.p50_ms:6.1f} p99 {row.p99_ms:6.1f} ms  non-2xx {row.non_2xx}"
    )


def report_table(report: dict) -> str:
    """The README's table of a result file: where and how it was measured, then every row."""
    host = report["machine"]
    heading = (
        f"Measured {report['started']} - {report['finished']} on {host['cpu']}, {host['usable_cores']} usable "
        f"cores, {host['memory_gib']} GiB; `{report['command']}`; {report['connections']} connections, "
        f"{report['seconds_per_row']:g} s a row, provider {report['provider']}."
    )
    return heading + "\n\n" + table(report["rows"])


def table(rows: list[dict]) -> str:
    lines = [
        "| server | bundle | body | requests/s | images/s | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['bundle'] or '-'} | {row['case']} | {row['requests_per_s']:,.0f} | "
            f"{row['images_per_s']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['non_2xx']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=WORK / "bundles" / "pbc-17k")
    parser.add_argument(
        "--large-bundle", type=Path, default=WORK / "bundles" / "pbc-1m", help="'none': leave its rows out"
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warm-up", type=float, default=5)
    parser.add_argument("--only", help="run only the servers whose name contains this text")
    parser.add_argument("--soak", type=float, default=0, help="also run /embed this many seconds, RSS every 10 s")
    parser.add_argument("--provider", default="cpu", help="onnxruntime provider of the /embed rows (cuda on a GPU)")
    parser.add_argument(
        "--journal",
        default="",
        help="also serve the PBC bundle with the journal on: sqlite, postgresql (a commit per batch), "
        "postgresql-spool (setting journal_spool), comma-separated; postgresql starts a throwaway server "
        "(benchmarks/harness/postgres.py)",
    )
    parser.add_argument("--out", type=Path, help="the result file (default: benchmarks/scratch/serve/)")
    parser.add_argument(
        "--record", action="store_true", help="keep the result in benchmarks/results/ (cited by the README)"
    )
    args = parser.parse_args()
    if shutil.which(WRK) is None:
        sys.exit(f"error: {WRK} not found: install wrk (apt-get install wrk) or name it in WRK=")
    defaults = WORK / "bundles"
    if not (args.bundle / "bundle.json").is_file():
        if args.bundle != defaults / "pbc-17k":
            sys.exit(f"error: {args.bundle}: no bundle (benchmarks/serve/bundles.py makes the default ones)")
        print("making the PBC bundle (benchmarks/serve/bundles.py; minutes) ...", flush=True)
        bundles.small_bundle(WORK, "2,1,1")
    if args.large_bundle == defaults / "pbc-1m" and not (args.large_bundle / "bundle.json").is_file():
        print("making the 1,000,000-image bundle (benchmarks/serve/bundles.py; ~30 minutes) ...", flush=True)
        bundles.large_bundle(WORK, 1_000_000)
    large = args.large_bundle if (args.large_bundle / "bundle.json").is_file() else None
    if large is None:
        print(f"note: {args.large_bundle} not found; the 1,000,000-image rows are left out", flush=True)
    work = Path(tempfile.mkdtemp(prefix="hot-path-", dir=WORK if WORK.exists() else None))
    bodies = png_bodies(work)
    started = datetime.now(UTC)
    rows: list[Row] = []
    planned = servers(args.bundle.resolve(), large.resolve() if large else None, work / "bentoml-home")
    postgres = None
    for kind in filter(None, args.journal.split(",")):
        settings = {}
        if kind == "sqlite":
            settings["journal"] = f"sqlite:///{work / 'journal.db'}"
        elif kind in ("postgresql", "postgresql-spool"):
            from benchmarks.harness.postgres import new_database, start_postgres

            postgres = postgres or start_postgres()
            settings["journal"] = new_database(postgres, kind.replace("-", "_"))  # each row starts empty
            if kind == "postgresql-spool":
                settings["journal_spool"] = str(work / "spool")
        else:
            sys.exit(f"error: --journal {kind!r}: give sqlite, postgresql or postgresql-spool (comma-separated)")
        journaled = _embed(args.bundle.resolve(), f"embed (defaults, journal {kind})", **settings)
        journaled.env["BENTOML_HOME"] = str(work / "bentoml-home")
        planned.append(journaled)
    for server in planned:
        if server.bundle:
            server.env["TSIMCNE_PROVIDER"] = args.provider
        if args.only and args.only not in server.name:
            continue
        rows += measure(server, bodies, args.seconds, args.warm_up, work)
    if postgres is not None:
        postgres.stop()
    payload = {
        "connections": 16,
        "seconds_per_row": args.seconds,
        "provider": args.provider,
        "rows": [asdict(row) for row in rows],
    }
    if args.soak:
        payload["soak"] = soak(args.bundle.resolve(), bodies["multipart-1"], args.soak, work, args.provider)
    default = (
        RESULTS / f"serve-hot-path-{started:%Y-%m-%d}.json"
        if args.record
        else WORK / f"hot_path-{started:%Y%m%dT%H%M}.json"
    )
    out = record(payload, args.out or default, started=started, packages=PACKAGES, load_generator=wrk_version())
    report = json.loads(out.read_text())
    print(table(report["rows"]))
    print(f"written to {out}" + ("; python -m benchmarks.tables puts its table into the README" if args.record else ""))


if __name__ == "__main__":
    main()
