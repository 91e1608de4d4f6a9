"""The walk-through notebook is stored clean and runs headless from top to bottom on a tiny pair."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from forethought.analyses.plots import chromium

NOTEBOOK = Path(__file__).parents[2] / "analyses" / "compare_checkpoints.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_headless(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_PNG", "1")  # the kernel inherits it: a PNG beside each figure where Chromium is
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "application/vnd.plotly.v1+json" in output.get("data", {})]
    assert len(figures) == 3  # accuracy by layer, the heatmap, accuracy after adding a checkpoint
    if chromium():  # kept for viewers of the saved notebook without JavaScript (GitHub)
        assert all(output["data"]["image/png"] for output in figures)
    summaries = [
        output["data"]["text/html"]
        for output in outputs
        if "<b>Comparison</b>" in output.get("data", {}).get("text/html", "")
    ]
    assert len(summaries) == 2 and summaries[-1].count("<td>✓</td>") == 2 * 4  # 3 + the added checkpoint, 2 kinds
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "error: τ [5] not computed: this comparison probes τ 1, 2, 3" in printed
    assert (tmp_path / "runs" / "notebook" / "compare" / "scores").is_dir()
