"""Paper 003's table producers (lib.defenses.reconstruction.tables): layouts, paper joins, stand-in labels."""
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from torch import nn

from lib.data import load_dataset
from lib.defenses.base import Built
from lib.defenses.reconstruction import EDSRRestorer, ReconstructionDefense, RestorerConfig, edsr_parameter_count
from lib.defenses.reconstruction import tables
from lib.profiles import load_profile, notebook_config
from lib.reference import load_reference

SMOKE = notebook_config(load_profile("smoke"), "04_image_reconstruction")


def _ours_from(reference: pd.DataFrame, keys: list[str], shift: float) -> pd.DataFrame:
    """Our rows for every key of a published table, each `shift` points above the paper."""
    return reference[keys].assign(accuracy=reference["value"] + shift)


def test_tables_1_3_on_a_paper_dataset_are_like_for_like_with_diff():
    ref = load_reference("reconstruction", "table2")
    table_id, table = tables.paper_table(_ours_from(ref, tables.TABLE_KEYS, 1.5), "fashion_mnist", 0.05)
    assert table_id == "table2"
    assert list(table.columns) == ["dataset", "model", "defense", "attack", "eps", "ours", "paper", "diff"]
    assert (table["dataset"] == "fashion_mnist").all() and len(table) == len(ref)
    assert np.allclose(table["diff"], 1.5)
    assert table.loc[table["attack"] == "Clean", "eps"].isna().all()
    assert (table.loc[table["attack"] != "Clean", "eps"] == 0.05).all()


def test_tables_1_3_on_a_dataset_without_a_paper_table_keep_an_empty_paper_column():
    ours = pd.DataFrame({"model": ["ResNet50"] * 2, "defense": ["no defense", "defense"], "attack": ["FGSM"] * 2,
                         "accuracy": [20.0, 60.0]})
    table_id, table = tables.paper_table(ours, "digits", 0.15)
    assert table_id == "table_digits"
    assert list(table.columns) == ["dataset", "model", "defense", "attack", "eps", "ours", "paper", "diff"]
    assert table["ours"].tolist() == [20.0, 60.0] and table["paper"].isna().all() and table["diff"].isna().all()


def test_table4_on_fashion_mnist_compares_like_for_like_and_marks_paper_only_rows():
    ref = load_reference("reconstruction", "table4")
    ours = _ours_from(ref[~ref["defense"].isin(["Pixel Defend", "ComDefend"])], tables.TABLE4_KEYS, -2.0)
    table = tables.table4_layout(ours, "fashion_mnist", [8 / 255, 25 / 255])
    assert list(table.columns) == ["defense", "setting", "eps", "attack", "ours", "paper", "diff", "note",
                                   "best (ours)"]
    assert np.allclose(table["diff"].dropna(), -2.0)
    paper_only = table["defense"].isin(["Pixel Defend", "ComDefend"])
    assert (table.loc[paper_only, "note"] == "paper only: not reproduced here").all()
    assert (table.loc[~paper_only, "note"] == "").all() and not table.loc[paper_only, "best (ours)"].any()
    assert set(table["eps"]) == {8 / 255, 25 / 255}
    # one best per (setting, attack) unless tied, and it is the largest of ours
    for _, group in table.groupby(["setting", "attack"]):
        assert group.loc[group["best (ours)"], "ours"].eq(group["ours"].max()).all()


def test_table4_on_another_dataset_is_a_labelled_stand_in_without_diff():
    ours = pd.DataFrame({"defense": ["Normal", "Our Method"], "setting": ["strength 1"] * 2, "attack": ["FGSM"] * 2,
                         "accuracy": [30.0, 80.0]})
    table = tables.table4_layout(ours, "digits", [0.03, 0.1])
    assert "diff" not in table.columns and "paper" not in table.columns
    assert "paper (F-MNIST; ours digits)" in table.columns
    mine = table.dropna(subset=["ours"])
    assert mine.set_index("defense")["ours"].to_dict() == {"Normal": 30.0, "Our Method": 80.0}
    assert mine.set_index("defense")["best (ours)"].to_dict() == {"Normal": False, "Our Method": True}


def test_agreement_summary_counts_like_for_like_cells_only():
    like = pd.DataFrame({"ours": [10.0, 20.0, np.nan], "paper": [12.0, 26.0, 5.0], "diff": [-2.0, -6.0, np.nan]})
    stand_in = pd.DataFrame({"ours": [10.0], "paper (F-MNIST; ours digits)": [50.0]})
    no_paper = pd.DataFrame({"ours": [10.0], "paper": [np.nan], "diff": [np.nan]})
    summary = tables.agreement_summary({"a": like, "b": stand_in, "c": no_paper})
    assert summary["table"].tolist() == ["a"]
    assert summary.iloc[0].tolist() == ["a", 2, 4.0, 6.0]
    assert list(tables.agreement_summary({}).columns) == ["table", "cells compared", "mean |diff| (points)",
                                                          "max |diff| (points)"]


def test_table_attacks_and_strength_grid_follow_the_profile():
    attacks = tables.table_attacks(SMOKE, 0.15)
    assert list(attacks) == ["FGSM", "BIM", "DeepFool", "CW"]
    assert attacks["BIM"].params == {"eps": 0.15, "steps": SMOKE["bim_steps"], "alpha": pytest.approx(2.5 * 0.15 / SMOKE["bim_steps"])}
    assert attacks["DeepFool"].params == {"steps": max(SMOKE["deepfool"]["steps_grid"]),
                                          "overshoot": SMOKE["deepfool"]["overshoot"]}
    assert attacks["CW"].params == {"binary_steps": 1, "c": 1.0, "lr": 0.1, "steps": max(SMOKE["cw"]["steps_grid"])}
    grid = tables.strength_grid(SMOKE, SMOKE["per_dataset"]["digits"])
    assert [s for _, s in grid["FGSM"]] == [0.1, 0.2, 0.3]          # eps 0 is the clean point, added separately
    assert [s for _, s in grid["CW"]] == SMOKE["cw"]["steps_grid"]
    assert all(spec.params["steps"] == s for spec, s in grid["DeepFool"])


def test_restorer_layer_table_counts_parameters_like_the_closed_form():
    cfg = RestorerConfig(levels=4, n_feats=8, n_blocks=2)
    defense = ReconstructionDefense(EDSRRestorer(1, 8, 2), 4)
    built = Built(defense, nn.Identity(), {"config": {"dataset": "digits", **asdict(cfg)}})
    train = load_dataset("digits", "train", n=20)
    prepared = tables.Prepared("digits", train, train, {}, {}, {}, built, pd.DataFrame())
    layers = tables.restorer_layers(prepared)
    assert len(layers) == 5 and (layers["dataset"] == "digits").all()
    counted, formula = layers["channels"].iloc[-1].split(" / ")
    assert counted == formula == f"{edsr_parameter_count(1, 8, 2):,}"
    assert layers["layer"].iloc[1].startswith("2 x ResBlock")
