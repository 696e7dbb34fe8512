"""RegionSparse's selection of K and notebook 03's table producers (lib.defenses.regionsparse.tables)."""
import pandas as pd
import pytest

from lib.defenses.regionsparse import tables
from lib.defenses.regionsparse.selection import choose
from lib.reference import load_reference


def test_choose_takes_the_best_score_and_the_smaller_k_on_a_tie():
    table = pd.DataFrame({"K": [1, 2, 3, 4], "score": [150.0, 170.0, 170.0, 160.0]})
    assert choose(table) == 2
    assert choose(table.iloc[::-1]) == 2
    assert choose(pd.DataFrame({"K": [4, 2], "score": [1.0, 0.5]})) == 4


def _curve(defense, values):
    """Tidy accuracy rows: clean 100, then one row per (attack, strength) of `values`."""
    rows = [{"defense": defense, "attack": a, "strength": 0.0, "accuracy": 100.0} for a in tables.ATTACK_ORDER]
    rows += [{"defense": defense, "attack": a, "strength": s, "accuracy": v} for (a, s), v in values.items()]
    return rows


def test_claims_ours_reads_the_gray_box_ranges_of_regionsparse():
    gray = pd.DataFrame(_curve("RegionSparse", {("FGSM", 2.0): 80.0, ("FGSM", 22.0): 60.0, ("BIM", 22.0): 55.0,
                                                ("CW-L2", 0.2): 70.0, ("MI-FGSM", 0.2): 75.0})
                        + _curve("No defense", {("FGSM", 22.0): 5.0, ("BIM", 22.0): 1.0, ("CW-L2", 0.2): 2.0,
                                                ("MI-FGSM", 0.2): 3.0}))
    claims = load_reference("regionsparse", "claims")
    ours = tables.claims_ours(claims, gray=gray)
    assert list(ours.columns) == ["defense", "setting", "attack", "eps", "metric", "value"] and len(ours) == len(claims)
    fig5 = ours[ours["setting"] == "gray-box (Fig. 5)"]
    values = {(r["attack"], r["metric"]): r["value"] for _, r in fig5.iterrows() if r["metric"].startswith("accuracy (")}
    linf = {v for (a, m), v in values.items() if "L∞" in a}
    assert linf <= {55.0, 80.0} and linf
    assert ours[ours["setting"].str.startswith("black-box")]["value"].isna().all()   # not given: NaN


def test_expectations_are_judged_from_the_results():
    gray = pd.DataFrame(_curve("No defense", {("FGSM", 22.0): 20.0, ("BIM", 22.0): 5.0, ("CW-L2", 0.2): 2.0,
                                              ("MI-FGSM", 0.2): 3.0})
                        + [{**r, "accuracy": (90.0 if r["strength"] == 0 else 60.0)}
                           for r in _curve("RegionSparse", {(a, s): 0.0 for a, s in [("FGSM", 22.0), ("BIM", 22.0),
                                                                                       ("CW-L2", 0.2), ("MI-FGSM", 0.2)]})])
    better = gray.assign(accuracy=gray["accuracy"] + 10)
    t2 = pd.DataFrame([{"defense": d, "attack": "FGSM", "strength": 22.0, "accuracy": v}
                       for d, v in [("RegionSparse", 60.0), ("FGSM Adversarial", 50.0),
                                    ("RegionSparse + FGSM Adversarial", 65.0)]])
    ablation = pd.DataFrame([{"defense": d, "attack": "FGSM", "strength": 22.0, "accuracy": v}
                             for d, v in [("Region", 60.0), ("noTR", 50.0), ("noIS", 55.0), ("noPN", 40.0), ("noBS", 58.0)]])
    results = {"gray": gray, "defenses": {"No defense": None, "RegionSparse": None}, "table2": t2,
               "ablation": ablation, "black": better, "transfer": better}
    held = tables.expectation_rows("digits", results)
    assert len(held) == 8 and all(r["dataset"] == "digits" for r in held)
    assert all(r["held"] for r in held)


@pytest.fixture
def smoke_study(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path))
    from lib.notebook import setup

    return tables.prepare(setup("smoke", "03_regionsparse"))


def test_sparsity_table_chooses_in_the_run_and_labels_the_paper_a_stand_in(smoke_study):
    display = tables.setup_table(smoke_study)
    assert list(display["dataset"]) == ["digits"]
    selection, vs_paper = tables.sparsity_table(smoke_study)
    case = smoke_study.cases["digits"]
    assert case.rs.cfg.sparsity == case.selection.chosen == int(selection.loc[selection["chosen"], "K"].item())
    assert selection.loc[selection["chosen"], "score"].item() == selection["score"].max()
    paper_columns = [c for c in vs_paper.columns if c.startswith("paper")]
    assert paper_columns == ["paper (ImageNet, Inception-v3; ours digits, smallcnn)"] and "diff" not in vs_paper
    assert vs_paper[paper_columns[0]].item() == 84.0
    assert (smoke_study.run.out / "tables" / "k_selection.csv").is_file()
    omp = tables.omp_speed_table(smoke_study)
    assert omp["max |code difference|"].item() < 1e-8
