"""The reproduction report: agreement over like-for-like cells only, stand-ins apart, only tables of this run."""
import pandas as pd
import pytest

from lib import report, reproduction, runner
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

    _write_table(results, "01_sfm_defense", f"t_vs_paper{report.OTHER_READING}", table)   # shown, never counted
    assert set(reproduction.comparison_tables("smoke")) == {("01_sfm_defense", "t_vs_paper")}

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


def _claim(paper, claim, table, better, worse):
    return {"paper": paper, "claim": claim, "table": table, "key": "defense", "better": better, "worse": worse,
            "higher_is_better": "true", "filter": "", "match_on": "attack"}


def test_a_verdict_per_paper_from_its_claims_on_our_numbers(results):
    like = pd.DataFrame({"defense": ["Ours", "FS", "Ours", "FS"], "attack": ["PGD", "PGD", "CW", "CW"],
                         "ours": [60.0, 40.0, 55.0, 20.0], "paper": [70.0, 50.0, 65.0, 45.0]})
    _write_table(results, "01_sfm_defense", "gray_box_mnist_vs_paper", like.assign(diff=like.ours - like.paper))
    stand_in = pd.DataFrame({"defense": ["Our Method", "Feature Squeezing", "Adversarial FGSM"] * 2,
                             "attack": ["PGD"] * 3 + ["CW"] * 3, "ours": [50.0, 40.0, 30.0, 20.0, 35.0, 10.0],
                             "paper (CIFAR10; ours digits)": [80.0, 60.0, 50.0, 70.0, 50.0, 40.0]})
    _write_table(results, "04_image_reconstruction", "table4_comparison_a", stand_in)       # loses to FS under CW
    holds = stand_in.assign(ours=[50.0, 40.0, 30.0] * 2)
    _write_table(results, "04_image_reconstruction", "table4_comparison_b", holds)
    for notebook in ("01_sfm_defense", "04_image_reconstruction"):
        _finish(results, notebook)
    claims = pd.DataFrame([_claim("sfm", "Ours beats FS", "gray_box_*_vs_paper", "Ours", "FS"),
                           _claim("sfm", "Ours beats Vanilla", "gray_box_*_vs_paper", "Ours", "Vanilla"),  # no rows
                           _claim("reconstruction", "Ours beats FS", "table4_comparison_*", "Our Method",
                                  "Feature Squeezing"),
                           _claim("reconstruction", "Ours beats FGSM AT", "table4_comparison_*", "Our Method",
                                  "Adversarial FGSM"),
                           _claim("arn", "ARN beats HGD", "table1_*", "ARN_PP", "HGD_PP")])       # 05 not run

    rep = reproduction.write_report("smoke", results / "smoke" / "10_reproduction_report", run_id=RUN, claims=claims)

    verdicts = rep.verdicts.set_index("paper")
    assert list(verdicts.index) == ["sfm", "idfr", "regionsparse", "reconstruction", "arn"]
    assert dict(verdicts["verdict"]) == {"sfm": "holds", "idfr": "cannot be tested here",
                                         "regionsparse": "cannot be tested here", "reconstruction": "does not hold",
                                         "arn": "cannot be tested here"}
    counts = ["claims_measured", "claims_holding", "claims_failing"]
    assert verdicts.loc["sfm", counts].tolist() == [1, 1, 0] and verdicts.loc["sfm", "basis"] == "like for like"
    assert verdicts.loc["reconstruction", counts].tolist() == [2, 1, 1]
    assert verdicts.loc["reconstruction", "basis"] == "stand-in (another dataset/model)"
    assert verdicts.loc["reconstruction", "detail"] == "Ours beats FS (table4_comparison_a)"
    assert verdicts.loc["arn", counts].tolist() == [0, 0, 0] and verdicts.loc["arn", "basis"] == ""
    assert verdicts.loc["sfm", "cells_compared"] == 4 and verdicts.loc["sfm", "share_within_5"] == 0.0
    assert verdicts.loc["reconstruction", "cells_compared"] == 0                  # stand-ins are no agreement
    saved = pd.read_csv(results / "smoke" / "10_reproduction_report" / "tables" / "paper_verdicts.csv")
    assert saved["verdict"].tolist() == rep.verdicts["verdict"].tolist()

    text = rep.markdown
    assert text.index("## Paper notebooks not read") < text.index("## Verdict per paper") < text.index("## Agreement")
    section = text.split("## Verdict per paper")[1].split("\n## ")[0]
    assert "headline_claims.csv" in section and "cannot be tested here" in section and "never agreement" in section
    assert report.to_markdown(rep.verdicts) in section

    mixed = rep.claims.assign(ours="holds", comparison=[reproduction.LIKE_FOR_LIKE] + [reproduction.STAND_IN] * 6)
    assert reproduction.paper_verdicts(mixed, rep.overall).set_index("paper").loc["sfm", "basis"] == "mixed"


def test_share_in_interval_counts_compared_cells_of_tables_with_the_column(results):
    interval = pd.DataFrame({"attack": ["PGD", "CW", "FGSM", "DeepFool"], "ours": [50.0, 60.0, 70.0, None],
                             "paper": [52.0, 61.0, 90.0, 40.0], "ours 95% low": [45.0, 55.0, 65.0, None],
                             "ours 95% high": [55.0, 65.0, 75.0, None],
                             "paper in interval": [True, True, False, None]})           # empty: no number of ours
    interval["diff"] = interval.ours - interval.paper
    _write_table(results, "04_image_reconstruction", "table1_mnist", interval)
    plain = pd.DataFrame({"attack": ["PGD"], "ours": [50.0], "paper": [51.0], "diff": [-1.0]})
    _write_table(results, "01_sfm_defense", "t_vs_paper", plain)
    for notebook in ("01_sfm_defense", "04_image_reconstruction"):
        _finish(results, notebook)

    tables = reproduction.comparison_tables("smoke", run_id=RUN)
    assert tables[("04_image_reconstruction", "table1_mnist")]["paper in interval"].dtype == object   # CSV round trip
    per_table = reproduction.agreement_summary(tables).set_index("table")
    assert per_table.loc["table1_mnist", "cells_compared"] == 3
    assert per_table.loc["table1_mnist", "share_in_interval"] == pytest.approx(2 / 3)
    assert pd.isna(per_table.loc["t_vs_paper", "share_in_interval"])
    overall = reproduction.overall_agreement(tables).set_index("paper")
    assert overall.loc["reconstruction", "share_in_interval"] == pytest.approx(2 / 3)
    assert pd.isna(overall.loc["sfm", "share_in_interval"])
    assert overall.loc["all", "share_in_interval"] == pytest.approx(2 / 3)      # over the tables with the column
    assert "share_in_interval" in reproduction.write_report("smoke", run_id=RUN).markdown.split("\n## ")[0]
