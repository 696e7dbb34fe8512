"""SFM-Defense's table producers (lib.defenses.sfm.tables) on synthetic evaluations: layouts, the paper joins
(like for like with a diff column, stand-ins labelled without one), Table 8's paper ratios and the qualitative checks."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from lib.defenses.sfm import tables
from lib.notebook import Run
from lib.profiles import load_profile, notebook_config

DEFENSES = ["Vanilla", "FS (median2)", "TVM", "JPEG", "Ours (SFM+median2)"]


@pytest.fixture()
def run(tmp_path) -> Run:
    profile = load_profile("smoke")
    return Run(profile, "01_sfm_defense", notebook_config(profile, "01_sfm_defense"), tmp_path, torch.device("cpu"))


def synthetic_tidy(run: Run, datasets=("digits",)) -> pd.DataFrame:
    """Clean accuracy 90 - 10 i and robust accuracy 50 + 10 i - j for defense i and attack j of every threat."""
    attacks = tables.Attacks.of(run.config)
    rows = []
    for ds in datasets:
        for threat, specs in (("black", attacks.black), ("gray", attacks.gray), ("white", attacks.gray)):
            for i, defense in enumerate(DEFENSES):
                for j, spec in enumerate(specs):
                    rows.append({"dataset": ds, "threat": threat, "defense": defense, "attack": spec.title,
                                 "clean_acc": 90.0 - 10 * i, "robust_acc": 50.0 + 10 * i - j})
    return pd.DataFrame(rows)


def test_paper_key_splits_the_budget_off_the_attack_label():
    assert tables.paper_key("PGD-8") == ("PGD", "8/255")
    assert tables.paper_key("CW") == ("CW", "")


def test_paper_layout_has_clean_then_the_attacks_in_profile_order(run):
    tidy = synthetic_tidy(run)
    attacks = tables.Attacks.of(run.config)
    wide = tables.paper_layout(tidy[tidy.threat == "gray"], attacks.gray)
    assert list(wide.columns) == ["defense", "Clean", *[a.title for a in attacks.gray]]
    assert list(wide.defense) == DEFENSES
    assert wide.set_index("defense").loc["TVM", "Clean"] == 70.0
    long = tables.long_form(wide, {"Ours (SFM+median2)": "Ours"})
    assert set(long.defense) == {"Vanilla", "FS (median2)", "TVM", "JPEG", "Ours"}
    assert long[(long.defense == "Ours") & (long.attack == "PGD")].eps.tolist() == ["8/255"]


def test_tables_1_to_6_label_a_stand_in_and_compare_the_papers_own_dataset(run):
    out = tables.tables_1_to_6(run, synthetic_tidy(run, ("digits", "cifar10")))
    stand_in = out["gray_box_digits_vs_paper"]
    assert "paper (CIFAR10; ours digits)" in stand_in.columns and "diff" not in stand_in.columns
    own = out["black_box_cifar10_vs_paper"]
    assert {"ours", "paper", "diff"} <= set(own.columns)
    ours_clean = own[(own.defense == "Ours") & (own.attack == "Clean")].iloc[0]
    assert ours_clean.ours == 50.0 and ours_clean["diff"] == pytest.approx(50.0 - ours_clean.paper)
    assert own[own.defense == "FS"].ours.notna().any(), "the default squeezer is the paper's FS row"
    assert (run.out / "tables" / "gray_box_digits_vs_paper.csv").is_file()


def test_table7_has_datasets_as_rows_and_one_comparison_per_dataset(run):
    out = tables.table7(run, synthetic_tidy(run, ("digits", "svhn")))
    assert list(out["table7_white_ours"].dataset) == ["digits", "svhn"]
    digits, svhn = out["table7_white_digits_vs_paper"], out["table7_white_svhn_vs_paper"]
    assert "paper (CIFAR10; ours digits)" in digits.columns and "diff" not in digits.columns
    row = svhn[(svhn.attack == "Clean")].iloc[0]
    assert row.dataset == "svhn" and row.paper == 91.3 and row.ours == 50.0   # the paper's SVHN row of Table 7


def test_paper_time_ratios_are_relative_to_the_undefended_model():
    ratios = tables.paper_time_ratios().set_index("defense")
    assert ratios.loc["None"].tolist() == [1.0, 1.0]
    assert ratios.loc["Ours", "paper defending ratio to None"] == pytest.approx(0.8 / 0.3)


def test_qualitative_checks_pass_and_warn_from_the_numbers(run):
    tidy = synthetic_tidy(run)
    sweep = pd.DataFrame({"dataset": "digits", "w1": [0.1, 0.2, 0.3], "clean": [80.0, 70.0, 60.0],
                          "gray PGD-8": [10.0, 20.0, 30.0]})
    ablation = pd.DataFrame({"dataset": "digits", "variant": ["Complete", "No_Seg", "No_Recon"],
                             "mask_mean": [0.5, 0.01, 0.02], "clean": [80.0, 10.0, 15.0]})
    checks = tables.qualitative_checks(run, tidy, sweep, ablation).set_index("check").result
    assert checks["Q1"] == "WARN"                       # Ours clean 50 < Vanilla clean 90 - 5
    assert checks["Q2"] == "PASS"                       # gray PGD-8: Ours 89 >= FS 59 + 10, FS >= Vanilla - 2
    assert checks["Q5"] == "WARN"                       # white = gray in the synthetic data
    assert (checks["Q6"], checks["Q7"], checks["Q8"]) == ("PASS", "PASS", "PASS")
    assert (run.out / "tables" / "qualitative_checks.csv").is_file()
