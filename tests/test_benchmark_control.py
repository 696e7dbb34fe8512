"""Notebook 09's control: our adversarially trained classifier beside published ones (lib.benchmark.control_table),
always a labelled stand-in comparison."""
import numpy as np
import pandas as pd

from lib.benchmark import CONTROL_NOTE, control_notes, control_table
from lib.reference import CONTROL_COLUMNS, load_controls
from lib.reproduction import STAND_IN, comparison_kind, paper_columns


def _rows(dataset_eps: float = 0.3) -> pd.DataFrame:
    """adv_training's white-box rows at the budget and at twice it, plus a gray-box row and another defense's."""
    base = {"defense": "adv_training", "threat": "white", "norm": "linf", "clean_acc": 97.0, "flags": ""}
    return pd.DataFrame([
        {**base, "attack": "AutoAttack", "eps": dataset_eps, "robust_acc": 81.0},
        {**base, "attack": "PGD-CE", "eps": dataset_eps, "robust_acc": 84.0},
        {**base, "attack": "PGD-CE", "eps": 2 * dataset_eps, "robust_acc": 3.0},
        {**base, "attack": "AutoAttack", "eps": dataset_eps, "robust_acc": 90.0, "threat": "gray"},
        {**base, "attack": "AutoAttack", "eps": dataset_eps, "robust_acc": 5.0, "defense": "none"},
    ])


def test_published_controls_have_sources_and_plausible_values():
    controls = load_controls()
    assert tuple(controls.columns) == CONTROL_COLUMNS and len(controls)
    assert controls.source.str.len().gt(20).all() and controls.value.between(0, 100).all()
    assert (controls.value <= controls.clean).all()
    madry = controls[(controls.dataset == "mnist") & controls.model.str.startswith("Madry")
                     & (controls.ours_attack == "AutoAttack")]
    assert madry.value.tolist() == [88.43] and madry.eps.tolist() == [0.3]


def test_control_sets_our_white_box_accuracy_beside_each_published_figure_as_a_stand_in():
    table = control_table(_rows(), "mnist", {"linf": 0.3, "l2": 2.0}, "lenet5 trained here")
    published = load_controls().query("dataset == 'mnist'")
    assert len(table) == len(published)
    [label] = paper_columns(table)
    assert comparison_kind(label) == STAND_IN and "diff" not in table.columns
    assert label == "paper (published model and training; ours lenet5 trained here)"
    ours = dict(zip(table.attack, table.ours))
    assert ours == {"AutoAttack": 81.0, "PGD-CE": 84.0}          # white box, at the budget, adv_training only
    assert table[label].tolist() == published.value.tolist() and (table.ours_clean == 97.0).all()
    assert control_notes(table, "mnist") == CONTROL_NOTE


def test_no_control_without_a_published_figure_or_without_the_adversarially_trained_entry():
    assert control_table(_rows(0.1), "digits", {"linf": 0.1}, "x").empty
    assert control_table(_rows()[lambda r: r.defense != "adv_training"], "mnist", {"linf": 0.3}, "x").empty
    assert control_table(_rows(), "mnist", {"l2": 2.0}, "x").empty                # no published L2 figure
    assert "No control on digits" in control_notes(control_table(_rows(), "digits", {"linf": 0.1}, "x"), "digits")
    missing = control_table(_rows().query("attack != 'AutoAttack'"), "mnist", {"linf": 0.3}, "x")
    assert np.isnan(missing[missing.attack == "AutoAttack"].ours).all()       # an attack we did not run: no number
