"""The reproduction report: agreement over like-for-like cells only, stand-ins apart, only tables of this run."""
import pandas as pd
import pytest

from lib import reproduction, runner
from lib.reference import beside_paper

RUN = "20250101T000000Z-1"


def _reference(values):
    return pd.DataFrame({"defense": ["Ours", "FS"] * (len(values) // 2),
                         "attack": [a for a in ("PGD", "CW", "FGSM") for _ in (0, 1)][:len(values)], "value": values})


def _write_table(root, notebook, name, frame):
    tables = root / "smoke" / notebook / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    frame.to_csv(tables / f"{name}.csv", index=False)


def _finish(root, notebook, run_id=RUN, status="ok", error=""):
    runner.write_status(root / "smoke" / notebook, run_id, {"status": status, "seconds": 1.0, "error": error})


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("ADV_RUN_ID", raising=False)
    return tmp_path


def test_stand_in_comparisons_are_listed_apart_and_never_agreement(results):
    ours = pd.DataFrame({"defense": ["Ours", "FS", "Ours", "FS"], "attack": ["PGD", "PGD", "CW", "CW"],
                         "acc": [60.0, 40.0, 55.0, 20.0]})
    like = beside_paper(ours, _reference([70.0, 50.0, 65.0, 45.0]), ["defense", "attack"], value_col="acc",
                        paper_setting={"dataset": "digits"}, ours_setting={"dataset": "digits"})
    stand_in = beside_paper(ours, _reference([99.0, 1.0, 98.0, 2.0]), ["defense", "attack"], value_col="acc",
                            paper_setting={"dataset": "CIFAR10"}, ours_setting={"dataset": "digits"})
    assert "diff" in like.columns and "paper (CIFAR10; ours digits)" in stand_in.columns
    _write_table(results, "01_sfm_defense", "table2_vs_paper", like)
    _write_table(results, "01_sfm_defense", "table3_vs_paper", stand_in)
    _finish(results, "01_sfm_defense")
    claims = pd.DataFrame([{"paper": "sfm", "claim": "Ours beats FS", "table": "table*_vs_paper", "key": "defense",
                            "better": "Ours", "worse": "FS", "higher_is_better": "true", "filter": "",
                            "match_on": "attack"}])

    rep = reproduction.write_report("smoke", results / "smoke" / "10_reproduction_report", run_id=RUN, claims=claims)

    assert list(rep.agreement["table"]) == ["table2_vs_paper"]            # the stand-in is not scored
    assert rep.agreement.loc[0, "mean_abs_diff"] == pytest.approx(13.75)
    overall = rep.overall.set_index("paper")
    assert overall.loc["all", "cells_compared"] == 4 and overall.loc["all", "mean_abs_diff"] == pytest.approx(13.75)
    assert list(rep.stand_ins["table"]) == ["table3_vs_paper"]
    assert rep.stand_ins.loc[0, "paper_column"] == "paper (CIFAR10; ours digits)"
    assert rep.stand_ins.loc[0, "cells_compared"] == 4 and "mean_abs_diff" not in rep.stand_ins.columns
    assert dict(zip(rep.claims["table"], rep.claims["comparison"])) == {
        "table2_vs_paper": reproduction.LIKE_FOR_LIKE, "table3_vs_paper": reproduction.STAND_IN}

    text = (results / "smoke" / "REPORT.md").read_text()
    assert text == rep.markdown
    agreement = text.split("## Agreement per table")[1].split("\n## ")[0]
    apart = text.split("## Compared on another dataset/model: not agreement")[1].split("\n## ")[0]
    assert "table2_vs_paper" in agreement and "table3_vs_paper" not in agreement
    assert "table3_vs_paper" in apart and "paper (CIFAR10; ours digits)" in apart
    saved = results / "smoke" / "10_reproduction_report" / "tables"
    assert pd.read_csv(saved / "stand_in_comparisons.csv")["table"].tolist() == ["table3_vs_paper"]


def test_tables_of_failed_or_other_runs_are_not_read(results, monkeypatch):
    table = pd.DataFrame({"defense": ["Ours"], "attack": ["PGD"], "ours": [50.0], "paper": [60.0], "diff": [-10.0]})
    for notebook in ("01_sfm_defense", "02_idfr", "03_regionsparse", "04_image_reconstruction"):
        _write_table(results, notebook, "t_vs_paper", table)
    _finish(results, "01_sfm_defense")
    _finish(results, "02_idfr", status="failed", error="ValueError: deliberate")
    _finish(results, "03_regionsparse", run_id="20240101T000000Z-9")           # an earlier run
    # 04 never finished under the runner (no status.json)

    monkeypatch.setenv("ADV_RUN_ID", RUN)
    assert set(reproduction.comparison_tables("smoke")) == {("01_sfm_defense", "t_vs_paper")}
    states = reproduction.notebook_states("smoke").set_index("notebook")
    assert states.loc["01_sfm_defense", "state"] == "read"
    assert states.loc["02_idfr", "state"] == "failed" and "deliberate" in states.loc["02_idfr", "reason"]
    assert states.loc["03_regionsparse", "state"] == "not run"
    assert "20240101T000000Z-9" in states.loc["03_regionsparse", "reason"]
    assert states.loc["04_image_reconstruction", "state"] == "not run"
    text = reproduction.write_report("smoke").markdown
    unread = text.split("## Paper notebooks not read")[1].split("\n## ")[0]
    assert all(nb in unread for nb in ("02_idfr", "03_regionsparse", "04_image_reconstruction", "05_attack"))
    assert "deliberate" in unread and "01_sfm_defense" not in unread

    monkeypatch.delenv("ADV_RUN_ID")                                           # interactive: latest finished runs
    assert set(reproduction.comparison_tables("smoke")) == {("01_sfm_defense", "t_vs_paper"),
                                                            ("03_regionsparse", "t_vs_paper")}


def test_report_follows_the_tables_of_the_run(results):
    table = pd.DataFrame({"defense": ["Ours", "FS", "Ours", "FS"], "attack": ["PGD", "PGD", "CW", "CW"],
                          "ours": [60.0, 40.0, 55.0, None], "paper": [70.0, 50.0, 65.0, 45.0]})
    table["diff"] = table.ours - table.paper
    table["best"] = [True, False, False, False]         # a column the claim does not pair on
    _write_table(results, "01_sfm_defense", "table2_compare", table)
    _finish(results, "01_sfm_defense")
    claims = pd.DataFrame([{"paper": "sfm", "claim": "Ours beats FS", "table": "table2_compare", "key": "defense",
                            "better": "Ours", "worse": "FS", "higher_is_better": "true", "filter": "",
                            "match_on": "attack"}])
    tables = reproduction.comparison_tables("smoke")
    summary = reproduction.agreement_summary(tables)
    assert summary.loc[0, "cells_compared"] == 3 and summary.loc[0, "paper_only"] == 1
    assert summary.loc[0, "mean_abs_diff"] == pytest.approx(10.0)
    checked = reproduction.check_claims(tables, claims)
    assert checked.loc[0, "ours"] == "holds" and checked.loc[0, "in_paper"] == "holds"
    only_cw = reproduction.check_claims(tables, claims.assign(filter="attack!=PGD"))
    assert only_cw.loc[0, "ours"] == "not measured" and only_cw.loc[0, "in_paper"] == "holds"   # FS has no CW of ours
    assert list(reproduction.not_reproduced(tables).cell) == ["FS / CW / False"]
    absent = reproduction.check_claims(tables, claims.assign(table="nothing_*"))
    assert absent.loc[0, "ours"] == "not measured" and "nothing_*" in absent.loc[0, "ours_detail"]

    table.loc[0, "ours"] = 30.0                        # our SFM now loses to FS under PGD
    _write_table(results, "01_sfm_defense", "table2_compare", table)
    rep = reproduction.write_report("smoke", claims=claims)
    assert rep.claims.loc[0, "ours"] == "fails"
    assert "fails" in rep.markdown and "table2_compare" in rep.markdown


def test_a_table_over_several_datasets_gives_one_comparison_per_paper_column(results):
    table = pd.DataFrame({"dataset": ["fashion_mnist", "fashion_mnist", "cifar10"], "defense": ["Ours", "FS", "Ours"],
                          "ours": [50.0, 40.0, 30.0], "paper": [55.0, 35.0, None], "diff": [-5.0, 5.0, None],
                          "paper (CIFAR10; ours cifar100)": [None, None, 70.0]})
    _write_table(results, "03_regionsparse", "table2", table)
    _finish(results, "03_regionsparse")
    found = reproduction.comparison_tables("smoke", run_id=RUN)
    like, stand_in = found[("03_regionsparse", "table2 [paper]")], found[("03_regionsparse",
                                                                         "table2 [paper (CIFAR10; ours cifar100)]")]
    assert like.attrs["kind"] == reproduction.LIKE_FOR_LIKE and list(like["ours"]) == [50.0, 40.0]
    assert stand_in.attrs["kind"] == reproduction.STAND_IN and list(stand_in["paper"]) == [70.0]
    assert "paper (CIFAR10; ours cifar100)" not in like.columns


def test_report_lists_the_benchmark_sanity_warnings_of_this_run(results):
    sanity = pd.DataFrame({"dataset": ["digits"] * 2, "defense": ["tvm", "jpeg"], "check": ["(a) unbounded"] * 2,
                           "status": ["WARN", "PASS"], "measured": ["6.2%", "0.0%"],
                           "explanation": ["randomised: EOT needed", ""]})
    _write_table(results, reproduction.BENCHMARK, "digits_sanity", sanity)
    assert reproduction.benchmark_sanity("smoke", RUN).empty          # notebook 09 did not finish in this run
    _finish(results, reproduction.BENCHMARK)
    rep = reproduction.write_report("smoke", run_id=RUN)
    assert list(rep.sanity["defense"]) == ["tvm"]
    section = rep.markdown.split("## Benchmark sanity checks that warn (notebook 09)")[1].split("\n## ")[0]
    assert "tvm" in section and "randomised: EOT needed" in section and "jpeg" not in section
