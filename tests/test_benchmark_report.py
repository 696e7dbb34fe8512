"""Cross-defense benchmark: evaluation of built defenses, costs, leaderboard and figures; L2 budgets; adversarial training
(the reproduction report is tested in tests/test_reproduction.py)."""
import pandas as pd
import pytest
import torch

from lib.attacks import fgsm, pgd
from lib.benchmark import (accuracy_curves, attack_plan, clean_vs_robust, defense_costs, defense_styles,
                           evaluate_defenses, leaderboard, leaderboard_notes, sanity_notes)
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
    base = {"eps": 0.1, "norm": "linf", "flags": ""}
    return pd.DataFrame([
        {**base, "threat": "gray", "defense": "a", "attack": "PGD", "clean_acc": 90.0, "robust_acc": 40.0, "gradient": "classifier"},
        {**base, "threat": "gray", "defense": "a", "attack": "FGSM", "clean_acc": 90.0, "robust_acc": 60.0, "gradient": "classifier"},
        {**base, "threat": "white", "defense": "a", "attack": "PGD", "clean_acc": 90.0, "robust_acc": 10.0, "gradient": "BPDA"},
        {**base, "threat": "gray", "defense": "b", "attack": "PGD", "clean_acc": 80.0, "robust_acc": 30.0, "gradient": "classifier"},
        {**base, "threat": "white", "defense": "b", "attack": "PGD", "clean_acc": 80.0, "robust_acc": 25.0, "gradient": "full",
         "flags": "it seems to be a dynamic defense!"},
        {**base, "eps": 1.0, "norm": "l2", "threat": "white", "defense": "b", "attack": "CW", "clean_acc": 80.0,
         "robust_acc": 0.0, "gradient": "full"},
    ])


def _examples(rows, n=20):
    """Per-example outcomes matching _rows' accuracies: the first robust_acc % of the images survive each attack,
    except a's gray FGSM, which fooled the images a's gray PGD left standing (so a's gray ensemble is 0%)."""
    frames = []
    for r in rows.itertuples():
        k = round(r.robust_acc * n / 100)
        correct = [i < k for i in range(n)]
        if (r.defense, r.threat, r.attack) == ("a", "gray", "FGSM"):
            correct = [i >= n - k for i in range(n)]
        frames.append(pd.DataFrame({"threat": r.threat, "defense": r.defense, "attack": r.attack, "eps": r.eps,
                                    "norm": r.norm, "example": range(n), "correct": correct}))
    return pd.concat(frames, ignore_index=True)


COSTS = pd.DataFrame([{"defense": "a", "purify_ms_per_image": 1.0, "parameters": 0, "train_seconds": 0.0},
                      {"defense": "b", "purify_ms_per_image": 2.0, "parameters": 5, "train_seconds": 3.0}])


def test_leaderboard_ranks_by_the_per_example_worst_case_of_one_threat_model():
    rows = _rows()
    board = leaderboard(rows, _examples(rows), COSTS, norm="linf", eps=0.1, labels={"a": "Defense A"})
    assert list(board.defense) == ["b", "a"]            # b's worst case 25 beats a's 0
    a = board.set_index("defense").loc["a"]
    assert a["worst_gray"] == 0.0 and a["worst_acc"] == 0.0      # two attacks fooling disjoint images: 0%, not 40%
    assert a["worst_white"] == 10.0
    assert a["gray: PGD"] == 40.0 and a["gray: FGSM"] == 60.0 and a["white: PGD"] == 10.0
    assert a["strongest_single"] == "PGD (white): 10.0" and a["white_box_gradient"] == "BPDA"
    assert a["name"] == "Defense A" and a["threat_model"] == "linf 0.1" and a["flags"] == ""
    b = board.set_index("defense").loc["b"]
    assert "white: CW" not in board.columns and b["flags"] == "it seems to be a dynamic defense!"   # L2 apart
    l2 = leaderboard(rows, _examples(rows), COSTS, norm="l2", eps=1.0)
    assert list(l2.defense) == ["b"] and l2.worst_acc.tolist() == [0.0]
    assert "AutoAttack's own checks failed for b" in leaderboard_notes(board.drop(columns="name"))
    with pytest.raises(ValueError, match="no attacks at linf budget 0.3"):
        leaderboard(rows, _examples(rows), COSTS, norm="linf", eps=0.3)


def test_attack_plan_puts_each_attack_at_its_datasets_budget():
    cfg = {"budgets": {"mnist": {"linf": 0.3, "l2": 2.0}},
           "attacks": [{"name": "pgd", "label": "PGD", "norm": "linf", "params": {"steps": 3}},
                       {"name": "cw_l2", "label": "CW", "norm": "l2", "params": {"steps": 3}},
                       {"name": "autoattack", "label": "AA-L2", "norm": "l2", "params": {"norm": "L2"}}],
           "curve_attacks": ["PGD"], "curve_factors": [0.5, 1.0]}
    headline, curve = attack_plan(cfg, "mnist")
    assert [(a.title, a.norm, a.eps) for a in headline] == [("PGD", "linf", 0.3), ("CW", "l2", 2.0), ("AA-L2", "l2", 2.0)]
    assert headline[1].l2_budget == 2.0 and headline[0].params == {"steps": 3, "eps": 0.3}
    assert [a.eps for a in curve] == [0.15, 0.3]
    with pytest.raises(ValueError, match="no budgets for 'cifar10'"):
        attack_plan(cfg, "cifar10")
    with pytest.raises(ValueError, match="declared 'l2'"):
        attack_plan({**cfg, "attacks": [{"name": "pgd", "norm": "l2"}], "curve_attacks": []}, "mnist")
    with pytest.raises(ValueError, match="curve_attacks"):
        attack_plan({**cfg, "curve_attacks": ["DDN"]}, "mnist")


def test_sanity_notes_explain_every_warn():
    table = pd.DataFrame([{"defense": "a", "check": "(a) unbounded attack", "status": "WARN", "measured": "12.0%",
                           "explanation": "an attack with no budget must reach 0%"},
                          {"defense": "b", "check": "(a) unbounded attack", "status": "PASS", "measured": "0.0%",
                           "explanation": ""}])
    assert sanity_notes(table) == "* **WARN** a, (a) unbounded attack: 12.0%. An attack with no budget must reach 0%."
    assert sanity_notes(table.iloc[1:]) == "All 1 applicable checks PASS."


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
        accuracy_curves(_rows(), "DDN", "t")
    board = leaderboard(_rows(), _examples(_rows()), COSTS, norm="linf", eps=0.1, labels={"a": "Defense A"})
    scatter = clean_vs_robust(board, "t")
    assert [t.get_text() for t in scatter.axes[0].get_legend().get_texts()] == ["b (80, 25)", "Defense A (90, 0)"]
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
                             device=torch.device("cpu"))[0].set_index(["threat", "defense"])
    x_adv = fgsm(digits_model, x, y, eps=0.2)                                      # crafted on the target
    assert rows.loc[("gray", "own"), "robust_acc"] == pytest.approx(accuracy(digits_surrogate, x_adv, y))
    assert rows.loc[("gray", "none"), "robust_acc"] == pytest.approx(accuracy(digits_model, x_adv, y))
    assert rows.loc[("gray", "own"), "gradient"] == "custom" and rows.loc[("gray", "none"), "gradient"] == "classifier"
    assert rows.loc[("white", "own"), "clean_acc"] == pytest.approx(accuracy(digits_surrogate, x, y))
    own_white = fgsm(digits_surrogate, x, y, eps=0.2)
    assert rows.loc[("white", "own"), "robust_acc"] == pytest.approx(accuracy(digits_surrogate, own_white, y))


def test_leaderboard_notes_explain_routes_and_flag_obfuscated_gradients():
    board = pd.DataFrame({"defense": ["a", "b"], "name": ["A", "B"], "worst_gray": [10.0, 20.0],
                          "worst_white": [30.0, 5.0], "white_box_gradient": ["BPDA", "full+EOT-2"], "flags": ["", ""]})
    notes = leaderboard_notes(board)
    assert "* `BPDA`:" in notes and "* `full+EOT-2`: exact gradients" in notes
    assert "obfuscated gradients" in notes and "against A:" in notes and "AutoAttack" not in notes


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
