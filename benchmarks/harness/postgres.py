"""A throwaway PostgreSQL server for the journal's tests and benchmarks: Debian's `postgresql` (scripts/test
installs it as root), a cluster in a temporary folder, trust authentication on loopback only, stopped (and
the folder removed) at the end. As root the server runs as the `postgres` user, which PostgreSQL insists on.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.servers import free_port


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's programs (initdb, pg_ctl), or None when it is not installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(installed[-1]).parent if installed else None


@dataclass
class Postgres:
    url: str
    folder: Path
    bin: Path
    as_user: list[str]

    def stop(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(settings: dict[str, str] | None = None) -> Postgres:
    """A new cluster on a free loopback port, with server `settings` (e.g. shared_buffers) beside the defaults;
    RuntimeError saying how to install PostgreSQL when it is missing."""
    programs = postgres_bin()
    if programs is None:
        raise RuntimeError("PostgreSQL not found: apt-get install postgresql (scripts/test does it as root)")
    folder = Path(tempfile.mkdtemp(prefix="tsimcne-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    run(str(programs / "initdb"), "-D", str(folder / "data"), "--auth=trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    options += "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
    run(
        str(programs / "pg_ctl"),
        "-D",
        str(folder / "data"),
        "-l",
        str(folder / "server.log"),
        "-o",
        options,
        "-w",
        "start",
    )
    return Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", folder, programs, as_user)


def new_database(server: Postgres, prefix: str = "journal") -> str:
    """A new, empty database on `server` (a random name after `prefix`); its URL."""
    import uuid

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"
