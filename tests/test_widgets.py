"""lib.widgets: the contract's stages (a stage named "mask" is the mask), the restoration figure, notebook 08's case
analysis, and the explorer driven programmatically (every control changes the view, invalid choices are refused with
a message in the widget, nothing retrains, the defended prediction uses the defense's own classifier)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lib import data, widgets  # noqa: E402
from lib.cases import SAME_INPUT, Case, shown_defenses  # noqa: E402
from lib.defenses.base import Built, Compose, Defense, NoDefense  # noqa: E402
from lib.defenses.registry import defense_names  # noqa: E402
from lib.defenses.squeeze import BitDepthReduction, MedianFilter  # noqa: E402
from lib.evaluate import AttackSpec  # noqa: E402
from lib.profiles import load_profile  # noqa: E402
from lib.train import trained_classifier  # noqa: E402


class _Masked(Defense):
    """A toy masking defense: keeps the left half; its stages are the mask (expanded to x's channels) and x * mask."""

    def mask(self, x):
        m = torch.zeros_like(x)
        m[..., : x.shape[-1] // 2] = 1
        return m

    def purify(self, x):
        return x * self.mask(x)

    def stages(self, x):
        return {"mask": self.mask(x), "masked": self.purify(x)}


def test_stages_come_from_the_contract_and_the_mask_stage_is_the_mask(digits_batch):
    x = digits_batch[0][:4]
    stages, mask = widgets.stages_and_mask(Compose(BitDepthReduction(1), MedianFilter(2)), x)
    assert list(stages) == ["after BitDepthReduction"] and mask is None
    torch.testing.assert_close(stages["after BitDepthReduction"], BitDepthReduction(1).purify(x))
    toy = _Masked()
    stages, mask = widgets.stages_and_mask(toy, x)
    assert list(stages) == ["masked"]
    torch.testing.assert_close(mask, toy.mask(x))
    assert widgets.stages_and_mask(NoDefense(), x) == ({}, None)


def test_top_predictions_are_sorted_probabilities(digits_model, digits_batch):
    probs, classes = widgets.top_predictions(digits_model, digits_batch[0][:5], k=3)
    assert probs.shape == classes.shape == (5, 3)
    assert (probs[:, :-1] >= probs[:, 1:]).all() and float(probs.sum(1).max()) <= 1 + 1e-6
    assert torch.equal(classes[:, 0], digits_model(digits_batch[0][:5]).argmax(1))


def test_restoration_figure_has_a_column_per_stage_and_titles(digits_batch):
    x = digits_batch[0][:3]
    adv = (x + 0.1).clamp(0, 1)
    toy = _Masked()
    stages, mask = widgets.stages_and_mask(toy, adv)
    fig = widgets.restoration_figure(x, adv, toy.purify(adv), stages=stages, mask=mask, row_labels=["a", "b", "c"], dataset="digits", attack="PGD",
                                     eps=0.1, defense="toy")
    titles = [ax.get_title() for ax in fig.axes[:7]]
    assert titles == ["clean", "adversarial", "perturbation", "masked", "mask", "purified", "residual"]
    assert len(fig.axes) == 3 * 7
    title = fig._suptitle.get_text()
    assert "digits" in title and "PGD" in title and "ε=0.1" in title
    assert fig.axes[2].get_xlabel().startswith("max |δ| 0.1")
    plt.close(fig)


def test_explorer_figure_shows_stages_mask_and_three_bar_charts(digits_model, digits_batch):
    x = digits_batch[0][:1]
    toy, adv = _Masked(), (x + 0.1).clamp(0, 1)
    purified = toy.purify(adv)
    view = {"dataset": "digits", "index": 0, "label": int(digits_batch[1][0]),
            "class_names": [str(i) for i in range(10)], "attack": "FGSM", "eps": 0.1, "defense": "toy", "clean": x, "adversarial": adv, "purified": purified,
            "stages": {"masked": toy.purify(adv)}, "mask": toy.mask(adv),
            "top": {k: widgets.top_predictions(digits_model, t) for k, t in
                    (("clean", x), ("adversarial", adv), ("purified", purified))}}
    fig = widgets.explorer_figure(view)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:6] == ["clean", "adversarial", "perturbation ×", "masked", "mask", "purified"]
    assert titles[6:] == ["clean: top-3", "adversarial: top-3", "purified: top-3"]
    assert all(ax.get_xlabel() == "probability" for ax in fig.axes[6:])
    assert "image 0, toy — digits, FGSM, ε=0.1" == fig._suptitle.get_text()
    plt.close(fig)


def test_the_visual_notebooks_show_every_defense_with_a_purified_input_of_its_own():
    shown = shown_defenses(None)
    assert shown == [n for n in defense_names() if n not in SAME_INPUT] and "none" not in shown
    assert {"sfm", "idfr_id", "regionsparse", "reconstruction", "arn", "bit_depth"} <= set(shown)
    assert set(SAME_INPUT) <= set(defense_names())
    assert shown_defenses(["median", "idfr"]) == ["median", "idfr"]                  # a profile's list is kept


def _toy_case(digits_model, digits_batch, own_classifier):
    x, y = digits_batch[0][:8], digits_batch[1][:8]
    test = data.ImageData(x, y, data.dataset_info("digits"))
    defenses = {"masked": Built(_Masked(), digits_model), "own": Built(NoDefense(), own_classifier)}
    return Case("digits", test, digits_model, defenses, torch.device("cpu"), 4)


def test_restoration_case_reports_the_mask_and_the_defended_models_accuracy(digits_model, digits_batch,
                                                                            digits_surrogate):
    case = _toy_case(digits_model, digits_batch, digits_surrogate)
    spec = AttackSpec("fgsm", {"eps": 0.2}, "FGSM")
    table, figures = widgets.restoration_case(case, spec, examples=2)
    rows = table.set_index("defense")
    x_adv = case.adversarial(spec)
    assert rows.loc["masked", "mask mean"] == pytest.approx(0.5) and pd.isna(rows.loc["own", "mask mean"])
    assert rows.loc["own", "accuracy purified (%)"] == pytest.approx(case.accuracy(x_adv, "own"))
    assert rows.loc["own", "accuracy adversarial (%)"] == pytest.approx(case.accuracy(x_adv))
    assert rows.loc["own", "L2 purified-clean"] == pytest.approx(rows.loc["own", "L2 adversarial-clean"])
    assert sorted(figures) == ["restoration_digits_fgsm_masked", "restoration_digits_fgsm_own"]
    assert [ax.get_title() for ax in figures["restoration_digits_fgsm_masked"].axes[:6]] == [
        "clean", "adversarial", "perturbation", "masked", "mask", "purified"]
    plt.close("all")


# --------------------------------------------------------------------------- the explorer

ATTACKS = [{"name": "fgsm", "label": "FGSM", "params": {"eps": 0.2}},
           {"name": "pgd", "label": "PGD", "params": {"eps": 0.2, "steps": 3}},
           {"name": "deepfool", "label": "DeepFool", "params": {"steps": 5}}]


@pytest.fixture(scope="module")
def profile():
    """The smoke profile, plus a tiny Fashion-MNIST classifier where Debian's Fashion-MNIST is installed."""
    P = load_profile("smoke")
    if data.is_available("fashion_mnist"):
        tiny = {"arch": "smallcnn", "width": 0.5, "epochs": 1, "batch_size": 64}
        P["datasets"]["fashion_mnist"] = {"train_size": 400, "test_size": 100, "classifier": tiny}
    return P


@pytest.fixture(scope="module")
def explorer(profile):
    datasets = ["digits"] + (["fashion_mnist"] if "fashion_mnist" in profile["datasets"] else [])
    missing = [d for d in ("cifar10", "svhn", "cifar100") if not data.is_available(d)]
    return widgets.Explorer(profile, datasets=datasets + missing[:1], attacks=ATTACKS,
                            eps={"digits": [0.1, 0.2, 0.3], "fashion_mnist": [0.05, 0.1]},
                            defenses=["none", "bit_depth", "median"], pool_size=20, top_k=3)


def test_explorer_renders_as_a_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert explorer.image.value[:4] == b"\x89PNG" and explorer.message.value == ""
    assert explorer.loads == {"classifier": 1, "defense": 1, "attack": 1}


def test_every_control_changes_the_view(explorer):
    def shown():
        return explorer.image.value

    changes = [("index", 7), ("attack", "PGD"), ("eps", 0.3), ("defense", "bit_depth"), ("defense", "median"),
               ("attack", "DeepFool")]
    if "fashion_mnist" in explorer.datasets:
        changes += [("dataset", "fashion_mnist"), ("dataset", "digits")]
    for control, value in changes:
        before = shown()
        getattr(explorer, control).value = value
        assert explorer.message.value == "", explorer.message.value
        assert shown() != before, f"changing {control} to {value!r} left the image unchanged"
        key = {"attack": "attack", "index": "index", "dataset": "dataset", "defense": "defense_name"}.get(control)
        if key:
            assert explorer.view[key] == value
    assert explorer.eps.disabled and explorer.view["eps"] is None          # DeepFool has no budget
    explorer.attack.value = "FGSM"
    explorer.eps.value = 0.1
    assert not explorer.eps.disabled and explorer.view["eps"] == 0.1
    delta = (explorer.view["adversarial"] - explorer.view["clean"]).abs().max()
    assert float(delta) <= 0.1 + 1e-6
    seen = {explorer.index.value}
    for _ in range(6):
        explorer.random_button.click()
        seen.add(explorer.index.value)
    assert len(seen) > 1 and explorer.view["index"] == explorer.index.value


def test_invalid_choices_are_refused_with_a_message(explorer):
    assert explorer.select(dataset="digits", index=0, attack="FGSM", eps=0.2, defense="median")
    image, view = explorer.image.value, explorer.view
    explorer.index.value = 10_000
    assert "out of range" in explorer.message.value and explorer.image.value == image and explorer.view is view
    explorer.index.value = 0
    assert explorer.message.value == ""
    for bad, text in ((dict(defense="bogus"), "unknown defense"), (dict(eps=0.123), "epsilon 0.123"),
                      (dict(eps="big"), "epsilon big"), (dict(index="3"), "must be an integer"),
                      (dict(attack="nope"), "unknown attack"), (dict(colour="red"), "unknown control")):
        assert explorer.select(**bad) is False
        assert text in explorer.message.value and text in explorer.refused and explorer.image.value == image
    unavailable = [d for d in explorer.datasets if not data.is_available(d)]
    if unavailable:
        explorer.dataset.value = unavailable[0]
        assert "not available" in explorer.message.value and explorer.image.value == image
        explorer.dataset.value = "digits"
        assert explorer.message.value == ""


def test_nothing_retrains_and_a_new_session_loads_from_the_cache(explorer, profile, monkeypatch):
    choices = [dict(dataset=dataset, index=1, attack=attack, eps=eps, defense=defense)
               for dataset, eps in (("digits", 0.2), ("fashion_mnist", 0.1)) if dataset in explorer.datasets
               for attack, defense in (("FGSM", "none"), ("PGD", "median"), ("FGSM", "bit_depth"))]
    for choice in choices:
        assert explorer.select(**choice), explorer.message.value
    loads = dict(explorer.loads)

    def forbidden(*args, **kwargs):
        raise AssertionError("the explorer retrained or rebuilt something it had already")

    for name in ("trained_classifier", "build", "adversarial_set"):
        monkeypatch.setattr(widgets, name, forbidden)
    for choice in reversed(choices):
        assert explorer.select(**choice), explorer.message.value
    assert explorer.loads == loads
    monkeypatch.undo()

    metas = []                                                               # a new session: classifier from disk

    def spy(*args, **kwargs):
        model, meta = trained_classifier(*args, **kwargs)
        metas.append(meta)
        return model, meta

    monkeypatch.setattr(widgets, "trained_classifier", spy)
    fresh = widgets.Explorer(profile, datasets=["digits"], attacks=ATTACKS, eps={"digits": [0.2]},
                             defenses=["median"], pool_size=20)
    assert fresh.message.value == "" and fresh.view["defense_name"] == "median"
    assert [m["cache_hit"] for m in metas] == [True]


def test_the_purified_prediction_is_the_defended_models(profile, digits_surrogate, monkeypatch):
    """A defense with its own classifier (SFM's, adversarial training's): the purified bars are that classifier's."""
    monkeypatch.setattr(widgets, "build", lambda name, profile, dataset, classifier, device=None:
                        Built(NoDefense(), digits_surrogate))
    own = widgets.Explorer(profile, datasets=["digits"], attacks=ATTACKS, eps={"digits": [0.2]}, defenses=["adv_training"],
                           pool_size=20)
    view = own.view
    expected = widgets.top_predictions(digits_surrogate, view["purified"])
    assert torch.equal(view["top"]["purified"][1], expected[1])
    torch.testing.assert_close(view["purified"], view["adversarial"])
