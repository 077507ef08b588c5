"""The import contract (scripts/layers.py) holds on this tree, fails on a wrong import, and docs/layers.md is
what the code draws."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "layers.py"
PACKAGES = ("tsimcne_core", "training", "serving", "tsimcne_map", "tsimcne_cli")


def _layers(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *options], capture_output=True, text=True, timeout=120
    )


def test_the_tree_keeps_the_contract_and_its_picture() -> None:
    result = _layers(ROOT, "--check")
    assert result.returncode == 0, result.stderr
    assert "layers ok" in result.stdout


def _copy(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "docs").mkdir()
    return tmp_path


def test_a_wrong_import_fails_naming_the_file_line_and_layer(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    with open(root / "serving" / "uploads.py", "a") as handle:  # a lazy import upward counts too
        handle.write("\n\ndef _upward():\n    from tsimcne_map import Bundle\n\n    return Bundle\n")
    with open(root / "tsimcne_core" / "images.py", "a") as handle:
        handle.write("\nimport torch  # noqa\n")
    with open(root / "training" / "evaluate.py", "a") as handle:  # siblings: training may not import serving
        handle.write("\nfrom serving.settings import Settings  # noqa\n")
    result = _layers(root)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith("serving/uploads.py:") and "may not import tsimcne_map" in line for line in lines)
    assert any(line.startswith("tsimcne_core/images.py:") and "may not import torch" in line for line in lines)
    assert any(line.startswith("training/evaluate.py:") and "may not import serving.settings" in line for line in lines)
    assert len(lines) == 3, lines


def test_an_import_circle_fails(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    with open(root / "tsimcne_core" / "bundle_format.py", "a") as handle:  # placing imports bundle_format
        handle.write("\nfrom tsimcne_core.placing import Placer  # noqa\n")
    result = _layers(root)
    assert result.returncode == 1 and "import circle among" in result.stderr
    assert "tsimcne_core.bundle_format" in result.stderr


def test_a_stale_picture_fails(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "docs" / "layers.md").write_text((ROOT / "docs" / "layers.md").read_text())
    assert _layers(root, "--check").returncode == 0
    (root / "tsimcne_core" / "new_part.py").write_text('"""A module the picture does not show yet."""\n')
    result = _layers(root, "--check")
    assert result.returncode == 1 and "docs/layers.md is not what the code draws" in result.stderr
