"""SFM-Defense: mask generator, the three losses against their equations, loss scale, Algorithm 1's phases, inference."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lib.attacks import attack_surface, fgsm
from lib.data import ImageData, dataset_info
from lib.defenses.base import Built, NoDefense
from lib.defenses.sfm import build, sfm_for, sfm_splits, w1_sweep
from lib.defenses.sfm.defense import SFMDefense
from lib.defenses.sfm.losses import (coupled_elements, identity_threshold, paper_threshold_ratio, reconstruction_loss,
                                     semantic_loss, sfm_losses, sparsity_loss, w1_for_ratio)
from lib.defenses.sfm.networks import AttentionUNet
from lib.defenses.sfm.selection import choose
from lib.defenses.sfm.training import (SFMConfig, classifier_epochs, classifier_optimizer, mask_statistics, mask_status,
                                       masker_epoch, masker_optimizer, train_sfm, trained_sfm)
from lib.defenses.squeeze import BitDepthReduction, MedianFilter
from lib.evaluate import model_digest
from lib.profiles import load_profile
from lib.train import trained_classifier
from tests.conftest import make_digits_cnn

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- mask generator

@pytest.mark.parametrize("channels,size,width,depth", [(1, 8, 4, 2), (3, 16, 4, 3), (1, 28, 8, 3)])
def test_mask_has_one_channel_in_unit_interval(channels, size, width, depth):
    torch.manual_seed(0)
    net = AttentionUNet(channels, width, depth).eval()
    x = torch.rand(5, channels, size, size)
    with torch.no_grad():
        m = net(x)
    assert m.shape == (5, 1, size, size)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert SFMDefense(net).masked(x).shape == x.shape


def test_full_scale_unet_has_the_attu_net_size():
    # spec-000 §2.2: b = 64, d = 5 is the standard AttU_Net, about 35 M parameters
    n = sum(p.numel() for p in AttentionUNet(3, 64, 5).parameters())
    assert 34e6 < n < 36e6


@pytest.mark.parametrize("height,width", [(28, 28), (17, 23), (8, 8)])
def test_depth5_unet_works_at_any_image_size(height, width):
    # regression (issue 16): the paper's depth-5 U-Net crashed on 28x28 (Fashion-)MNIST, sides not divisible by 16
    torch.manual_seed(0)
    net = AttentionUNet(1, 4, 5).eval()
    x = torch.rand(2, 1, height, width)
    with torch.no_grad():
        m = net(x)
    assert m.shape == (2, 1, height, width)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0


def test_unet_pads_only_sides_that_need_it():
    torch.manual_seed(0)
    net = AttentionUNet(1, 4, 3).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), net._mask(x))                        # divisible: no padding at all
        padded = F.pad(x[..., :14, :15], (0, 1, 1, 1), mode="replicate")  # 14x15 -> 16x16, centred as forward does
        assert torch.equal(net(x[..., :14, :15]), net._mask(padded)[..., 1:15, 0:15])


def test_unet_rejects_bad_shapes_and_depths():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        AttentionUNet(1, 4, 3)(torch.rand(1, 10, 10))
    with pytest.raises(ValueError, match="depth"):
        AttentionUNet(1, 4, 1)


# --------------------------------------------------------------------------- losses (Eqs. 3-5)

X = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]], [[[1.0, 1.0], [1.0, 1.0]]]])          # (2, 1, 2, 2)
XT = torch.tensor([[[[0.5, 0.0], [0.0, 0.25]]], [[[0.5, 0.5], [0.0, 1.0]]]])         # x * m for some m


def test_sparsity_loss_is_the_l1_norm():
    # per image: 0.75 and 2.0
    assert float(sparsity_loss(XT, "batch_tensor")) == pytest.approx(2.75)
    assert float(sparsity_loss(XT, "per_sample")) == pytest.approx((0.75 + 2.0) / 2)


def test_reconstruction_loss_is_the_unsquared_l2_norm():
    # x - x~: image 0 (0, 1, 0, 0) -> sq 1; image 1 (0.5, 0.5, 1, 0) -> sq 1.5
    assert float(reconstruction_loss(X, XT, "batch_tensor")) == pytest.approx(math.sqrt(2.5), abs=1e-6)
    assert float(reconstruction_loss(X, XT, "per_sample")) == pytest.approx((1.0 + math.sqrt(1.5)) / 2, abs=1e-6)


def test_semantic_loss_is_one_minus_cosine():
    clean = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    masked = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # cos = 1/sqrt(2) and 0; scale does not matter
    expected = [1 - 1 / math.sqrt(2), 1.0]
    assert float(semantic_loss(clean, masked, "mean")) == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert float(semantic_loss(clean, masked, "sum")) == pytest.approx(sum(expected), abs=1e-6)
    assert float(semantic_loss(clean, 5 * clean)) == pytest.approx(0.0, abs=1e-6)


def test_total_loss_is_the_weighted_sum_of_eq_2():
    clean = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    masked = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    terms = sfm_losses(X, XT, clean, masked, (0.1, 2.0, 3.0))
    expected = 0.1 * 2.75 + 2.0 * (1 - 1 / math.sqrt(2) + 1.0) / 2 + 3.0 * math.sqrt(2.5)
    assert float(terms["total"]) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        sfm_losses(X, XT, clean, masked, (1, 1, 1), reduction="pixel")


def test_reconstruction_gradient_is_finite_at_the_identity_mask():
    m = torch.ones(2, 1, 2, 2, requires_grad=True)
    reconstruction_loss(X, X * m).backward()
    assert torch.isfinite(m.grad).all()


# --------------------------------------------------------------------------- loss scale (spec §2.5.1)

def test_coupled_elements_counts_grey_and_colour_pixels():
    grey = torch.zeros(2, 1, 4, 4)
    grey[:, :, :2] = 0.7                      # 8 non-zero pixels per image
    assert coupled_elements(grey, 16) == pytest.approx(8 * 16)
    assert coupled_elements(grey, 16, "per_sample") == pytest.approx(8)
    colour = torch.full((3, 3, 2, 2), 0.4)   # grey colour pixels: a^2 / b = 3 each
    assert coupled_elements(colour, 1) == pytest.approx(12)
    assert identity_threshold(colour, 1) == pytest.approx(1 / math.sqrt(12))
    assert paper_threshold_ratio("cifar") == pytest.approx(2.5e-3 * math.sqrt(3 * 1024 * 128))


@pytest.mark.parametrize("ratio,identity", [(0.8, True), (1.5, False)])
def test_identity_mask_is_optimal_exactly_below_the_threshold(ratio, identity):
    # free per-pixel masks minimising w1 L_sp + w3 L_recon (batch tensor): identity below the threshold only
    torch.manual_seed(0)
    x = torch.rand(4, 1, 4, 4) * 0.8 + 0.2
    w1 = w1_for_ratio(ratio, x, batch_size=4)
    logit = torch.full((4, 1, 4, 4), 3.0, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.05)
    for _ in range(400):
        x_tilde = x * torch.sigmoid(logit)
        loss = w1 * sparsity_loss(x_tilde) + reconstruction_loss(x, x_tilde)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean = float(torch.sigmoid(logit.detach()).mean())
    assert (mean > 0.95) if identity else (mean < 0.8)


def test_mask_status_names_collapse_and_identity():
    assert mask_status(mask_statistics(torch.zeros(2, 1, 4, 4))) == "collapsed to zeros"
    assert mask_status(mask_statistics(torch.ones(2, 1, 4, 4))) == "identity (all ones)"
    assert mask_status(mask_statistics(torch.linspace(0, 1, 32).view(2, 1, 4, 4))) == "partial"


# --------------------------------------------------------------------------- Algorithm 1

@pytest.fixture()
def small_setup(digits_split):
    torch.manual_seed(0)
    info = dataset_info("digits")
    data = ImageData(digits_split["x_train"][:128], digits_split["y_train"][:128], info)
    return make_digits_cnn(width=8), AttentionUNet(1, 4, 2), data


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_classifier_phase_updates_only_the_classifier(small_setup):
    clf, masker, data = small_setup
    cfg = SFMConfig(base_width=4, depth=2, batch_size=32, clf_lr=0.05)
    c0, m0 = _snapshot(clf), _snapshot(masker)
    rows = classifier_epochs(clf, data.x, data.y, classifier_optimizer(clf, cfg), cfg, first_seed=0, device=CPU)
    assert len(rows) == 1 and rows[0]["ce"] > 0 and 0 <= rows[0]["train_acc"] <= 100
    assert _changed(m0, masker) == set()
    assert {k for k in _changed(c0, clf) if "weight" in k}, "classifier weights must move"


def test_masker_phase_updates_only_the_masker(small_setup):
    clf, masker, data = small_setup
    cfg = SFMConfig(base_width=4, depth=2, batch_size=32, w1=0.05)
    c0, m0 = _snapshot(clf), _snapshot(masker)
    stats = masker_epoch(clf, masker, data.x, masker_optimizer(masker, cfg), cfg, seed=0, device=CPU)
    assert _changed(c0, clf) == set(), "classifier weights and buffers stay fixed in the SFM phase"
    assert all(p.grad is None for p in clf.parameters())
    assert all(p.requires_grad for p in clf.parameters()), "requires_grad is restored after the phase"
    assert {k for k in _changed(m0, masker) if "weight" in k}
    assert set(stats) >= {"L_sp", "L_seg", "L_recon", "L_total", "mask_mean", "mask_frac_zero", "mask_frac_one",
                          "mask_status"}
    assert 0.0 <= stats["L_seg"] <= 2.0 and stats["L_recon"] >= 0.0


def test_masker_objective_decreases_on_a_fixed_batch(small_setup):
    clf, masker, data = small_setup
    cfg = SFMConfig(base_width=4, depth=2, batch_size=128, w1=0.05, masker_lr=0.05)
    x = data.x
    opt = masker_optimizer(masker, cfg)
    clf.eval()

    def loss() -> torch.Tensor:
        x_tilde = x * masker(x)
        with torch.no_grad():
            clean = clf(x)
        return sfm_losses(x, x_tilde, clean, clf(x_tilde), cfg.weights)["total"]

    masker.eval()
    first = float(loss().detach())
    masker.train()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    masker.eval()
    assert float(loss().detach()) < first


def test_train_sfm_alternates_and_reports_collapse(small_setup):
    clf, masker, data = small_setup
    cfg = SFMConfig(base_width=4, depth=2, batch_size=64, pre_epochs=1, epochs=2, w1=5.0, masker_lr=0.1)
    with pytest.warns(RuntimeWarning, match="collapsed to zeros"):
        history = train_sfm(clf, masker, NoDefense(), data, cfg, device=CPU, log=None)
    assert [r["phase"] for r in history] == ["pretrain", "classifier", "masker", "classifier", "masker"]
    assert history[-1]["mask_status"] == "collapsed to zeros"


# --------------------------------------------------------------------------- inference

def test_defense_is_t_of_masked_input_with_bpda_where_t_has_no_gradient(small_setup):
    clf, masker, data = small_setup
    masker.eval()
    squeeze = BitDepthReduction(3)
    defense = SFMDefense(masker, squeeze).eval()
    assert not defense.differentiable and defense.bpda_purify is not None and not defense.randomized
    x = data.x[:16]
    with torch.no_grad():
        m = masker(x)
        assert torch.equal(defense.purify(x), squeeze.purify(x * m))
        assert torch.allclose(defense.gray_box_model(clf)(x), clf(x * m))
    # rounding has zero gradient; the white box differentiates the masker exactly and T by the identity (BPDA)
    x_var = x.clone().requires_grad_(True)
    attack_surface(NoDefense(), defense)(x_var).sum().backward()
    x_ref = x.clone().requires_grad_(True)
    (x_ref * masker(x_ref)).sum().backward()
    assert torch.allclose(x_var.grad, x_ref.grad, atol=1e-6)
    adv = fgsm(attack_surface(clf, defense), x, data.y[:16], eps=0.1)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6


def test_defense_with_the_median_is_differentiable_exactly(small_setup):
    _, masker, data = small_setup
    masker.eval()
    median = MedianFilter(2)
    defense = SFMDefense(masker, median).eval()
    assert defense.differentiable and defense.bpda_purify is None
    x_var = data.x[:8].clone().requires_grad_(True)
    defense.purify(x_var).sum().backward()
    x_ref = data.x[:8].clone().requires_grad_(True)
    median.purify(x_ref * masker(x_ref)).sum().backward()
    assert torch.equal(x_var.grad, x_ref.grad)
    x_id = data.x[:8].clone().requires_grad_(True)
    (x_id * masker(x_id)).sum().backward()
    assert not torch.allclose(x_var.grad, x_id.grad), "the median's own gradient, not an identity backward"


def test_stages_are_mask_and_masked_of_the_input_shape(small_setup):
    _, _, data = small_setup
    x = data.x[:4].expand(-1, 3, -1, -1).contiguous()   # a colour batch: the 1-channel mask is expanded
    defense = SFMDefense(AttentionUNet(3, 4, 2).eval(), BitDepthReduction(3)).eval()
    with torch.no_grad():
        stages = defense.stages(x)
        assert list(stages) == ["mask", "masked"]
        assert all(v.shape == x.shape for v in stages.values())
        assert torch.equal(stages["mask"][:, 0], stages["mask"][:, 2])
        assert torch.equal(defense.purify(x), defense.preprocess.purify(stages["masked"]))


def test_trained_sfm_is_cached_and_reloads_the_same_defense(small_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    _, _, data = small_setup
    cfg = SFMConfig(base_width=4, depth=2, batch_size=64, pre_epochs=1, epochs=1, w1=0.05)
    args = (lambda: make_digits_cnn(width=8), BitDepthReduction(4), {"spec": "bit4"}, data, cfg)
    first = trained_sfm(*args, key={"test": 1}, device=CPU, log=None)
    second = trained_sfm(*args, key={"test": 1}, device=CPU, log=None)
    assert isinstance(second, Built) and isinstance(second.defense, SFMDefense)
    assert (first.meta["cache_hit"], second.meta["cache_hit"]) == (False, True)
    assert second.meta["mask_status"] == first.meta["mask_status"] and len(second.meta["history"]) == 3
    assert second.meta["config"]["w1"] == 0.05 and second.meta["train_seconds"] == first.meta["train_seconds"]
    with torch.no_grad():
        assert torch.equal(first.defense.purify(data.x[:8]), second.defense.purify(data.x[:8]))
        assert torch.equal(first.classifier(data.x[:8]), second.classifier(data.x[:8]))


# --------------------------------------------------------------------------- from a profile (notebook 01, registry)

def test_choose_takes_the_best_validation_score_and_the_smaller_ratio_on_a_tie():
    table = pd.DataFrame({"w1 / threshold": [1.0, 1.1, 1.57], "val clean + black": [120.0, 150.0, 150.0]})
    assert choose(table) == 1.1
    assert choose(table.assign(**{"val clean + black": [90.0, 80.0, 70.0]})) == 1.0


def test_sfm_for_builds_the_smoke_profiles_defense_once_and_then_loads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    profile = load_profile("smoke", {"datasets.digits.classifier.epochs": 1})  # a one-epoch target keeps this fast
    target, _ = trained_classifier(profile, "digits", device=CPU)
    digest = model_digest(target)
    sfm_data, val = sfm_splits(profile, "digits")
    assert len(sfm_data) == 256 and len(val) == 64  # the smoke section's sfm_train_size and val_size
    assert not set(map(tuple, sfm_data.x.flatten(1).tolist())) & set(map(tuple, val.x.flatten(1).tolist()))

    built = sfm_for(profile, "digits", target, ratio=1.57, device=CPU, log=None)
    assert isinstance(built.defense, SFMDefense) and not built.meta["cache_hit"]
    assert built.meta["config"]["preprocess"] == "median2" and built.meta["config"]["ratio"] == 1.57
    assert built.meta["config"]["w1"] == pytest.approx(w1_for_ratio(1.57, sfm_data.x, 64))
    assert model_digest(target) == digest, "F_theta is fine-tuned on a copy; the target is left as it was"
    assert built.classifier is not target
    x = val.x[:16]
    with torch.no_grad():
        purified = built.defense.purify(x)
        assert built.model()(x).shape == (16, 10)
    assert purified.shape == x.shape and float(purified.min()) >= 0.0 and float(purified.max()) <= 1.0
    again = sfm_for(profile, "digits", target, ratio=1.57, log=None)
    assert again.meta["cache_hit"]
    with torch.no_grad():
        assert torch.equal(again.defense.purify(x), purified)


def test_build_is_the_sfm_at_the_ratio_the_validation_sweep_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    profile = load_profile("smoke", {"datasets.digits.classifier.epochs": 1, "datasets.digits.surrogate.epochs": 1})
    target, _ = trained_classifier(profile, "digits", device=CPU)
    surrogate, _ = trained_classifier(profile, "digits", "surrogate", device=CPU)
    sweep = w1_sweep(profile, "digits", target, surrogate, device=CPU, log=None)
    assert list(sweep.table["w1 / threshold"]) == [1.0, 1.57]          # the smoke profile's sweep_ratios, sorted
    best = sweep.table.loc[sweep.table["val clean + black"].idxmax(), "w1 / threshold"]
    assert sweep.ratio == best and sweep.chosen is sweep.models[best]
    assert (sweep.table["val clean + black"] == sweep.table["val clean"] + sweep.table["val black PGD-8"]).all()

    built = build(profile, "digits", target, device=CPU)   # the registry's call: the sweep again, from the caches
    assert built.meta["cache_hit"] and built.meta["config"]["ratio"] == sweep.ratio
    assert built.meta["cache_key"] == sweep.chosen.meta["cache_key"] and built.meta["train_seconds"] > 0
    assert built.classifier is not target and built.defense.differentiable   # F_theta; the 2x2 median has a gradient
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(built.model()(x), sweep.chosen.model()(x))
