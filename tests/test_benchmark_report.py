"""Cross-defense benchmark: evaluation of built defenses, costs, leaderboard and figures; L2 budgets; adversarial training
(the reproduction report is tested in tests/test_reproduction.py)."""
import pandas as pd
import pytest
import torch

from lib.attacks import fgsm, pgd
from lib.benchmark import (accuracy_curves, clean_vs_robust, defense_costs, defense_styles, evaluate_defenses,
                           leaderboard, leaderboard_notes, worst_case)
from lib.data import ImageData, dataset_info
from lib.defenses.base import Built, NoDefense
from lib.defenses.registry import build, defense_names
from lib.evaluate import AttackSpec, accuracy, attack_specs, within_l2_budget
from lib.profiles import load_profile
from lib.adversarial_training import pgd_training_loss
from lib.train import TrainConfig, fit_classifier
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


def test_defense_costs_count_parameters_and_time(digits_batch, digits_model):
    x = digits_batch[0][:16]
    profile = load_profile("smoke")
    defenses = {n: build(n, profile, "digits", digits_model) for n in ("none", "median")}
    costs = defense_costs(defenses, digits_model, x).set_index("defense")
    assert (costs.purify_ms_per_image >= 0).all() and (costs.parameters == 0).all()
    assert (costs.train_seconds == 0).all()
    with pytest.raises(ValueError, match="unknown defense"):
        build("magic", profile, "digits", digits_model)
    assert defense_names()[0] == "none"


def test_defense_costs_count_only_parameters_beyond_the_target(digits_model, digits_batch):
    """One cost rule for every Built: the defense's parameters, plus what its classifier adds to the target's when it
    wraps the target (IDFR's restorer); a classifier that replaces the target (fine-tuned, retrained) adds none."""
    from torch import nn

    class Denoiser(NoDefense):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

    x = digits_batch[0][:16]
    wrapped = nn.Sequential(nn.Conv2d(1, 1, 1), digits_model)        # keeps the target inside
    defenses = {"wrapping": Built(Denoiser(), wrapped, {"train_seconds": 2.0}),
                "retrained": Built(NoDefense(), make_digits_cnn(), {"train_seconds": 1.0}),
                "front": Built(Denoiser(), digits_model)}
    costs = defense_costs(defenses, digits_model, x).set_index("defense")
    assert costs.parameters.to_dict() == {"wrapping": 4, "retrained": 0, "front": 2}
    assert costs.train_seconds.to_dict() == {"wrapping": 2.0, "retrained": 1.0, "front": 0.0}
    assert (costs.purify_ms_per_image >= 0).all()


def test_evaluate_defenses_attacks_own_classifiers_through_the_target_in_the_gray_box(digits_model, digits_surrogate,
                                                                                      digits_batch):
    x, y = digits_batch[0][:24], digits_batch[1][:24]
    defenses = {"none": Built(NoDefense(), digits_model), "own": Built(NoDefense(), digits_surrogate)}
    spec = AttackSpec("fgsm", {"eps": 0.2}, "FGSM")
    rows = evaluate_defenses(defenses, digits_model, x, y, [spec], threats=("gray", "white"),
                             device=torch.device("cpu")).set_index(["threat", "defense"])
    x_adv = fgsm(digits_model, x, y, eps=0.2)                                      # crafted on the target
    assert rows.loc[("gray", "own"), "robust_acc"] == pytest.approx(accuracy(digits_surrogate, x_adv, y))
    assert rows.loc[("gray", "none"), "robust_acc"] == pytest.approx(accuracy(digits_model, x_adv, y))
    assert rows.loc[("gray", "own"), "gradient"] == "custom" and rows.loc[("gray", "none"), "gradient"] == "classifier"
    assert rows.loc[("white", "own"), "clean_acc"] == pytest.approx(accuracy(digits_surrogate, x, y))
    own_white = fgsm(digits_surrogate, x, y, eps=0.2)
    assert rows.loc[("white", "own"), "robust_acc"] == pytest.approx(accuracy(digits_surrogate, own_white, y))


def test_leaderboard_notes_explain_routes_and_flag_obfuscated_gradients():
    board = pd.DataFrame({"defense": ["a", "b"], "name": ["A", "B"], "worst_gray": [10.0, 20.0],
                          "worst_white": [30.0, 5.0], "white_box_gradient": ["BPDA", "full+EOT-2"]})
    notes = leaderboard_notes(board)
    assert "* `BPDA`:" in notes and "* `full+EOT-2`: exact gradients" in notes
    assert "obfuscated gradients" in notes and "against A:" in notes


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
