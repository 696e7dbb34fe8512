"""Every notebook of the series runs end to end under papermill in the smoke profile."""
import json

import pytest

from lib import runner


@pytest.mark.notebook
@pytest.mark.parametrize("book", runner.discover(), ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(book, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path))
    record = runner.run_notebook(book, "smoke")
    assert record["status"] == "ok", record["error"]
    out = tmp_path / "smoke" / book.stem
    executed = json.loads((out / book.name).read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    assert list((out / "tables").glob("*.csv")), "a notebook writes at least one table"


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    for book in runner.discover():
        nb = json.loads(book.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") for c in code), f"{book.name} is committed with outputs"
        assert any("parameters" in c["metadata"].get("tags", []) for c in code), f"{book.name} lacks a parameters cell"
