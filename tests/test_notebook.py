"""The example notebook (examples/map_of_cells.ipynb) runs from top to bottom in a Jupyter kernel of this
project's Python (nbclient): it cannot rot unnoticed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOK = ROOT / "examples" / "map_of_cells.ipynb"


def _kernel_of_this_python(folder: Path) -> str:
    """A kernelspec whose interpreter is this test's Python (the project's .venv), whatever other
    kernels the machine has installed."""
    spec = folder / "kernels" / "tsimcne-venv"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "tsimcne-map", "language": "python"}))
    return "tsimcne-venv"


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(value) for value in output.get("data", {}).values())
    return "\n".join(parts)


@pytest.mark.slow
def test_the_example_notebook_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    kernel = _kernel_of_this_python(tmp_path / "jupyter")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError naming the cell and the traceback if any cell fails
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = "\n".join(_text(cell) for cell in code)
    assert "(480, 2) float32" in outputs and "kNN accuracy" in outputs and "max |torch - onnxruntime|" in outputs
    assert "out_of_distribution" in outputs  # the broken images are flagged
    assert any("image/png" in output.get("data", {}) for cell in code for output in cell.get("outputs", []))
    assert (work / "runs" / "notebook" / "stage3.pt").is_file() and (
        work / "models" / "notebook" / "bundle.json"
    ).is_file()
