"""Paper 003: pixel-depth compression, the EDSR-style restorer, its eq. (4) training and the defense on digits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.attacks import attack_surface, fgsm
from lib.data import load_dataset
from lib.defenses.base import Built, Defended
from lib.defenses.reconstruction import (
    EDSRRestorer, PixelDepthCompression, ReconstructionDefense, RestorerConfig, bim_schedule, build,
    clip_to_linf_ball, edsr_lr_factor, edsr_parameter_count, quantize, restorer_loss, straight_through_quantize,
    train_edsr, trained_reconstruction,
)
from lib.evaluate import accuracy
from lib.profiles import load_profile

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- compression

@pytest.mark.parametrize("levels", [2, 3, 4, 8, 17])
def test_quantize_gives_exactly_k_levels_in_unit_range_and_is_idempotent(levels):
    ramp = torch.linspace(0, 1, 1001).view(1, 1, 7, 143)
    q = quantize(ramp, levels)
    values = torch.unique(q)
    assert len(values) == levels
    assert torch.allclose(values, torch.linspace(0, 1, levels))
    assert torch.equal(quantize(q, levels), q)
    noisy = torch.rand(4, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(quantize(noisy, levels))) <= levels


def test_quantize_special_cases():
    grid = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    assert torch.equal(quantize(grid, 256), grid)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[x == 0.5] = 0.25
    assert torch.equal(quantize(x, 2), (x > 0.5).float())
    assert torch.equal(PixelDepthCompression(4).purify(x), quantize(x, 4))


@pytest.mark.parametrize("levels", [0, 1, 257, 2.5])
def test_quantize_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        quantize(torch.rand(1, 1, 4, 4), levels)


def test_quantize_rejects_images_outside_unit_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantize(torch.full((1, 1, 4, 4), 1.5), 4)


def test_straight_through_quantize_forward_is_q_backward_is_identity():
    x = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    out = straight_through_quantize(x, 4)
    assert torch.equal(out.detach(), quantize(x.detach(), 4))
    w = torch.randn_like(x)
    (out * w).sum().backward()
    assert torch.allclose(x.grad, w)


# --------------------------------------------------------------------------- restorer and loss

@pytest.mark.parametrize("channels", [1, 3])
def test_restorer_keeps_shape_and_has_no_batchnorm(channels):
    net = EDSRRestorer(channels, n_feats=8, n_blocks=2)
    x = torch.rand(2, channels, 12, 12)
    assert net(x).shape == x.shape
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert EDSRRestorer(channels, 8, 1, scale=2)(x).shape == (2, channels, 24, 24)


@pytest.mark.parametrize("channels,feats,blocks,scale", [(1, 64, 16, 1), (3, 8, 2, 1), (1, 8, 1, 2), (3, 4, 3, 4)])
def test_restorer_parameter_count_matches_the_formula(channels, feats, blocks, scale):
    net = EDSRRestorer(channels, feats, blocks, scale=scale)
    assert sum(p.numel() for p in net.parameters()) == edsr_parameter_count(channels, feats, blocks, scale)


def test_default_restorer_has_about_1_22_million_parameters():
    # spec §2.3: C=1, F=64, B=16 -> 33 F->F convolutions x 36,928 plus head and tail ~ 1.22 M
    assert edsr_parameter_count(1, 64, 16) == 33 * 36928 + (9 * 64 + 64) + (9 * 64 + 1)
    assert 1.21e6 < edsr_parameter_count(1, 64, 16) < 1.23e6


def test_restorer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="scale"):
        EDSRRestorer(1, 8, 1, scale=3)
    with pytest.raises(ValueError, match="n_blocks"):
        EDSRRestorer(1, 8, 0)


def test_reconstruction_loss_is_eq_4_on_a_hand_computed_example():
    out = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]).view(2, 1, 2, 2)
    # per image: 0.5 * (1 + 4) = 2.5 and 0.5 * 9 = 4.5; mean 3.5
    assert float(restorer_loss(out, target)) == pytest.approx(3.5)
    assert float(restorer_loss(out, target)) == pytest.approx(0.5 * 4 * F.mse_loss(out, target, reduction="mean"))


def test_lr_schedule_halves_at_half_and_three_quarters():
    assert [edsr_lr_factor(e, 8) for e in range(8)] == [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]


def test_defense_output_keeps_shape_and_range_and_bpda_gives_gradients():
    torch.manual_seed(0)
    defense = ReconstructionDefense(EDSRRestorer(1, 8, 1), levels=4).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        out = defense.purify(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not defense.differentiable
    with torch.no_grad():
        assert torch.equal(defense.bpda_purify(x), out)
    x_var = x.clone().requires_grad_(True)
    defense.purify(x_var).sum().backward()
    assert float(x_var.grad.abs().sum()) == 0.0          # Q_k blocks gradients ...
    x_var.grad = None
    defense.bpda_purify(x_var).sum().backward()
    assert float(x_var.grad.abs().sum()) > 0.0           # ... which is why BPDA replaces it


def test_training_lowers_the_eq_4_loss_on_a_fixed_batch():
    x = load_dataset("digits", "train", n=64).x
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    torch.manual_seed(0)
    net = EDSRRestorer(1, 8, 1)
    cfg = RestorerConfig(levels=4, n_feats=8, n_blocks=1, epochs=30, batch_size=64, lr=3e-3, p_adv=0.0)
    with torch.no_grad():
        before = float(restorer_loss(net(quantize(x, 4)), x))
    history = train_edsr(net, x, x_adv, cfg, device=CPU)
    with torch.no_grad():
        after = float(restorer_loss(net(quantize(x, 4)), x))
    assert len(history) == 30 and history[0]["adv_fraction"] == 0.0
    assert [history[e]["lr"] for e in (14, 15, 22, 23)] == pytest.approx([3e-3, 1.5e-3, 1.5e-3, 0.75e-3])  # EDSR steps
    assert after < 0.5 * before


def test_training_is_deterministic_and_redraws_the_adversarial_half_each_epoch():
    x = load_dataset("digits", "train", n=48).x
    x_adv = 1.0 - x
    cfg = RestorerConfig(levels=4, n_feats=4, n_blocks=1, epochs=3, batch_size=16, lr=1e-3, p_adv=0.5, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = EDSRRestorer(1, 4, 1)
        runs.append((net, train_edsr(net, x, x_adv, cfg, device=CPU)))
    (a, ha), (b, hb) = runs
    assert ha == hb and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert list(ha[0]) == ["epoch", "lr", "loss", "adv_fraction"]
    fractions = [h["adv_fraction"] for h in ha]
    assert all(0.2 < f < 0.8 for f in fractions) and len(set(fractions)) > 1
    with pytest.raises(ValueError, match="shapes differ"):
        train_edsr(EDSRRestorer(1, 4, 1), x, x_adv[:10], cfg, device=CPU)


# --------------------------------------------------------------------------- attack helpers

@pytest.mark.parametrize("eps,steps,alpha", [(0.3, 80, 1 / 255), (0.15, 42, 1 / 255), (0.05, 15, 1 / 255),
                                             (0.1, 29, 1 / 255), (0.005, 10, 0.00125), (0.01, 10, 0.0025)])
def test_bim_schedule_follows_the_spec_rule(eps, steps, alpha):
    got = bim_schedule(eps)
    assert got["steps"] == steps and got["alpha"] == pytest.approx(alpha)
    assert bim_schedule(eps, steps=10) == {"steps": 10, "alpha": pytest.approx(eps / 4)}


def test_clip_to_linf_ball_enforces_the_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 6, 6, generator=g)
    x_adv = torch.rand(4, 1, 6, 6, generator=g)
    clipped = clip_to_linf_ball(x, x_adv, 0.05)
    assert float((clipped - x).abs().max()) <= 0.05 + 1e-7
    assert float(clipped.min()) >= 0 and float(clipped.max()) <= 1
    small = (x + 0.01).clamp(0, 1)
    assert torch.equal(clip_to_linf_ball(x, small, 0.05), small)


# --------------------------------------------------------------------------- end to end on digits

def test_defense_recovers_fgsm_accuracy_on_digits(digits_split, digits_model, digits_batch):
    """The paper's mechanism: R_θ trained on Q_4(FGSM 0.3) pairs restores accuracy under FGSM 0.2."""
    data = load_dataset("digits", "train")
    train = type(data)(digits_split["x_train"], digits_split["y_train"], data.info)
    cfg = RestorerConfig(levels=4, eps_max=0.3, n_feats=16, n_blocks=2, epochs=25, batch_size=64, lr=2e-3)
    defense, meta = trained_reconstruction(digits_model, train, cfg, device=CPU)
    assert not meta["cache_hit"]
    x, y = digits_batch
    x_adv = fgsm(digits_model, x, y, eps=0.2)
    defended = Defended(digits_model, defense).eval()
    clean, clean_def = accuracy(digits_model, x, y), accuracy(defended, x, y)
    adv, adv_def = accuracy(digits_model, x_adv, y), accuracy(defended, x_adv, y)
    assert adv_def - adv >= 15.0, (adv, adv_def)
    assert clean - clean_def <= 8.0, (clean, clean_def)
    # a second call loads the same weights from the cache
    again, meta2 = trained_reconstruction(digits_model, train, cfg, device=CPU)
    assert meta2["cache_hit"]
    assert all(torch.equal(a, b) for a, b in zip(defense.state_dict().values(), again.state_dict().values()))
    # the adaptive (BPDA) pipeline computes the same predictions as the defended model
    assert torch.equal(attack_surface(digits_model, defense)(x).argmax(1), defended(x).argmax(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_stages_are_the_compressed_and_the_restored_image_of_the_input_shape(channels):
    torch.manual_seed(0)
    defense = ReconstructionDefense(EDSRRestorer(channels, 4, 1), levels=4).eval()
    x = torch.rand(2, channels, 8, 8)
    with torch.no_grad():
        stages = defense.stages(x)
        assert list(stages) == ["compressed", "restored"]
        assert all(v.shape == x.shape for v in stages.values())
        assert torch.equal(stages["compressed"], quantize(x, 4))
        assert torch.equal(stages["restored"], defense.purify(x))


def test_build_follows_the_contract_in_the_smoke_profile(digits_model):
    profile = load_profile("smoke", {"notebooks.04_image_reconstruction.train_size": 64,
                                     "notebooks.04_image_reconstruction.restorer.epochs": 1})
    built = build(profile, "digits", digits_model, device=CPU)
    assert isinstance(built, Built) and built.classifier is digits_model
    assert isinstance(built.defense, ReconstructionDefense) and built.defense.levels == 4
    assert built.meta["config"]["dataset"] == "digits" and built.meta["config"]["train_size"] == 64
    assert built.meta["train_seconds"] > 0 and built.meta["cache_key"] and len(built.meta["history"]) == 1
    again = build(profile, "digits", digits_model, device=CPU)
    assert again.meta["cache_hit"] and again.meta["train_seconds"] == built.meta["train_seconds"]
    with pytest.raises(ValueError, match="no reconstruction settings"):
        build(profile, "cifar10", digits_model, device=CPU)
