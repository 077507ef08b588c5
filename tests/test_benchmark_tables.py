"""benchmarks/README.md's generated tables are what their result files give (python -m benchmarks.tables)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

RESULT = "serve-hot-path-2026-12-03.json"


def _tables(*options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "benchmarks.tables", *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_readme_tables_are_up_to_date() -> None:
    result = _tables("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generated table(s) up to date" in result.stdout and not result.stdout.startswith("0 ")


def test_a_changed_result_file_makes_the_table_stale_until_it_is_drawn_again(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)  # every file the README cites
    report = json.loads((ROOT / "benchmarks" / "results" / RESULT).read_text())
    report["rows"][0]["requests_per_s"] = 123456.0
    (results / RESULT).write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "benchmarks" / "README.md").read_text())
    paths = ("--readme", str(readme), "--results", str(results))
    stale = _tables("--check", *paths)
    assert stale.returncode == 1 and "not what its file gives" in stale.stdout
    assert _tables(*paths).returncode == 0
    assert "| 123,456 |" in readme.read_text() and _tables("--check", *paths).returncode == 0


def test_an_empty_block_is_filled_and_the_text_after_it_is_kept(tmp_path: Path) -> None:
    """A new block, its two markers on adjacent lines, gets its table; the prose and blocks after it stay."""
    readme = tmp_path / "README.md"
    empty, filled = (
        f"<!-- results: {RESULT} -->\n<!-- /results -->",
        f"<!-- results: {RESULT} -->\nold\n<!-- /results -->",
    )
    readme.write_text(f"{empty}\n\nProse kept.\n\n{filled}\n")
    assert _tables("--readme", str(readme)).returncode == 0
    drawn = readme.read_text()
    assert drawn.count("| server | bundle |") == 2 and "Prose kept." in drawn and "old" not in drawn
    assert drawn.count("<!-- /results -->") == 2 and _tables("--check", "--readme", str(readme)).returncode == 0


def test_a_table_citing_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: serve-hot-path-1999-01-01.json -->\nold\n<!-- /results -->\n")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "results")
    result = _tables("--readme", str(readme), "--results", str(tmp_path / "results"))
    assert result.returncode == 1 and "serve-hot-path-1999-01-01.json" in result.stderr


def test_a_recorded_result_says_where_when_and_how_it_was_measured(tmp_path: Path) -> None:
    from benchmarks.results import record

    out = record({"rows": [1, 2], "machine": "a string of the old kind"}, tmp_path / "deep" / "result.json")
    report = json.loads(out.read_text())
    assert report["rows"] == [1, 2] and report["command"].startswith("python")
    assert report["started"] <= report["finished"] and report["machine"]["usable_cores"] >= 1
    assert "numpy" in report["machine"]["versions"] and not list(tmp_path.rglob("*.tmp"))
