"""The Parquet record of placed images: one fixed Arrow schema for every engine of `tsimcne embed`.

One process writes it as one file (`--out coords.parquet`), Ray as a folder of shards (`--out DIR`); both
read back with `pyarrow.parquet.read_table(path)` or `pandas.read_parquet(path)`. The fields are those of
POST /embed's answer (tsimcne_core/placing.py `PlacedImage`), flattened as `PlacedImage.row()` does, plus
`index` (the image's position in the input list: Ray writes shards in no fixed order, sort by it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tsimcne_core.flag import Flag

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa

# (name, arrow type name, meaning): the README's table is this list.
FIELDS: list[tuple[str, str, str]] = [
    ("index", "int64", "position in the input list (folders sorted, CSV/list order)"),
    ("id", "string", "the image's path as listed"),
    ("x", "float64", "map position"),
    ("y", "float64", "map position"),
    ("flag", "string", ", ".join(Flag)),
    ("score", "float64", "the flag's score; above 1 is flagged"),
    ("evidence_features", "float64", "network features over their calibrated threshold (null: position-only flag)"),
    ("evidence_pixels", "float64", "colour/exposure statistics over their threshold (null: position-only flag)"),
    ("evidence_position", "float64", "map position over its threshold"),
    ("duplicate_of", "string", "id of another image of the same batch that looks the same; '' when none"),
    ("majority_label", "string", "most common label among the neighbours (null: unlabelled map)"),
    ("majority_share", "float64", "share of the neighbours carrying it"),
    ("neighbour_ids", "list<string>", "nearest reference images, nearest first"),
    ("neighbour_indices", "list<int64>", "their positions in GET /map's arrays"),
    ("neighbour_labels", "list<string>", "their labels (empty: unlabelled map)"),
    ("neighbour_distances", "list<float64>", "their distances on the map"),
    ("error", "string", "why the file could not be read ('' when placed; then all but index and id are null)"),
]


def placement_schema() -> pa.Schema:
    import pyarrow as pa

    types = {
        "int64": pa.int64(),
        "string": pa.string(),
        "float64": pa.float64(),
        "list<string>": pa.list_(pa.string()),
        "list<int64>": pa.list_(pa.int64()),
        "list<float64>": pa.list_(pa.float64()),
    }
    return pa.schema([pa.field(name, types[kind]) for name, kind, _ in FIELDS])


def placement_table(rows: list[dict[str, Any]], first_index: int = 0) -> pa.Table:
    """`Placements.rows()` (in input order, the first at `first_index`) as an Arrow table of the schema."""
    import pyarrow as pa

    columns = [name for name, _, _ in FIELDS]
    records = [{name: row.get(name) for name in columns} | {"index": first_index + i} for i, row in enumerate(rows)]
    return pa.Table.from_pylist(records, schema=placement_schema())


def write_placement_file(rows: list[dict[str, Any]], path: Path) -> None:
    """One Parquet file of the schema, written atomically."""
    from tsimcne_core.errors import UserError
    from tsimcne_core.files import atomic_write

    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UserError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow), or use .csv") from exc
    table = placement_table(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
