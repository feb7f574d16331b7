"""Every numbered notebook follows the conventions and runs under papermill with small parameters.

nbval (configured in pyproject.toml) executes the same notebooks a second time and compares the
outputs of the cells marked ``# NBVAL_CHECK_OUTPUT``; this file checks the papermill side.
"""
from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from ddlib.results import read_rows

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _parameters_cell(nb) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_conventions(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source, "first cell needs an Open-in-Colab badge"
    assert path.name in nb.cells[0].source, "the badge must point at this notebook"
    assert any("pip" in c.source and "import ddlib" in c.source for c in nb.cells[:3]), "a setup cell installs ddlib"
    params = _parameters_cell(nb)
    tree = ast.parse(params.source)
    names = set()
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign), f"parameters cell may only assign literals: {ast.unparse(stmt)}"
        ast.literal_eval(stmt.value)  # raises on anything but a plain literal
        names.update(t.id for t in stmt.targets)
    assert {"smoke", "seed", "data_root"} <= names
    assert "ddlib" in nb.metadata and "requires_gpu" in nb.metadata["ddlib"]


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_under_papermill(path: Path, tmp_path: Path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / path.name
    monkeypatch.setenv("DDLIB_RESULTS", str(tmp_path / "runs.jsonl"))  # the kernel inherits it
    papermill.execute_notebook(str(path), str(out), parameters={"smoke": True}, cwd=str(path.parent),
                               progress_bar=False, kernel_name="python3")
    executed = nbformat.read(out, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    assert any(c.metadata.get("tags") == ["injected-parameters"] for c in executed.cells)
    if "record_evaluation(" in path.read_text():  # its evaluations reach the runs table, marked as smoke
        rows = read_rows(tmp_path / "runs.jsonl")
        assert rows and all(r["params"]["smoke"] and r["metrics"]["accuracies"] for r in rows)
        assert rows[0]["source"] == "notebook"
