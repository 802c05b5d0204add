"""The notebooks show either committed reference run: the default study (run by nbmake on every test run) and
the paper-grid study, read here through ATTNMED_DATA."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis.study.rundata import REFERENCE_RUNS, notebook_data

ROOT = Path(__file__).resolve().parent.parent


def test_notebooks_resolve_reference_run_names_folders_and_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNMED_DATA", raising=False)
    assert notebook_data(None, ROOT) == ROOT / "figures" / "data"
    assert notebook_data("paper-grid", ROOT) == ROOT / "figures" / "paper-grid" / "data"
    assert notebook_data(tmp_path, ROOT) == tmp_path
    monkeypatch.setenv("ATTNMED_DATA", "paper-grid")
    assert notebook_data(None, ROOT) == ROOT / "figures" / "paper-grid" / "data"
    for folder in REFERENCE_RUNS.values():  # both reference runs are committed with their tables
        assert (ROOT / folder / "results.csv").exists() and (ROOT / folder / "redundancy.parquet").exists()


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_every_notebook_runs_on_the_paper_grid_reference_run(notebook, monkeypatch):
    monkeypatch.setenv("ATTNMED_DATA", "paper-grid")
    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "figures/paper-grid/data" in printed  # it read the paper-grid run, not the default one
