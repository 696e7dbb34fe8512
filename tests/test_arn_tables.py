"""ARN's table producers (lib/defenses/arn/tables.py): layout, the paper column of a stand-in comparison, marks
computed from data, the seed comparison and the closing note, on tiny stand-in experiments (no training)."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lib.defenses.arn import tables as T
from lib.defenses.arn.defense import Purifier
from lib.defenses.arn.networks import ConvGenerator

PROFILE = {"name": "test", "datasets": {
    "digits": {"classifier": {"arch": "smallcnn"}, "surrogate": {"arch": "smallcnn", "width": 0.5}},
    "mnist": {"classifier": {"arch": "lenet5", "width": 1.0}, "surrogate": {"arch": "smallcnn"}},
}}
STAND_IN = "paper (MNIST, lenet5; ours digits, smallcnn)"


def _run(tmp_path, **config) -> SimpleNamespace:
    cfg = {"seeds": [0], "ablations": True, "table2b": True, "arn_dp": True, "at_pgd": True, **config}
    return SimpleNamespace(profile=PROFILE, config=cfg, out=tmp_path, device=torch.device("cpu"), profile_name="test")


def _experiment(dataset: str, classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                seeds: tuple[int, ...] = (0,)) -> T.Experiment:
    torch.manual_seed(0)
    names = ["APE-G_PP", "HGD_PP", "Pixel-MSE_PP", "ARN_PP"]
    models = {(n, s): Purifier(ConvGenerator(1, (4, 8), residual=True)).eval() for n in names for s in seeds}
    adversarial = {"Clean": x, "PGD_N": (x + 0.3).clamp(0, 1), "CW_N": (1 - x), "STA_N": x.flip(-1)}
    test = SimpleNamespace(x=x, y=y, info=SimpleNamespace(num_classes=10))
    return T.Experiment(dataset, {"paper_dataset": "MNIST"}, test, test, classifier, classifier, {}, adversarial,
                        models, None, [], [], [], None, 64, seeds[0])


def test_beside_paper_rows_labels_a_stand_in_and_keeps_the_diff_like_for_like(tmp_path):
    ours = pd.DataFrame({"defense": ["None", "ARN_PP"], "attack": ["PGD_N", "PGD_N"], "error": [99.0, 12.0]})
    run = _run(tmp_path)
    stand_in = T.beside_paper_rows(run, SimpleNamespace(dataset="digits", budgets={"paper_dataset": "MNIST"}), ours,
                                   "table1")
    assert list(stand_in.columns) == ["dataset", "defense", "attack", "ours", STAND_IN, "status"]
    assert set(stand_in["dataset"]) == {"digits"}
    both = stand_in[stand_in["status"] == "both"]
    assert sorted(both["ours"]) == [12.0, 99.0]
    assert (stand_in.loc[stand_in["ours"].isna(), "status"] == "paper only (not reproduced)").all()
    assert (stand_in["status"] == "paper only (not reproduced)").sum() > 10  # JSMA, AT, DOA... rows are kept
    same = T.beside_paper_rows(run, SimpleNamespace(dataset="mnist", budgets={"paper_dataset": "MNIST"}), ours,
                               "table1")
    assert list(same.columns) == ["dataset", "defense", "attack", "ours", "paper", "diff", "status"]
    row = same[(same["defense"] == "None") & (same["attack"] == "PGD_N")].iloc[0]
    assert row["diff"] == pytest.approx(99.0 - row["paper"])
    extra = pd.DataFrame({"defense": ["Mine"], "attack": ["PGD_N"], "error": [1.0]})
    mine = T.beside_paper_rows(run, SimpleNamespace(dataset="mnist", budgets={"paper_dataset": "MNIST"}), extra,
                               "table1")
    assert mine.loc[mine["defense"] == "Mine", "status"].item() == "ours only (no paper number)"
    cross = T.beside_paper_rows(run, SimpleNamespace(dataset="mnist", budgets={"paper_dataset": "MNIST"}),
                                ours.assign(model="WRN"), "table5", on=("model", "defense", "attack"),
                                cross_model=True)
    assert "paper (CIFAR-10, resnet110, wrn-28-20, vgg19; ours mnist, lenet5, smallcnn)" in cross.columns
    assert "diff" not in cross.columns


def test_mark_lowest_and_seen_or_unseen():
    df = pd.DataFrame({"defense": ["None", "A", "B", "None", "A", "B"], "attack": ["x"] * 3 + ["y"] * 3,
                       "error": [0.0, 5.0, 5.0, 50.0, 40.0, 30.0]})
    assert T.mark_lowest(df).tolist() == [False, True, True, False, False, True]  # None excluded, ties both marked
    assert T.seen_or_unseen("ARN_PP", "PGD_T") == "seen" and T.seen_or_unseen("ARN_PP", "DDN_N") == "unseen"
    assert T.seen_or_unseen("ARN_DP", "DDN_N") == "seen" and T.seen_or_unseen("ARN_DP", "PGD_T") == "unseen"
    assert T.seen_or_unseen("None", "PGD_N") == "" and T.seen_or_unseen("ARN_PP", "Clean") == ""


def test_error_tables_layout_and_saved_files(tmp_path, digits_model, digits_batch):
    x, y = digits_batch
    e = _experiment("digits", digits_model, x[:20], y[:20])
    out = T.error_tables(_run(tmp_path), e)
    assert list(out) == ["Table1, ours, error (%)", "Table1 beside the paper", "Table2, ours, error (%)",
                         "Table2 beside the paper"]
    wide = out["Table1, ours, error (%)"]
    assert list(wide.index) == ["None", "APE-G_PP", "HGD_PP", "Pixel-MSE_PP", "ARN_PP"]   # MAIN order
    assert list(wide.columns) == ["Clean", "PGD_N", "CW_N"]                               # Table 1's order
    long = out["Table1 beside the paper"]
    assert list(long.columns) == ["dataset", "defense", "attack", "ours", STAND_IN, "status", "setting", "best"]
    assert not long.loc[long["defense"] == "None", "best"].fillna(False).any()
    for attack, group in e.errors[e.errors["defense"] != "None"].groupby("attack"):
        assert group.loc[group["best"], "error"].eq(group["error"].min()).all() and group["best"].any()
    assert e.errors.set_index(["defense", "attack"]).loc[("ARN_PP", "PGD_N"), "setting"] == "seen"
    assert set(out["Table2 beside the paper"]["attack"]) >= {"Clean", "STA_N", "STA_T"}
    assert (tmp_path / "tables" / "table1_digits.csv").is_file() and (tmp_path / "tables" / "table2_digits.md").is_file()


def test_seed_comparison_and_closing_note(tmp_path, digits_model, digits_batch):
    x, y = digits_batch
    e = _experiment("digits", digits_model, x[:20], y[:20], seeds=(0, 1))
    run = _run(tmp_path, seeds=[0, 1])
    T.error_tables(run, e)
    table = T.seed_comparison(run, e)
    assert list(table.columns) == ["dataset", "attack", "setting", "ARN mean", "ARN std", "Pixel-MSE mean",
                                   "Pixel-MSE std", "ARN - Pixel-MSE", "per-seed sign"]
    assert list(table["attack"]) == list(e.adversarial)
    assert (table["ARN - Pixel-MSE"] == table["ARN mean"] - table["Pixel-MSE mean"]).all()
    assert set(table["per-seed sign"]) <= {"ARN lower in all 2 seed(s)", "Pixel-MSE lower in all 2 seed(s)",
                                           "mixed / tied"}
    assert T._sign_of(pd.Series([-1.0, -2.0]), 2) == "ARN lower in all 2 seed(s)"
    assert T._sign_of(pd.Series([-1.0, 0.0]), 2) == "mixed / tied"
    note = T.closing_note(run, {"digits": e})
    assert note.startswith("- **digits**: with 2 seed(s)") and "of 2 unseen attacks" in note  # CW_N, STA_N
    headline = T.headline(run, e)
    assert list(headline.index) == ["None", "Pixel-MSE_PP", "ARN_PP"] and list(headline.columns) == T.HEADLINE
    assert (tmp_path / "tables" / "closing_note.csv").is_file()


def test_defenses_trained_table_notes_a_smaller_adversarial_training_budget(tmp_path):
    rows = [{"dataset": "digits", "defense": "ARN_PP", "seed": 0},
            {"dataset": "digits", "defense": "AT_PGD", "seed": None, "AT eps": 0.1, "table eps": 0.3}]
    experiments = {"digits": SimpleNamespace(train_rows=rows)}
    table, note = T.defenses_trained_table(_run(tmp_path), experiments)
    assert list(table["defense"]) == ["ARN_PP", "AT_PGD"]
    assert "trained at eps 0.1" in note and "attack at eps 0.3" in note
    rows[1]["AT eps"] = 0.3
    assert T.defenses_trained_table(_run(tmp_path), experiments)[1] == ""
