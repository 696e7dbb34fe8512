import numpy as np
import pandas as pd
import pytest
import torch

from lib import cache
from lib.defenses.base import Defense, NoDefense
from lib.attacks import attack_surface
from lib.evaluate import (AttackSpec, accuracy, accuracy_interval, adversarial_set, attack_specs, attacked_digest,
                          evaluate_threats, perturbation_norms)


class BitDepth(Defense):
    """Test-local non-differentiable squeezer: 2-bit quantisation."""

    differentiable = False

    def purify(self, x):
        return torch.round(x * 3) / 3


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))


FGSM = AttackSpec("fgsm", {"eps": 0.2}, "FGSM")
BIM = AttackSpec("bim", {"eps": 0.2, "steps": 5}, "BIM")


def test_threat_table_shape_and_semantics(digits_model, digits_surrogate, digits_batch):
    x, y = digits_batch
    defenses = {"none": NoDefense(), "bits": BitDepth()}
    table = evaluate_threats(digits_model, defenses, x, y, [FGSM, BIM], threats=("black", "gray", "white"),
                             surrogate=digits_surrogate, device=torch.device("cpu"))
    assert len(table) == 3 * 2 * 2
    assert {"threat", "defense", "attack", "eps", "clean_acc", "robust_acc", "linf_mean", "l2_median",
            "attack_seconds", "gradient"} <= set(table.columns)
    row = table.set_index(["threat", "defense", "attack"])
    clean = accuracy(digits_model, x, y)
    assert row.loc[("gray", "none", "FGSM"), "clean_acc"] == pytest.approx(clean)
    # gray and white box coincide for the undefended model with a deterministic attack
    assert row.loc[("gray", "none", "BIM"), "robust_acc"] == pytest.approx(row.loc[("white", "none", "BIM"), "robust_acc"])
    # transfer is weaker than attacking the model itself
    assert row.loc[("black", "none", "BIM"), "robust_acc"] > row.loc[("gray", "none", "BIM"), "robust_acc"]
    # the adaptive attack goes through the squeezer with BPDA
    assert row.loc[("white", "bits", "BIM"), "gradient"] == "BPDA"
    assert row.loc[("white", "bits", "BIM"), "robust_acc"] < row.loc[("gray", "bits", "BIM"), "robust_acc"] + 1e-9
    assert (table["linf_mean"] <= 0.2 + 1e-6).all()


def test_threat_arguments_are_checked(digits_model, digits_batch):
    x, y = digits_batch
    with pytest.raises(ValueError, match="unknown threat"):
        evaluate_threats(digits_model, {"none": NoDefense()}, x, y, [FGSM], threats=("grey",))
    with pytest.raises(ValueError, match="surrogate"):
        evaluate_threats(digits_model, {"none": NoDefense()}, x, y, [FGSM], threats=("black",))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_threats(digits_model, {"none": NoDefense()}, x * 2, y, [FGSM])


def test_adversarial_sets_are_cached(digits_model, digits_batch, monkeypatch):
    x, y = digits_batch
    first, seconds = adversarial_set(BIM, digits_model, x, y)
    assert len(list((cache.cache_root() / "adversarial").glob("*.pt"))) == 1
    import lib.attacks as attacks

    monkeypatch.setattr(attacks, "generate", lambda *a, **k: pytest.fail("attack re-run despite cache"))
    again, seconds_again = adversarial_set(BIM, digits_model, x, y)
    assert torch.equal(first, again) and seconds_again == pytest.approx(seconds)


class Quantise(Defense):
    """Test-local parameter-free squeezer whose only difference between instances is a setting, not a weight."""

    differentiable = False

    def __init__(self, levels):
        super().__init__()
        self.levels = levels

    def purify(self, x):
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)


def test_white_box_attacks_are_cached_per_defense_setting(digits_model, digits_batch, monkeypatch):
    x, y = digits_batch
    two, four = attack_surface(digits_model, Quantise(2)), attack_surface(digits_model, Quantise(4))
    assert attacked_digest(two) == attacked_digest(attack_surface(digits_model, Quantise(2)))
    assert attacked_digest(two) != attacked_digest(four)   # same weights (none), another setting
    assert attacked_digest(attack_surface(digits_model, Quantise(2), backward_fn=torch.nn.Identity())) != \
        attacked_digest(two)                              # another gradient route
    run = dict(threats=("white",), device=torch.device("cpu"))
    first = evaluate_threats(digits_model, {"q2": Quantise(2), "q4": Quantise(4)}, x, y, [BIM], **run)
    assert first.set_index("defense").robust_acc["q2"] != first.set_index("defense").robust_acc["q4"]
    import lib.attacks as attacks

    monkeypatch.setattr(attacks, "generate", lambda *a, **k: pytest.fail("white-box attack re-run despite cache"))
    again = evaluate_threats(digits_model, {"q2": Quantise(2), "q4": Quantise(4)}, x, y, [BIM], **run)
    assert again.drop(columns="attack_seconds").equals(first.drop(columns="attack_seconds"))
    assert again.attack_seconds.tolist() == pytest.approx(first.attack_seconds.tolist())


def test_norms_and_specs():
    x = torch.zeros(2, 1, 2, 2)
    adv = x.clone()
    adv[0, 0, 0, 0] = 0.5
    norms = perturbation_norms(x, adv)
    assert norms["linf_mean"] == pytest.approx(0.25) and norms["l2_mean"] == pytest.approx(0.25)
    specs = attack_specs([{"name": "pgd", "params": {"eps": 0.1}, "label": "PGD"}, {"name": "deepfool"}])
    assert specs[0].title == "PGD" and specs[0].eps == pytest.approx(0.1) and specs[1].eps is None


def test_random_attacks_do_not_depend_on_what_ran_before(digits_model, digits_batch):
    x, y = digits_batch
    pgd = AttackSpec("pgd", {"eps": 0.1, "steps": 2}, "PGD")          # random start
    torch.manual_seed(1)
    first, _ = adversarial_set(pgd, digits_model, x, y, use_cache=False)
    after_first = torch.rand(3)
    torch.manual_seed(2)
    second, _ = adversarial_set(pgd, digits_model, x, y, use_cache=False)
    assert torch.equal(first, second)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)   # the caller's RNG stream is untouched by the attack


class RandomDrop(Defense):
    """Test-local randomised defense: zeroes a random half of the pixels."""

    randomized = True

    def purify(self, x):
        return x * (torch.rand_like(x) < 0.5)


def test_threat_table_is_reproducible_with_randomised_defenses_and_crafts_each_attack_once(
        digits_model, digits_batch, monkeypatch):
    x, y = digits_batch
    headline, curve_point = AttackSpec("fgsm", {"eps": 0.2}, "FGSM 0.2"), AttackSpec("fgsm", {"eps": 0.2}, "FGSM")
    torch.manual_seed(3)
    first = evaluate_threats(digits_model, {"drop": RandomDrop()}, x, y, [headline], device=torch.device("cpu"))
    import lib.attacks as attacks

    calls = []
    real = attacks.generate
    monkeypatch.setattr(attacks, "generate", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    torch.manual_seed(4)
    second = evaluate_threats(digits_model, {"drop": RandomDrop()}, x, y, [headline, curve_point],
                              device=torch.device("cpu"), use_cache=False)
    assert len(calls) == 2                      # gray + white, each once for the two specs with equal parameters
    cols = ["threat", "clean_acc", "robust_acc"]
    assert first[cols].equals(second[second.attack == "FGSM 0.2"][cols].reset_index(drop=True))
    assert second.groupby("threat").robust_acc.nunique().eq(1).all()


# ----- gradient routes -----

def test_sfm_white_box_gradient_is_exact_autograd_through_mask_median_and_its_own_classifier(digits_model, digits_batch):
    """The white-box surface of SFM (mask, then 2x2 median, then SFM's own F) differentiates exactly: its input gradient
    equals autograd through an independent composition (a sort-based median), and its route is labelled `full`."""
    import copy

    import torch.nn.functional as F

    from lib.defenses.sfm import SFMDefense
    from lib.defenses.sfm.networks import AttentionUNet
    from lib.defenses.squeeze import MedianFilter
    from lib.evaluate import _routes

    torch.manual_seed(0)
    x, y = digits_batch[0][:8], digits_batch[1][:8]
    x = 0.05 + 0.9 * x + 0.01 * torch.rand_like(x)          # no ties in a window: the median's gradient is unique
    masker, own_f = AttentionUNet(1, base_width=4, depth=2).eval(), copy.deepcopy(digits_model).eval()
    defense = SFMDefense(masker, MedianFilter(2))
    (route,) = _routes("white", FGSM, "sfm", defense, own_f, None, {}, 1, False)
    assert route.gradient == "full"

    def reference(t):                    # median of the 2x2 window i-1..i (symmetric padding), upper middle value
        masked = t * masker(t)
        padded = torch.cat([masked[..., :1, :], masked], 2)
        padded = torch.cat([padded[..., :1], padded], 3)
        windows = padded.unfold(2, 2, 1).unfold(3, 2, 1).flatten(-2)
        return own_f(windows.sort(-1).values[..., 2])

    grads = []
    for model in (route.model, reference):
        x_var = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_var), y), x_var)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# ----- per-example outcomes and the ensemble's worst case -----

class _Threshold(torch.nn.Module):
    """Class 1 when the first pixel exceeds 0.5, else class 0."""

    def forward(self, x):
        v = x[:, 0, 0, 0]
        return torch.stack([0.5 - v, v - 0.5], 1)


def _fool_half(first: bool):
    def attack(model, x, y, *, eps):
        x_adv = x.clone()
        half = len(x) // 2
        x_adv[(slice(0, half) if first else slice(half, None)), 0, 0, 0] = eps
        return x_adv
    return attack


def test_ensemble_accuracy_is_the_per_example_worst_case(monkeypatch):
    from lib import attacks
    from lib.evaluate import ensemble_accuracy, threat_outcomes

    monkeypatch.setitem(attacks.ATTACKS, "first_half", _fool_half(True))
    monkeypatch.setitem(attacks.ATTACKS, "second_half", _fool_half(False))
    x, y = torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.long)
    specs = [AttackSpec("first_half", {"eps": 1.0}, "A"), AttackSpec("second_half", {"eps": 1.0}, "B")]
    rows, examples = threat_outcomes(_Threshold(), {"none": NoDefense()}, x, y, specs, threats=("gray",),
                                     device=torch.device("cpu"), use_cache=False)
    assert rows.robust_acc.tolist() == [50.0, 50.0] and rows.norm.eq("linf").all()
    assert len(examples) == 20 and set(examples.columns) >= {"example", "correct", "clean_correct", "linf", "l2"}
    assert examples.groupby("attack").correct.mean().eq(0.5).all() and examples.clean_correct.all()
    assert examples[~examples.correct].linf.eq(1.0).all() and examples[examples.correct].l2.eq(0.0).all()
    assert ensemble_accuracy(examples).loc[("none", "gray")] == 0.0       # where the lowest single attack gives 50%


def test_accuracy_interval_is_the_wilson_score_interval():
    from scipy.stats import binomtest   # independent reference (statsmodels is not a dependency)

    n, correct = 64, np.array([1, 13, 32, 60])
    low, high = accuracy_interval(pd.Series(100 * correct / n), n)
    for k, lo, hi in zip(correct, low, high):
        ref = binomtest(int(k), n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((100 * ref.low, 100 * ref.high))
    ref90 = binomtest(13, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert accuracy_interval(100 * 13 / n, n, level=0.9) == pytest.approx((100 * ref90.low, 100 * ref90.high))
    assert accuracy_interval(50.0, 100) == pytest.approx((40.3832, 59.6168), abs=1e-4)   # textbook value
    # n per cell, and NaN (no accuracy) stays NaN
    low, high = accuracy_interval(np.array([50.0, 50.0, np.nan]), np.array([100, 1000, 100]))
    assert high[0] - low[0] > high[1] - low[1] and np.isnan(low[2]) and np.isnan(high[2])


def test_accuracy_interval_at_0_and_100_percent_stays_in_range_and_is_one_sided():
    z2 = 1.959963984540054 ** 2
    low, high = accuracy_interval([0.0, 100.0], 64)
    assert low[0] == 0.0 and high[0] == pytest.approx(100 * z2 / (64 + z2))
    assert high[1] == 100.0 and low[1] == pytest.approx(100 * 64 / (64 + z2))
    for bad in ({"accuracy_pct": 101.0, "n": 10}, {"accuracy_pct": 50.0, "n": 0},
                {"accuracy_pct": 50.0, "n": 10, "level": 1.0}):
        with pytest.raises(ValueError):
            accuracy_interval(**bad)
