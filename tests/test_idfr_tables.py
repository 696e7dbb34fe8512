"""IDFR's tables and figures (lib.defenses.idfr.tables) on made-up evaluation rows: layout, the eps mapping, the
stand-in label when our dataset or model is not the paper's, the ablation, the aggregates and the closing note."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lib.defenses import idfr  # noqa: E402
from lib.defenses.idfr import tables  # noqa: E402
from lib.notebook import Run  # noqa: E402
from lib.profiles import load_profile, notebook_config  # noqa: E402
from lib.reference import load_reference  # noqa: E402

STAND_IN = "paper (CIFAR-10, VGG16; ours digits, smallcnn)"


def _rows(defenses=("No Defense", "ID", "FR", "Feature Squeezing", "ID+FR")) -> pd.DataFrame:
    """evaluate_models-shaped rows: both protocols, FGSM and BIM at smoke's three budgets; ID+FR the best."""
    rows = []
    for threat in ("black-box", "white-box (oblivious)"):
        for k, defense in enumerate(defenses):
            for attack in ("FGSM", "BIM"):
                for j, eps in enumerate((0.1, 0.2, 0.3)):
                    rows.append({"threat": threat, "defense": defense, "attack": attack, "eps": eps,
                                 "clean_acc": 90.0 + k, "robust_acc": 10.0 * k + j + (5 if attack == "BIM" else 0)})
    return pd.DataFrame(rows)


@pytest.fixture()
def run(tmp_path) -> Run:
    profile = load_profile("smoke")
    return Run(profile, "02_idfr", notebook_config(profile, "02_idfr"), tmp_path, torch.device("cpu"))


@pytest.fixture()
def results() -> dict[str, tables.DatasetRun]:
    summary = [{"dataset": "digits", "role": "target", "seconds": 3.0}]
    return {"digits": tables.DatasetRun("digits", {}, {}, {"target": _rows()}, summary)}


def test_paper_long_maps_eps_by_position_and_adds_clean_rows():
    rows = _rows(("No Defense",)).query("threat == 'black-box'")
    with pytest.raises(ValueError, match="cannot map"):
        tables.paper_long(rows, "VGG16", ["4", "8"])
    long = tables.paper_long(rows, "VGG16", ["4", "8", "16"])
    assert set(long.columns) == {"defense", "attack", "eps", "our_eps", "value", "model"} and len(long) == 7
    clean = long.iloc[0]
    assert (clean["attack"], clean["eps"], clean["value"], clean["model"]) == ("Clean", "", 90.0, "VGG16")
    assert long.set_index(["attack", "eps"]).loc[("BIM", "16"), "our_eps"] == 0.3


def test_beside_reference_like_for_like_has_a_difference():
    rows = _rows(("No Defense", "ID+FR")).query("threat == 'black-box'").replace({"ID+FR": "IDFR(Ours)"})
    long = tables.paper_long(rows, "VGG16", ["4", "8", "16"])
    setting = {"dataset": "CIFAR-10", "model": "VGG16"}
    side = tables.beside_reference(long, "table1", paper_setting=setting, ours_setting=setting)
    hit = side[(side["defense"] == "No Defense") & (side["attack"] == "FGSM") & (side["eps"] == "8")].iloc[0]
    assert hit["ours"] == 1.0 and hit["paper"] == 64.6 and hit["diff"] == pytest.approx(1.0 - 64.6)
    assert hit["our_eps"] == 0.2
    clean = side[(side["defense"] == "IDFR(Ours)") & (side["attack"] == "Clean")].iloc[0]
    assert clean["ours"] == 91.0 and clean["paper"] == 91.2
    nrp = side[side["defense"] == "NRP"]
    assert len(nrp) and not nrp["ran_here"].any() and nrp["paper"].notna().all()
    assert set(side["model"]) == {"VGG16"}   # only the reference rows of our models


def test_blackbox_table_on_a_stand_in_labels_the_paper_column_and_drops_the_difference(run, results):
    long = tables.blackbox_long(run, results)["digits"]
    assert {"ID", "FR"}.isdisjoint(long["defense"]) and "IDFR(Ours)" in set(long["defense"])
    side = tables.blackbox_table(run, "digits", long)
    assert STAND_IN in side.columns and "diff" not in side.columns and "paper" not in side.columns
    assert list(side.columns) == ["model", "defense", "attack", "eps", "ours", STAND_IN, "our_eps", "ran_here",
                                  "our_dataset", "paper_dataset"]
    assert set(side["paper_dataset"]) == {"CIFAR-10"} and set(side["model"]) == {"VGG16"}
    idfr_bim = side[(side["defense"] == "IDFR(Ours)") & (side["attack"] == "BIM") & (side["eps"] == "16")].iloc[0]
    assert idfr_bim["ours"] == 47.0 and idfr_bim["our_eps"] == 0.3 and idfr_bim[STAND_IN] == 88.6
    wide = tables.wide(side, "defense", ["attack", "eps", "model"])
    assert set(wide.columns.get_level_values(0)) == {"ours", STAND_IN}


def test_whitebox_and_ablation_tables(run, results):
    white = tables.whitebox_tables(run, results)["digits"]
    assert STAND_IN in white.columns and set(white["model"]) == {""}
    assert white.loc[(white["defense"] == "No Defense") & (white["attack"] == "Clean"), STAND_IN].item() == 92.6
    ablation = tables.ablation_tables(run, results)["digits"]
    label = "paper (CIFAR10, ResNet50; ours digits, smallcnn)"
    assert label in ablation.columns and "diff" not in ablation.columns
    assert list(ablation["threat"].unique()) == ["black-box", "white-box (oblivious)"]
    assert set(ablation.loc[ablation["ours"].notna(), "defense"]) == set(tables.ABLATION)
    fgsm4 = ablation[(ablation["threat"] == "black-box") & (ablation["defense"] == "No Defense")
                     & (ablation["attack"] == "FGSM") & (ablation["eps"] == "4")].iloc[0]
    assert fgsm4[label] == 52.7 and fgsm4["ours"] == 0.0
    assert ablation[ablation["defense"] == "FR"][label].isna().all()   # ours only: the paper has no FR row
    note = tables.closing_note(results, {"digits": ablation}, None, run.config, 12.0)
    assert "ID+FR beats each part alone: **yes**" in note and "digits/target 3 s" in note


def test_our_model_names_the_paper_model_only_for_the_same_architecture_at_full_width():
    profile = {"datasets": {"cifar10": {"classifier": {"arch": "resnet18", "width": 1.0},
                                        "surrogate": {"arch": "vgg11", "width": 0.25}}}}
    assert tables.our_model(profile, "cifar10", "target", "ResNet18") == "ResNet18"
    assert tables.our_model(profile, "cifar10", "surrogate", "VGG16") == "vgg11 x0.25"
    assert tables.our_model(load_profile("quick"), "cifar10", "target", "ResNet18") == "resnet18 x0.25"


def test_aggregates_reproduce_the_text_from_tables_1_and_2():
    t1 = tables.aggregate_claims(load_reference("idfr", "table1"))
    t2 = tables.aggregate_claims(load_reference("idfr", "table2"))
    assert [round(t1[k], 2) for k in ("idfr_clean_gap", "baseline_clean_gap", "idfr_margin")] == [4.22, 17.74, 13.52]
    assert [round(t2[k], 2) for k in ("idfr_clean_gap", "baseline_clean_gap", "idfr_margin")] == [2.42, 11.80, 9.39]


def test_average_accuracy_figure_has_a_panel_per_paper_table_and_per_dataset(run, results):
    fig, aggregates = tables.average_accuracy_figure(tables.blackbox_long(run, results))
    assert list(aggregates["source"]) == ["paper table1 (CIFAR-10)", "paper table2 (CIFAR-100)",
                                          "paper table3 (ImageNet)", "ours, black-box (digits)"]
    assert len(fig.axes) == 4
    ours = aggregates.iloc[3]
    assert ours["idfr_margin"] > 0   # made-up rows: ID+FR is the best defense


def test_hull_figure_defaults_to_the_class_with_most_misclassified_embeddings():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(20)
    h = torch.randn(60, 5, generator=g) + 4 * y[:, None].float()
    correct = torch.ones(60, dtype=torch.bool)
    correct[[45, 47, 50, 2]] = False   # class 2 has the most p2
    fig = tables.hull_figure(idfr.FeaturePool(h, y, correct), "paper", n_mix=50)
    assert fig.axes[0].get_title().startswith("class 2:")
    with pytest.raises(ValueError, match="no embedding"):
        tables.hull_figure(idfr.FeaturePool(h, y, correct), "paper", klass=7)
    correct[y == 2] = False   # class 2 now has only misclassified embeddings: 'paper' pairing never draws it
    fig = tables.hull_figure(idfr.FeaturePool(h, y, correct), "paper", n_mix=50)   # (it looped forever before)
    assert fig.axes[0].get_title().startswith("class 0:")
    with pytest.raises(ValueError, match="draws only classes"):
        tables.hull_figure(idfr.FeaturePool(h, y, correct), "paper", klass=2)
