"""Writing result tables (CSV, or Parquet when pyarrow is installed), atomically."""

from __future__ import annotations

import csv
from pathlib import Path

from tsimcne_core.errors import UserError
from tsimcne_core.files import atomic_write


def _flat(value: object) -> object:
    """Lists become ';'-joined text so a CSV cell holds them."""
    if isinstance(value, list):
        return ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else value


def write_table(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    """Columns in the given order, then any others in order of appearance."""
    columns = list(columns or [])
    for row in rows:
        columns += [key for key in row if key not in columns]
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise UserError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or use .csv") from exc
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({c: _flat(row.get(c)) for c in columns})

    atomic_write(path, write)
