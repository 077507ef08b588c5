"""Which files `tsimcne embed` places: image files, folders, CSV manifests and plain file lists, brought to one
ordered list of paths. Both engines (one process, Ray) place exactly this list, so their outputs compare.

Only paths are listed here, nothing is decoded: an archive of millions of files costs a list of strings.
- a folder: its image files (IMAGE_SUFFIXES), searched recursively, sorted;
- a `.csv` with a header and a `path` column, paths relative to the CSV's folder (as `--data` reads it);
- a `.txt` or `.lst` file list: one path a line, relative to the list's folder; blank lines and `#` lines skipped;
- anything else: one image file (an unreadable one becomes an error row when it is placed, not here).
"""

from __future__ import annotations

import csv
from pathlib import Path

from tsimcne_core.errors import DataError
from tsimcne_core.images import IMAGE_SUFFIXES

LIST_SUFFIXES = {".txt", ".lst"}


def list_images(inputs: list[Path]) -> list[Path]:
    """The image files named by `inputs`, in order (each folder sorted); DataError naming an input that
    does not exist or lists nothing."""
    files: list[Path] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.suffix.lower() == ".csv":
            files += _from_csv(path)
        elif path.suffix.lower() in LIST_SUFFIXES:
            files += _from_list(path)
        else:
            files.append(path)  # an image file; a missing or broken one is reported when it is read
    return files


def _from_csv(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise DataError(f"{path}: a CSV manifest needs a header with a 'path' column")
            paths = [row["path"] for row in reader]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc.strerror or exc})") from exc
    for line, value in enumerate(paths, start=2):
        if not value:
            raise DataError(f"{path}, line {line}: the 'path' field is empty")
    if not paths:
        raise DataError(f"{path}: the CSV lists no images")
    return [path.parent / value for value in paths]


def _from_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file list ({exc.strerror or exc})") from exc
    paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise DataError(f"{path}: the file list names no images")
    return [path.parent / value for value in paths]
