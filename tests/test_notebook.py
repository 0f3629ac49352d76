"""docs/example.ipynb, the Python API's example, runs from top to bottom on the toy data it draws."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return str(output.get("data", {}).get("text/plain", ""))


def test_example_notebook_runs_and_reports_an_accuracy():
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbclient, ipykernel)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbclient, ipykernel)")

    notebook = nbformat.read(DOCS / "example.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(DOCS)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [o for cell in code for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors
    # show_batch, top_losses and confusion_matrix return figures that the notebook displays
    figures = [cell for cell in code if any("image/png" in o.get("data", {}) for o in cell.outputs)]
    assert len(figures) == 3, [cell.source for cell in code]
    last = "".join(_text(o) for o in code[-1].outputs)
    found = re.search(r"accuracy of predict\(\) on the (\d+) test images: ([01]\.\d{3})", last)
    assert found, last
    assert int(found.group(1)) > 0 and 0.0 <= float(found.group(2)) <= 1.0
