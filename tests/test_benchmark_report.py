"""Cross-defense benchmark summaries, L2 budgets, adversarial training and the reproduction report."""
import pandas as pd
import pytest
import torch

from lib import reproduction
from lib.attacks import pgd
from lib.benchmark import accuracy_curves, clean_vs_robust, defense_costs, defense_styles, leaderboard, worst_case
from lib.data import ImageData, dataset_info
from lib.defenses.registry import build_defense, defense_names
from lib.evaluate import AttackSpec, accuracy, attack_specs, within_l2_budget
from lib.profiles import load_profile
from lib.train import TrainConfig, fit_classifier, pgd_training_loss
from tests.conftest import make_digits_cnn


def test_l2_budget_keeps_only_attacks_inside_it():
    x = torch.zeros(3, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0], x_adv[1, 0, 0, 0], x_adv[2] = 0.5, 1.0, 0.6   # L2 norms 0.5, 1.0, 1.2
    out = within_l2_budget(x, x_adv, 1.0)
    assert torch.equal(out[:2], x_adv[:2]) and torch.equal(out[2], x[2])
    assert within_l2_budget(x, x_adv, None) is x_adv
    spec = attack_specs([{"name": "cw_l2", "l2_budget": 1.5, "params": {"steps": 3}}])[0]
    assert spec.l2_budget == 1.5 and spec.eps == 1.5 and AttackSpec("pgd", {"eps": 0.1}).eps == 0.1


def _rows():
    return pd.DataFrame([
        {"threat": "gray", "defense": "a", "attack": "PGD", "eps": 0.1, "clean_acc": 90.0, "robust_acc": 40.0, "gradient": "classifier"},
        {"threat": "gray", "defense": "a", "attack": "FGSM", "eps": 0.1, "clean_acc": 90.0, "robust_acc": 60.0, "gradient": "classifier"},
        {"threat": "white", "defense": "a", "attack": "PGD", "eps": 0.1, "clean_acc": 90.0, "robust_acc": 10.0, "gradient": "BPDA"},
        {"threat": "gray", "defense": "b", "attack": "PGD", "eps": 0.1, "clean_acc": 80.0, "robust_acc": 30.0, "gradient": "classifier"},
        {"threat": "white", "defense": "b", "attack": "PGD", "eps": 0.1, "clean_acc": 80.0, "robust_acc": 25.0, "gradient": "full"},
    ])


def test_leaderboard_ranks_by_worst_case_over_attacks_and_threats():
    costs = pd.DataFrame([{"defense": "a", "purify_ms_per_image": 1.0, "parameters": 0, "train_seconds": 0.0},
                          {"defense": "b", "purify_ms_per_image": 2.0, "parameters": 5, "train_seconds": 3.0}])
    worst = worst_case(_rows()).set_index(["defense", "threat"])
    assert worst.loc[("a", "gray"), "worst_acc"] == 40.0 and worst.loc[("a", "gray"), "worst_attack"] == "PGD"
    board = leaderboard(_rows(), costs, {"a": "Defense A"})
    assert list(board.defense) == ["b", "a"]            # b's worst case 25 beats a's 10
    assert board.set_index("defense").loc["a", "worst_attack"] == "PGD (white)"
    assert board.set_index("defense").loc["a", "white_box_gradient"] == "BPDA"
    assert board.set_index("defense").loc["a", "name"] == "Defense A"


def test_figures_start_curves_at_clean_accuracy_and_tell_defenses_apart():
    import matplotlib.pyplot as plt

    styles = defense_styles([f"d{i}" for i in range(12)])
    assert len({(tuple(s["color"]), s["marker"]) for s in styles.values()}) == 12
    assert len({tuple(s["color"]) for s in styles.values()}) == 12
    assert defense_styles(["b", "a"]) == defense_styles(["a", "b"])     # the same look in every figure
    fig = accuracy_curves(_rows(), "PGD", "t")
    gray = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(gray["a"].get_xdata()) == [0.0, 0.1] and list(gray["a"].get_ydata()) == [90.0, 40.0]
    assert [ax.get_title() for ax in fig.axes] == ["t: PGD, gray box", "t: PGD, white box"]
    with pytest.raises(ValueError, match="no rows for attack"):
        accuracy_curves(_rows(), "CW", "t")
    costs = pd.DataFrame([{"defense": d, "purify_ms_per_image": 0.0, "parameters": 0, "train_seconds": 0.0} for d in "ab"])
    scatter = clean_vs_robust(leaderboard(_rows(), costs, {"a": "Defense A"}), "t")
    assert [t.get_text() for t in scatter.axes[0].get_legend().get_texts()] == ["b (80, 25)", "Defense A (90, 10)"]
    plt.close("all")


def test_defense_costs_count_parameters_and_time(digits_batch):
    x = digits_batch[0][:16]
    profile = load_profile("smoke")
    defenses = {n: build_defense(n, profile=profile, dataset="digits", classifier=None) for n in ("none", "median")}
    costs = defense_costs(defenses, x).set_index("defense")
    assert (costs.purify_ms_per_image >= 0).all() and (costs.parameters == 0).all()
    with pytest.raises(ValueError, match="unknown defense"):
        build_defense("magic", profile=profile, dataset="digits", classifier=None)
    assert defense_names()[0] == "none"


def test_pgd_adversarial_training_raises_robust_accuracy(digits_split, digits_model):
    info = dataset_info("digits")
    train = ImageData(digits_split["x_train"], digits_split["y_train"], info)
    torch.manual_seed(0)
    robust = make_digits_cnn()
    fit_classifier(robust, train, TrainConfig(epochs=8, batch_size=64, lr=3e-3, seed=0), device=torch.device("cpu"),
                   loss_fn=pgd_training_loss(eps=0.2, steps=3, alpha=0.08), desc="AT")
    x, y = digits_split["x_test"][:200], digits_split["y_test"][:200]
    attacked = {name: accuracy(m, pgd(m, x, y, eps=0.2, steps=10), y)
                for name, m in (("standard", digits_model), ("adversarial", robust))}
    assert attacked["adversarial"] > attacked["standard"] + 20


def _write_table(root, notebook, name, frame):
    tables = root / "smoke" / notebook / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    frame.to_csv(tables / f"{name}.csv", index=False)


def test_report_follows_the_tables_of_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path))
    table = pd.DataFrame({"defense": ["Ours", "FS", "Ours", "FS"], "attack": ["PGD", "PGD", "CW", "CW"],
                          "ours": [60.0, 40.0, 55.0, None], "paper": [70.0, 50.0, 65.0, 45.0]})
    table["diff"] = table.ours - table.paper
    table["best"] = [True, False, False, False]         # a column the claim does not pair on
    _write_table(tmp_path, "01_sfm_defense", "table2_compare", table)
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
    missing = reproduction.not_reproduced(tables)
    assert list(missing.cell) == ["FS / CW / False"]

    table.loc[0, "ours"] = 30.0                        # our SFM now loses to FS under PGD
    _write_table(tmp_path, "01_sfm_defense", "table2_compare", table)
    tables = reproduction.comparison_tables("smoke")
    assert reproduction.check_claims(tables, claims).loc[0, "ours"] == "fails"
    text = reproduction.report_markdown("smoke", reproduction.agreement_summary(tables),
                                        reproduction.check_claims(tables, claims), reproduction.not_reproduced(tables))
    assert "fails" in text and "table2_compare" in text


def test_model_costs_count_only_parameters_beyond_the_classifier(digits_model, digits_batch):
    from torch import nn

    from lib.benchmark import model_costs

    x = digits_batch[0][:16]
    wrapped = nn.Sequential(nn.Conv2d(1, 1, 1), digits_model)      # a defense that keeps the classifier inside
    retrained = make_digits_cnn()                                    # a defense that replaces the classifier
    own = model_costs("wrapped", wrapped, digits_model, x, train_seconds=2.0)
    assert own["parameters"] == 2 and own["train_seconds"] == 2.0 and own["purify_ms_per_image"] >= 0
    assert model_costs("retrained", retrained, digits_model, x, train_seconds=1.0)["parameters"] == 0
    with pytest.raises(ValueError, match="unknown defended model"):
        from lib.defenses.registry import build_defended_model
        build_defended_model("magic", profile=load_profile("smoke"), dataset="digits", classifier=digits_model)
