import json
import os
import time

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
def test_runner_reports_a_failing_notebook_and_keeps_going(tmp_path, monkeypatch, capfd):
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
    assert "without encryption" not in capfd.readouterr().err    # kernels over Unix sockets: no TCP warning


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


def test_only_with_an_empty_prefix_is_refused(capsys):
    assert runner.main(["--profile", "smoke", "--only", ","]) == 2
    assert "empty notebook prefix" in capsys.readouterr().err
    assert runner.parse_only(None) is None and runner.parse_only(" 00, 03") == ["00", "03"]


@pytest.mark.parametrize("how, exc", [("Ctrl-C", KeyboardInterrupt()), ("SIGTERM", runner._Terminated("SIGTERM"))])
def test_an_interrupted_run_still_writes_its_summary(tmp_path, monkeypatch, how, exc):
    books = tmp_path / "notebooks"
    books.mkdir()
    for name in ("01_a", "02_b", "03_c"):
        (books / f"{name}.ipynb").write_text("{}")
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", books)
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path / "results"))
    stale = tmp_path / "results" / "smoke" / "SUMMARY.md"
    stale.parent.mkdir(parents=True)
    stale.write_text("| 01_a | ok |\n| 02_b | ok |\n| 03_c | ok |\n")

    def fake_run(book, profile, run_id, timeout_s):
        out = report.results_dir(profile, book.stem)
        if book.stem == "02_b":
            raise exc
        record = {"notebook": book.stem, "status": "ok", "error": "", "seconds": 0.1, "skipped": []}
        runner.write_status(out, run_id, record)
        return record

    monkeypatch.setattr(runner, "run_notebook", fake_run)
    assert runner.main(["--profile", "smoke"]) == runner.INTERRUPTED_EXIT
    summary = stale.read_text()
    assert "interrupted** during 02_b; not run: 03_c" in summary
    assert "| 01_a | ok |" in summary and "| 02_b | interrupted |" in summary and "| 03_c | not run |" in summary
    manifest = json.loads((stale.parent / "manifest.json").read_text())
    assert [r["status"] for r in manifest["notebooks"]] == ["ok", "interrupted", "not run"]
    assert runner.read_status(stale.parent / "02_b")["error"] == f"interrupted by {how}"


def test_notebook_timeout_comes_from_the_profile():
    assert runner.notebook_timeout({"name": "p", "notebook_timeout_s": 60}) == 60.0
    assert runner.notebook_timeout({"name": "p", "notebook_timeout_s": None}) is None
    for bad in (0, -5, "10", True):
        with pytest.raises(ValueError, match="notebook_timeout_s must be a number of seconds > 0"):
            runner.notebook_timeout({"name": "p", "notebook_timeout_s": bad})


@pytest.mark.notebook
def test_a_notebook_past_its_timeout_is_stopped_and_reported(tmp_path, monkeypatch):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "01_slow.ipynb", "import time\ntime.sleep(60)")
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", books)
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(runner, "notebook_timeout", lambda profile: 3.0)
    t0 = time.perf_counter()
    assert runner.main(["--profile", "smoke"]) == 1
    assert time.perf_counter() - t0 < 40
    summary = (tmp_path / "results" / "smoke" / "SUMMARY.md").read_text()
    assert "| 01_slow | timeout |" in summary and "notebook_timeout_s = 3 s" in summary
    assert runner.read_status(tmp_path / "results" / "smoke" / "01_slow")["status"] == "timeout"


def test_two_runs_sharing_a_results_folder_both_write_whole_files(tmp_path):
    """Writers of the same tables, figures and texts at the same time (as two runs sharing results/) all
    succeed; every final file is one writer's whole content and no temporary file is left behind."""
    import threading

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.cache import atomic_write_text

    tables = {w: pd.DataFrame({"writer": [w] * 200, "value": range(200)}) for w in range(4)}
    figures = {}
    for w in range(4):
        figures[w], ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, w])
    errors = []

    def write(w):
        try:
            for _ in range(25):
                report.save_table(tables[w], "shared", tmp_path, caption=f"writer {w}")
                report.save_figure(figures[w], "shared", tmp_path, dpi=20)
                atomic_write_text(f"writer {w}\n" * 1000, tmp_path / "SUMMARY.md")
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fig in figures.values():
        plt.close(fig)
    assert errors == []
    table = pd.read_csv(tmp_path / "tables" / "shared.csv")
    assert len(table) == 200 and table["writer"].nunique() == 1
    md = (tmp_path / "tables" / "shared.md").read_text().splitlines()
    assert md[0].startswith("**writer ") and len(md) == 2 + 2 + 200
    assert (tmp_path / "figures" / "shared.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = set((tmp_path / "SUMMARY.md").read_text().splitlines())
    assert len(lines) == 1 and len((tmp_path / "SUMMARY.md").read_text()) == len(f"{lines.pop()}\n") * 1000
    assert not list(tmp_path.rglob("*.tmp"))
