import json
import os

import pandas as pd
import pytest

from lib import report, runner


def test_tables_are_written_as_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"defense": ["none", "ours"], "robust_acc": [10.0, None]})
    csv, md = report.save_table(df, "t1", tmp_path, caption="Table 1")
    assert pd.read_csv(csv).shape == (2, 2)
    text = md.read_text()
    assert text.startswith("**Table 1**") and "| none" in text and "–" in text


def test_best_marks_are_computed_from_data():
    df = pd.DataFrame({"attack": ["a", "a", "b", "b"], "acc": [1.0, 3.0, 5.0, 5.0]})
    assert report.mark_best(df, "acc", by=["attack"]).tolist() == [False, True, True, True]
    assert report.mark_best(df, "acc", higher_is_better=False).tolist() == [True, False, False, False]


def test_skips_are_recorded_and_reset(tmp_path):
    report.record_skip(tmp_path, "dataset cifar10", "not on disk")
    report.record_skip(tmp_path, "table 5", "needs ImageNet")
    assert [s["what"] for s in report.read_skips(tmp_path)] == ["dataset cifar10", "table 5"]
    report.reset_skips(tmp_path)
    assert report.read_skips(tmp_path) == []


def test_runner_rejects_unknown_profile_and_prefix(capsys):
    assert runner.main(["--profile", "huge"]) == 2
    assert "valid profiles: smoke, quick, paper" in capsys.readouterr().err
    assert runner.main(["--profile", "smoke", "--only", "77"]) == 2


def _notebook(path, source):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('profile = "quick"', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.notebook
def test_runner_reports_a_failing_notebook_and_keeps_going(tmp_path, monkeypatch):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "01_ok.ipynb", "from lib import report\nreport.record_skip(report.results_dir(profile, '01_ok'), 'part', 'why')")
    _notebook(books / "02_bad.ipynb", "raise ValueError('deliberate failure')")
    _notebook(books / "03_ok.ipynb", "import os\nfrom lib import report\nout = report.results_dir(profile, '03_ok')\n"
                                     "(out / 'tables' / 'run.txt').write_text(os.environ['ADV_RUN_ID'])")
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", books)
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("ADV_RUN_ID", raising=False)
    stale = tmp_path / "results" / "smoke" / "03_ok" / "tables" / "stale.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("a\n1\n")
    assert runner.main(["--profile", "smoke"]) == 1
    summary = (tmp_path / "results" / "smoke" / "SUMMARY.md").read_text()
    assert "| 01_ok | ok |" in summary and "| 02_bad | failed |" in summary and "| 03_ok | ok |" in summary
    assert "deliberate failure" in summary and "part: why" in summary
    manifest = json.loads((tmp_path / "results" / "smoke" / "manifest.json").read_text())
    assert manifest["profile"] == "smoke" and manifest["seed"] == 0 and manifest["packages"]["torch"]
    assert (tmp_path / "results" / "smoke" / "03_ok" / "03_ok.ipynb").is_file()
    statuses = {nb: runner.read_status(tmp_path / "results" / "smoke" / nb) for nb in ("01_ok", "02_bad", "03_ok")}
    assert {s["run_id"] for s in statuses.values()} == {manifest["run_id"]}
    assert [s["status"] for s in statuses.values()] == ["ok", "failed", "ok"]
    assert "deliberate failure" in statuses["02_bad"]["error"]
    out = tmp_path / "results" / "smoke" / "03_ok"
    assert (out / "tables" / "run.txt").read_text() == manifest["run_id"]     # the kernel saw the run id
    assert not stale.exists() and (out / "previous" / "tables" / "stale.csv").is_file()
    assert "ADV_RUN_ID" not in os.environ


def test_outputs_of_the_previous_run_are_set_aside(tmp_path):
    out = tmp_path / "nb"
    runner.set_aside_previous(out)                                  # nothing there yet: nothing to do
    assert not (out / "previous").exists()
    for run in ("first", "second"):
        (out / "tables").mkdir(parents=True)
        (out / "tables" / f"{run}.csv").write_text("a\n1\n")
        runner.write_status(out, run, {"status": "ok", "seconds": 1.0, "error": ""})
        assert runner.read_status(out)["run_id"] == run
        runner.set_aside_previous(out)
        assert runner.read_status(out) is None and not (out / "tables").exists()
    assert [p.name for p in (out / "previous" / "tables").iterdir()] == ["second.csv"]   # the older one replaced
    assert runner.read_status(out / "previous")["run_id"] == "second"
