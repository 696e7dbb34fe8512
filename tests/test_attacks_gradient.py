"""Gradient attacks, AutoAttack wrapper and registry: budgets, side effects, strength, oracle agreement, validation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lib.attacks import ATTACKS, autoattack, bim, fgsm, generate, input_diversity, mi_fgsm, pgd, pgd_l2

# (registry name, params, norm of the budget, budget)
CASES = [
    ("fgsm", dict(eps=0.1), "linf", 0.1),
    ("pgd", dict(eps=0.1, steps=5), "linf", 0.1),
    ("pgd", dict(eps=0.1, steps=5, loss="cw", alpha=0.05), "linf", 0.1),
    ("pgd_l2", dict(eps=0.8, steps=5), "l2", 0.8),
    ("bim", dict(eps=0.1, steps=5), "linf", 0.1),
    ("mi_fgsm", dict(eps=0.1, steps=5), "linf", 0.1),
    ("di_fgsm", dict(eps=0.1, steps=5, prob=1.0, decay=1.0), "linf", 0.1),
]
IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(CASES)]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def budget(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample perturbation size in the given norm."""
    return (x_adv - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1)


@pytest.fixture(scope="module")
def batch(digits_batch):
    x, y = digits_batch
    return x[:64], y[:64]


@pytest.mark.parametrize("name,params,norm,eps", CASES, ids=IDS)
def test_budget_range_shape_and_no_side_effects(digits_model, batch, name, params, norm, eps):
    torch.manual_seed(0)
    x, y = batch
    x_before = x.clone()
    model = copy.deepcopy(digits_model).train()  # a model in train mode must stay in train mode
    x_adv = ATTACKS[name](model, x, y, **params)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert budget(x_adv, x, norm).max() <= eps + 1e-6
    assert (x_adv != x).any()
    assert not digits_model.training


def test_random_start_budgets_are_exact_and_seeded(digits_model, batch):
    x, y = batch
    for norm, eps in (("linf", 0.07), ("l2", 0.5)):
        gen = torch.Generator().manual_seed(3)
        x_a = pgd(digits_model, x, y, eps=eps, steps=3, norm=norm, generator=gen)
        x_b = pgd(digits_model, x, y, eps=eps, steps=3, norm=norm, generator=torch.Generator().manual_seed(3))
        x_c = pgd(digits_model, x, y, eps=eps, steps=3, norm=norm, generator=torch.Generator().manual_seed(4))
        assert torch.equal(x_a, x_b) and not torch.equal(x_a, x_c)
        assert budget(x_a, x, norm).max() <= eps + 1e-6
    # away from the box edges a large L2 step lands exactly on the sphere of radius eps
    x_mid = 0.4 + 0.2 * x
    x_l2 = pgd_l2(digits_model, x_mid, y, eps=0.3, alpha=1.0, steps=2, random_start=False)
    assert torch.allclose(budget(x_l2, x_mid, "l2"), torch.full((len(x),), 0.3), atol=1e-5)


def test_attacks_work_under_no_grad(digits_model, batch):
    x, y = batch
    with torch.no_grad():
        x_adv = pgd(digits_model, x, y, eps=0.2, steps=5, random_start=False)
    assert accuracy(digits_model, x_adv, y) < accuracy(digits_model, x, y) - 0.3


def test_pgd_is_strong_and_targeted_pgd_hits_target(digits_model, digits_batch):
    torch.manual_seed(0)
    x, y = digits_batch
    clean = accuracy(digits_model, x, y)
    assert clean > 0.9
    assert accuracy(digits_model, pgd(digits_model, x, y, eps=0.2, steps=10), y) < 0.1
    assert accuracy(digits_model, pgd(digits_model, x, y, eps=0.2, steps=10, loss="cw"), y) < 0.1
    assert accuracy(digits_model, pgd_l2(digits_model, x, y, eps=1.5, steps=10), y) < 0.1
    assert accuracy(digits_model, fgsm(digits_model, x, y, eps=0.2), y) < clean - 0.5
    target = (y + 1) % 10
    x_t = pgd(digits_model, x, target, eps=0.3, steps=20, targeted=True)
    assert accuracy(digits_model, x_t, target) > 0.8
    x_t = pgd(digits_model, x, target, eps=0.3, steps=20, targeted=True, loss="cw")
    assert accuracy(digits_model, x_t, target) > 0.8
    x_t = mi_fgsm(digits_model, x, target, eps=0.3, steps=20, targeted=True)
    assert accuracy(digits_model, x_t, target) > 0.6


def test_generate_batches_like_one_call_and_validates_name(digits_model, batch):
    x, y = batch
    whole = bim(digits_model, x, y, eps=0.1, steps=3)
    assert torch.allclose(generate("bim", digits_model, x, y, batch_size=7, eps=0.1, steps=3), whole, atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown attack 'pgdd'.*valid names:.*pgd_l2"):
        generate("pgdd", digits_model, x, y, eps=0.1)
    assert set(ATTACKS) == {"fgsm", "pgd", "pgd_l2", "bim", "mi_fgsm", "di_fgsm", "cw_l2", "deepfool", "ddn",
                            "stadv", "autoattack"}


def test_input_diversity_resizes_and_pads(batch):
    x = batch[0]
    gen = torch.Generator().manual_seed(0)
    assert input_diversity(x, prob=0.0, generator=gen) is x
    out = input_diversity(torch.ones(2, 1, 20, 20), prob=1.0, resize_rate=0.5, generator=gen)
    assert out.shape == (2, 1, 20, 20)
    rows, cols = (out[0, 0] > 0).any(1), (out[0, 0] > 0).any(0)
    assert 10 <= rows.sum() <= 19 and rows.sum() == cols.sum()  # a shrunk square of ones inside zero padding


@pytest.mark.parametrize("bad,match", [
    (lambda x: x * 2, r"\[0, 1\]"),
    (lambda x: x.masked_fill(x > 0.5, float("nan")), "NaN"),
    (lambda x: x[:, 0], "rank 3"),
])
@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_l2", "bim", "mi_fgsm", "di_fgsm"])
def test_invalid_images_raise(digits_model, batch, name, bad, match):
    x, y = batch
    with pytest.raises(ValueError, match=match):
        ATTACKS[name](digits_model, bad(x), y, eps=0.1)


@pytest.mark.parametrize("name", ["pgd", "pgd_l2", "bim", "mi_fgsm", "di_fgsm"])
def test_invalid_budget_and_steps_raise(digits_model, batch, name):
    x, y = batch
    with pytest.raises(ValueError, match="eps must be"):
        ATTACKS[name](digits_model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="steps must be"):
        ATTACKS[name](digits_model, x, y, eps=0.1, steps=0)
    with pytest.raises(ValueError, match="y must be"):
        ATTACKS[name](digits_model, x, y[:-1], eps=0.1)


def test_invalid_options_raise(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="eps must be"):
        fgsm(digits_model, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="norm must be"):
        pgd(digits_model, x, y, eps=0.1, norm="l3")
    with pytest.raises(ValueError, match="loss must be"):
        pgd(digits_model, x, y, eps=0.1, loss="mse")
    with pytest.raises(ValueError, match="resize_rate"):
        ATTACKS["di_fgsm"](digits_model, x, y, eps=0.1, resize_rate=1.2)


# ----- oracle agreement: same model, inputs and settings as torchattacks / ART -----

EPS_GRID = (0.05, 0.1, 0.2)


def test_fgsm_pgd_mifgsm_agree_with_torchattacks(digits_model, digits_batch):
    ta = pytest.importorskip("torchattacks")
    x, y = digits_batch
    for eps in EPS_GRID:
        pairs = [
            (fgsm(digits_model, x, y, eps=eps), ta.FGSM(digits_model, eps=eps)),
            (pgd(digits_model, x, y, eps=eps, alpha=eps / 4, steps=10, random_start=False),
             ta.PGD(digits_model, eps=eps, alpha=eps / 4, steps=10, random_start=False)),
            (pgd_l2(digits_model, x, y, eps=8 * eps, alpha=2 * eps, steps=10, random_start=False),
             ta.PGDL2(digits_model, eps=8 * eps, alpha=2 * eps, steps=10, random_start=False)),
            (mi_fgsm(digits_model, x, y, eps=eps, alpha=eps / 10, steps=10, decay=1.0),
             ta.MIFGSM(digits_model, eps=eps, alpha=eps / 10, steps=10, decay=1.0)),
        ]
        for ours, oracle in pairs:
            acc_ours, acc_oracle = accuracy(digits_model, ours, y), accuracy(digits_model, oracle(x, y), y)
            assert abs(acc_ours - acc_oracle) <= 0.02, (type(oracle).__name__, eps, acc_ours, acc_oracle)


def test_fgsm_pgd_agree_with_art(digits_model, digits_batch):
    pytest.importorskip("art")
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    x, y = digits_batch
    clf = PyTorchClassifier(digits_model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    x_np = x.numpy()
    for eps in EPS_GRID:
        art_fgsm = FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=256).generate(x_np)
        art_pgd = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=10,
                                                  num_random_init=0, batch_size=256, verbose=False
                                                  ).generate(x_np, y.numpy())
        pairs = [(fgsm(digits_model, x, y, eps=eps), art_fgsm),
                 (pgd(digits_model, x, y, eps=eps, alpha=eps / 4, steps=10, random_start=False), art_pgd)]
        for ours, oracle in pairs:
            acc_ours = accuracy(digits_model, ours, y)
            acc_oracle = accuracy(digits_model, torch.from_numpy(oracle), y)
            assert abs(acc_ours - acc_oracle) <= 0.02, (eps, acc_ours, acc_oracle)


# ----- AutoAttack through pyautoattack -----

def test_autoattack_apgd_respects_budget_lowers_accuracy_and_is_quiet(digits_model, batch, capsys):
    x, y = batch[0][:20], batch[1][:20]
    rng_before = torch.get_rng_state()
    x_adv = autoattack(lambda t: digits_model(t), x, y, eps=0.15, version="custom", attacks=["apgd-ce"],
                       n_iter=10)
    assert torch.equal(torch.get_rng_state(), rng_before)  # AutoAttack's reseeding does not leak
    assert capsys.readouterr().out == ""
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert budget(x_adv, x, "linf").max() <= 0.15 + 1e-6
    assert accuracy(digits_model, x_adv, y) < accuracy(digits_model, x, y) - 0.3
    x_again = autoattack(digits_model, x, y, eps=0.15, version="custom", attacks=["apgd-ce"], n_iter=10)
    assert torch.equal(x_adv, x_again)  # seeded


def test_autoattack_validates_options(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="version='custom' needs attacks"):
        autoattack(digits_model, x, y, eps=0.1, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="norm must be"):
        autoattack(digits_model, x, y, eps=0.1, norm="L3")
    with pytest.raises(ValueError, match="eps must be"):
        autoattack(digits_model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="n_target_classes"):
        autoattack(digits_model, x, y, eps=0.1, n_target_classes=0)


def test_autoattack_targets_only_the_classes_it_is_given(digits_model, batch, monkeypatch):
    """n_target_classes (a dry run's minimum) bounds the target classes of the targeted APGD, as AutoAttack's own
    attribute does: one target class makes one targeted run per restart."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    x, y = batch[0][:8], batch[1][:8]
    runs = []
    original = APGDAttack_targeted.attack_single_run
    monkeypatch.setattr(APGDAttack_targeted, "attack_single_run",
                        lambda self, *a, **k: runs.append(self.n_target_classes) or original(self, *a, **k))
    for targets in (1, 3):
        runs.clear()
        autoattack(digits_model, x, y, eps=0.01, version="custom", attacks=["apgd-t"], n_iter=2, n_target_classes=targets)
        assert runs and len(runs) <= targets and set(runs) == {targets}


# ----- evaluation strength: PGD's best iterate and restarts; AutoAttack's own checks -----

def _fooled(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def test_pgd_best_iterate_fools_every_example_its_last_iterate_fools(digits_model, batch):
    x, y = batch
    # a large step makes PGD oscillate, so the last iterate is often not the best one
    settings = dict(eps=0.1, alpha=0.1, steps=6, random_start=False)
    last = pgd(digits_model, x, y, **settings)
    best = pgd(digits_model, x, y, keep_best=True, **settings)
    fooled_last, fooled_best = _fooled(digits_model, last, y), _fooled(digits_model, best, y)
    assert bool((fooled_best | ~fooled_last).all())                  # fooled by the last => fooled by the best
    assert int(fooled_best.sum()) > int(fooled_last.sum())           # and the best iterate found more
    assert budget(best, x, "linf").max() <= 0.1 + 1e-6


def test_pgd_restarts_keep_each_examples_best_run(digits_model, batch):
    x, y = batch
    settings = dict(eps=0.06, steps=3)
    gen = torch.Generator().manual_seed(5)
    runs = [pgd(digits_model, x, y, generator=gen, **settings) for _ in range(3)]
    restarted = pgd(digits_model, x, y, restarts=3, generator=torch.Generator().manual_seed(5), **settings)
    fooled_any = torch.stack([_fooled(digits_model, r, y) for r in runs]).any(0)
    assert torch.equal(_fooled(digits_model, restarted, y), fooled_any)   # the same three random starts
    with pytest.raises(ValueError, match="restarts must be"):
        pgd(digits_model, x, y, eps=0.1, restarts=0)


class _Randomised(torch.nn.Module):
    """A model whose logits change from call to call: AutoAttack's check for randomised models must flag it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) + 3.0 * torch.randn(len(x), 10)


def test_autoattack_checks_are_raised_as_warnings_not_silenced(digits_model, batch):
    from lib.attacks.autoattack import AutoAttackWarning

    x, y = batch[0][:16], batch[1][:16]
    with pytest.warns(AutoAttackWarning, match="randomized"):
        autoattack(_Randomised(digits_model), x, y, eps=0.1, version="custom", attacks=["apgd-ce"], n_iter=2)
    with pytest.raises(ValueError, match="eot_iter must be"):
        autoattack(digits_model, x, y, eps=0.1, version="rand", eot_iter=0)


class _Dynamic(torch.nn.Module):
    """A model that differentiates inside its forward pass (as TVM's optimisation does): AutoAttack calls it dynamic."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.enable_grad():
            v = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(v.square().sum(), v)
        return self.model(x + 0 * g)


def test_autoattack_dynamic_flag_belongs_to_the_flagged_model_only(digits_model, batch):
    from lib.attacks.autoattack import AutoAttackWarning

    x, y = batch[0][:8], batch[1][:8]
    settings = dict(eps=0.1, version="custom", attacks=["apgd-ce"], n_iter=2)
    with pytest.warns(AutoAttackWarning, match="dynamic defense"):
        autoattack(_Dynamic(digits_model), x, y, **settings)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoAttackWarning)     # pyautoattack's counters would flag this one too
        autoattack(digits_model, x, y, **settings)
