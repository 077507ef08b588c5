"""benchmarks/README.md's tables made from the result files they show (benchmarks/results/).

    python -m benchmarks.tables            rewrite every generated table in benchmarks/README.md
    python -m benchmarks.tables --check    fail when one is not what its file gives (CI runs this)

A generated table sits between `<!-- results: FILE -->` and `<!-- /results -->`; FILE is a JSON of
benchmarks/results/ written by a benchmark (benchmarks/results.py `record`), and the part of its name before
the date says which benchmark's renderer draws it. Tables of runs from before the results files were kept
(most sections) stay as they were typed, with the commands that made them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.journal.scale import report_table as journal_scale_table
from benchmarks.results import RESULTS
from benchmarks.serve.hot_path import report_table
from benchmarks.serve.journal_cost import report_table as journal_cost_table

README = Path(__file__).resolve().parent / "README.md"
RENDERERS: dict[str, Callable[[dict], str]] = {
    "serve-hot-path": report_table,
    "serve-journal-cost": journal_cost_table,
    "journal-scale": journal_scale_table,
}
# A block's body never runs into another block (an empty one, its markers on adjacent lines, stays empty).
BLOCK = re.compile(
    r"(<!-- results: (?P<file>[\w.-]+) -->\n)(?P<body>(?:(?!<!-- /?results).)*?)\n?(<!-- /results -->)", re.S
)


def kind(file: str) -> str:
    """`serve-hot-path-2026-12-03.json` -> `serve-hot-path`."""
    return re.sub(r"-\d{4}-\d{2}-\d{2}.*$", "", Path(file).stem)


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every results block drawn again from its file; a block naming a missing file or an
    unknown kind is an error naming it."""

    def drawn(match: re.Match) -> str:
        name = match["file"]
        path = results / name
        if not path.is_file():
            raise SystemExit(f"error: benchmarks/README.md cites {name}, which is not in {results}")
        renderer = RENDERERS.get(kind(name))
        if renderer is None:
            raise SystemExit(f"error: no table renderer for {name} (known: {', '.join(sorted(RENDERERS))})")
        return match.group(1) + renderer(json.loads(path.read_text())) + "\n" + match.group(4)

    return BLOCK.sub(drawn, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a table is stale; write nothing")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    drawn = render(text, args.results)
    blocks = len(BLOCK.findall(text))
    if args.check:
        if drawn != text:
            print(f"{args.readme}: a results table is not what its file gives: run python -m benchmarks.tables")
            return 1
        print(f"{blocks} generated table(s) up to date")
        return 0
    if drawn != text:
        scratch = args.readme.with_name(args.readme.name + ".tmp")
        scratch.write_text(drawn)
        scratch.replace(args.readme)
    print(f"{blocks} generated table(s) written into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
