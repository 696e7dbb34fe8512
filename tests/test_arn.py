"""ARN (paper 004): networks, every loss against its equation, the training algorithm's update rules, the defense
and its factory. The table producers are tested in tests/test_arn_tables.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib.attacks import attack_surface, pgd
from lib.defenses.arn import Purifier, build
from lib.defenses.arn.losses import (
    PRESETS,
    LossWeights,
    attack_discriminator_loss,
    attack_invariance_loss,
    generator_adversarial_loss,
    image_discriminator_loss,
    kl_normal,
    loss_weights,
    restoration_mse,
)
from lib.defenses.arn.networks import (
    ARNAutoencoder,
    AttackDiscriminator,
    ConvGenerator,
    ImageDiscriminator,
)
from lib.defenses.arn.suite import pick_targets
from lib.defenses.arn.tables import error_rate
from lib.defenses.arn.training import (
    VARIANTS,
    PurifierConfig,
    PurifierTrainer,
    build_generator,
    milestone_lr,
    purifier_jobs,
    seen_attacks,
    train_purifier,
    trained_profile_variant,
    trained_purifier,
)
from lib.defenses.base import Built
from lib.profiles import load_profile, notebook_config
from lib.train import trained_classifier

CPU = torch.device("cpu")
TINY = dict(widths=(8, 16, 32), latent=16, da_hidden=(16,), di_widths=(8, 16, 16), di_hidden=16,
            gen_widths=(8, 16), batch_size=32)


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- losses

def test_kl_is_zero_for_standard_normal_and_positive_otherwise():
    zeros = torch.zeros(4, 6)
    assert float(kl_normal(zeros, zeros)) == 0.0
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # hand-computed: -1/2 [(1 + 0 - 1 - 1) + (1 + ln 2 - 0 - 2)] = 1 - ln(2) / 2
    assert float(kl_normal(mu, logvar)) == pytest.approx(1 - math.log(2) / 2, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    per = kl_normal(mu, logvar, "none")
    assert per.shape == (5,) and (per > 0).all()
    assert float(kl_normal(mu, logvar, "sum")) == pytest.approx(float(per.sum()), rel=1e-6)
    assert float(kl_normal(mu, logvar, "batchmean")) == pytest.approx(float(per.mean()), rel=1e-6)
    with pytest.raises(ValueError):
        kl_normal(mu, logvar, "mean")


def test_attack_invariance_loss_is_minimal_at_uniform_output():
    k = 3
    uniform = torch.zeros(10, k)
    assert float(attack_invariance_loss(uniform)) == pytest.approx(math.log(k), rel=1e-6)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert float(attack_invariance_loss(torch.randn(10, k, generator=g) * 3)) > math.log(k)
    # hand-computed: logits (0, ln 2, 0) -> softmax (1/4, 1/2, 1/4) -> -(ln 1/4 + ln 1/2 + ln 1/4) / 3
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]])
    assert float(attack_invariance_loss(logits)) == pytest.approx(-(2 * math.log(0.25) + math.log(0.5)) / 3, rel=1e-6)
    # the code's variant: BCE-with-logits against 1/K, minimal where sigmoid = 1/K
    at_target = torch.full((4, k), math.log((1 / k) / (1 - 1 / k)))
    assert float(attack_invariance_loss(at_target, "bce")) < float(attack_invariance_loss(torch.zeros(4, k), "bce"))


def test_discriminator_and_reconstruction_losses_match_their_equations():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    domains = torch.tensor([0, 2])
    expected = -(F.log_softmax(logits, 1)[0, 0] + F.log_softmax(logits, 1)[1, 2]) / 2
    assert float(attack_discriminator_loss(logits, domains)) == pytest.approx(float(expected), rel=1e-6)
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([-1.0])
    sig = torch.sigmoid
    expected_di = -torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean()
    assert float(image_discriminator_loss(real, fake)) == pytest.approx(float(expected_di), rel=1e-6)
    assert float(generator_adversarial_loss(fake)) == pytest.approx(float(-torch.log(sig(fake)).mean()), rel=1e-6)
    out, tgt = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert float(restoration_mse(out, tgt, "mean")) == 1.0
    assert float(restoration_mse(out, tgt, "sample_sum")) == 4.0


def test_presets_and_config_validation():
    assert PRESETS["paper_mnist"].w_att == 0.1 and PRESETS["paper_cifar"].w_adv == 100.0
    assert loss_weights("tiny", w_att=0.0).w_att == 0.0
    cfg = PurifierConfig.from_mapping({"preset": "tiny", "weights": {"w_nor": 0}, "widths": [8, 16, 32]})
    assert cfg.weights.w_nor == 0 and cfg.widths == (8, 16, 32)
    with pytest.raises(ValueError):
        loss_weights("nonexistent")
    with pytest.raises(ValueError):
        LossWeights(w_mse=-1.0)
    with pytest.raises(ValueError):
        PurifierConfig(kind="ape", weights=PRESETS["tiny"])  # no latent code for L_att / L_nor
    with pytest.raises(ValueError):
        PurifierConfig.from_mapping({"preset": "tiny", "epoch": 3})


# --------------------------------------------------------------------------- networks

@pytest.mark.parametrize("size,widths", [(8, (8, 16, 32)), (28, (4, 8, 8, 16)), (32, (4, 8, 8, 16))])
def test_networks_shapes(size, widths):
    ae = ARNAutoencoder(3, size, widths, latent=12)
    x = torch.rand(2, 3, size, size)
    out = ae(x)
    assert out.out.shape == x.shape and out.mu.shape == (2, 12) and out.logvar.shape == (2, 12)
    assert AttackDiscriminator(12, 3, (8,))(out.z).shape == (2, 3)
    assert ImageDiscriminator(3, size, widths, 8)(out.out).shape == (2,)
    with pytest.raises(ValueError):
        ARNAutoencoder(3, 16, widths)


def test_purifier_output_in_unit_range_with_input_shape_and_deterministic():
    x = torch.rand(5, 1, 8, 8)
    for gen in (ARNAutoencoder(1, 8, (8, 16, 32), 16), ConvGenerator(1, (8, 16)), ConvGenerator(1, (8, 16), True)):
        defense = Purifier(gen).eval()
        out = defense.purify(x).detach()
        assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, defense.purify(x)), "evaluation uses z = mu: no sampling"
    with pytest.raises(ValueError):
        Purifier(ARNAutoencoder(1, 8, (8, 16, 32), 16)).purify(torch.rand(1, 8, 8))


# --------------------------------------------------------------------------- training rules

def _trainer(weights: LossWeights, seed: int = 0) -> tuple[PurifierTrainer, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    cfg = PurifierConfig(weights=weights, **TINY)
    gen = build_generator(cfg, 1, 8)
    trainer = PurifierTrainer(gen, cfg, 1, 8, n_domains=3)
    x = torch.rand(6, 1, 8, 8)
    inp = torch.cat([x, (x + 0.2).clamp(0, 1), (x - 0.2).clamp(0, 1)])
    return trainer, (inp, x.repeat(3, 1, 1, 1), torch.arange(3).repeat_interleave(6))


def test_each_optimiser_updates_only_its_own_network():
    trainer, batch = _trainer(PRESETS["tiny"])
    assert set(trainer.modules) == set(trainer.optimizers) == {"generator", "d_a", "d_i"}
    for k, net in trainer.modules.items():
        ids = {id(p) for g in trainer.optimizers[k].param_groups for p in g["params"]}
        assert ids == {id(p) for p in net.parameters()}
    for active in trainer.modules:  # freeze every optimiser but one: only its network moves
        trainer, batch = _trainer(PRESETS["tiny"])
        owned = trainer.modules
        for k, opt in trainer.optimizers.items():
            if k != active:
                for group in opt.param_groups:
                    group["lr"] = 0.0
        before = {k: _params(n) for k, n in owned.items()}
        logs = trainer.step(*batch)
        assert all(math.isfinite(v) for v in logs.values())
        for k, net in owned.items():
            assert _same(before[k], _params(net)) == (k != active), (active, k)


def test_adversarial_loss_reaches_the_decoder_only():
    trainer, batch = _trainer(LossWeights(w_mse=0.0, w_att=0.0, w_nor=0.0, w_adv=1.0))
    enc = _params(trainer.gen.encoder) + _params(trainer.gen.mu) + _params(trainer.gen.logvar)
    dec = _params(trainer.gen.decoder)
    trainer.step(*batch)
    assert _same(enc, _params(trainer.gen.encoder) + _params(trainer.gen.mu) + _params(trainer.gen.logvar))
    assert not _same(dec, _params(trainer.gen.decoder))
    # L_att reaches the encoder only
    trainer, batch = _trainer(LossWeights(w_mse=0.0, w_att=1.0, w_nor=0.0, w_adv=0.0))
    enc, dec = _params(trainer.gen.encoder), _params(trainer.gen.decoder)
    trainer.step(*batch)
    assert not _same(enc, _params(trainer.gen.encoder)) and _same(dec, _params(trainer.gen.decoder))


def test_training_reduces_reconstruction_loss_and_is_deterministic(digits_split):
    x = digits_split["x_train"][:256]
    advs = [(x + 0.2 * torch.sign(torch.randn_like(x))).clamp(0, 1) for _ in range(2)]
    cfg = PurifierConfig(weights=PRESETS["tiny"], epochs=4, lr=1e-3, **TINY)
    torch.manual_seed(0)
    gen_a = build_generator(cfg, 1, 8)
    hist = train_purifier(gen_a, x, advs, cfg, device=CPU)
    assert hist[-1]["L_mse"] < hist[0]["L_mse"]
    assert all(math.isfinite(v) for h in hist for v in h.values())
    torch.manual_seed(0)
    gen_b = build_generator(cfg, 1, 8)
    train_purifier(gen_b, x, advs, cfg, device=CPU)
    assert _same(_params(gen_a), _params(gen_b))
    with pytest.raises(ValueError):
        train_purifier(gen_b, x, [advs[0][:10]], cfg, device=CPU)


def test_training_ignores_the_global_rng_and_follows_the_milestones(digits_split):
    x = digits_split["x_train"][:64]
    advs = [(x + 0.2).clamp(0, 1)]
    cfg = PurifierConfig(weights=PRESETS["tiny"], epochs=2, milestones=(1,), **TINY)
    trained = []
    for global_seed in (0, 123):  # fit reseeds the global RNGs per epoch; the latent noise has its own stream
        torch.manual_seed(0)
        gen = build_generator(cfg, 1, 8)
        hist = train_purifier(gen, x, advs, cfg, device=CPU)
        torch.manual_seed(global_seed)
        trained.append(_params(gen))
    assert _same(*trained)
    assert [h["lr"] for h in hist] == pytest.approx([cfg.lr, cfg.lr * 0.1])
    assert [milestone_lr((2, 4), 0.5)(e, 6) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


# --------------------------------------------------------------------------- helpers and the defense end to end

def test_pick_targets_and_error_rate(digits_model, digits_batch):
    y = torch.arange(10).repeat(5)
    t = pick_targets(y, 10, seed=0)
    assert (t != y).all() and t.min() >= 0 and t.max() <= 9 and torch.equal(t, pick_targets(y, 10, seed=0))
    assert torch.equal(pick_targets(torch.tensor([3, 0]), 10, mode="fixed3"), torch.tensor([1, 3]))
    x, y = digits_batch
    pred = digits_model(x).argmax(1)
    assert error_rate(digits_model, x, y) == pytest.approx(100.0 * float((pred != y).float().mean()))


def test_forced_bpda_surface_backward_is_identity(digits_model, digits_batch):
    x = digits_batch[0][:4]
    defense = Purifier(ARNAutoencoder(1, 8, (8, 16, 32), 16)).eval()
    xv = x.clone().requires_grad_(True)
    attack_surface(digits_model, defense, force_bpda=True)(xv).sum().backward()
    purified = defense.purify(x).detach().requires_grad_(True)
    digits_model(purified).sum().backward()
    assert torch.allclose(xv.grad, purified.grad)


def test_arn_lowers_error_under_seen_pgd_on_digits(digits_split, digits_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    x_tr, y_tr = digits_split["x_train"][:800], digits_split["y_train"][:800]
    x_te, y_te = digits_split["x_test"][:200], digits_split["y_test"][:200]
    attack = dict(eps=0.3, alpha=0.05, steps=10)
    advs = [pgd(digits_model, x_tr, y_tr, **attack),
            pgd(digits_model, x_tr, pick_targets(y_tr, 10), targeted=True, **attack)]
    cfg = PurifierConfig(weights=PRESETS["tiny"], epochs=8, widths=(16, 32, 64), latent=32, da_hidden=(32,),
                         di_widths=(8, 16, 32), di_hidden=32, batch_size=64)
    arn, meta = trained_purifier(cfg, x_tr, advs, device=CPU)
    assert not meta["cache_hit"] and meta["final_mse"] < meta["first_mse"]
    x_adv = pgd(digits_model, x_te, y_te, **attack)
    undefended = error_rate(digits_model, x_adv, y_te)
    defended = error_rate(lambda t: digits_model(arn.purify(t)), x_adv, y_te)
    assert undefended > 80 and defended < undefended - 40, (undefended, defended)
    again, meta2 = trained_purifier(cfg, x_tr, advs, device=CPU)
    assert meta2["cache_hit"] and torch.equal(again.purify(x_te[:5]), arn.purify(x_te[:5]))


def test_build_gives_the_profiles_cached_arn_in_front_of_the_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    profile = load_profile("smoke")
    classifier = trained_classifier(profile, "digits", device=CPU)[0]
    built = build(profile, "digits", classifier, device=CPU)
    assert isinstance(built, Built) and isinstance(built.defense, Purifier) and built.classifier is classifier
    meta = built.meta
    assert not meta["cache_hit"] and meta["train_seconds"] > 0 and meta["cache_key"]
    assert meta["config"]["variant"] == "ARN_PP" and meta["config"]["seen"] == ["PGD_N", "PGD_T"]
    x = torch.rand(7, 1, 8, 8)
    out = built.defense.purify(x).detach()
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(built.defense.stages(x)["restored"], out)
    again = build(profile, "digits", classifier, device=CPU)
    assert again.meta["cache_hit"] and again.meta["cache_key"] == meta["cache_key"]
    assert again.meta["train_seconds"] == meta["train_seconds"] and torch.equal(again.defense.purify(x), out)
    with pytest.raises(ValueError):
        trained_profile_variant(profile, "digits", classifier, variant="ARN_XX", device=CPU)
    with pytest.raises(ValueError):
        build(profile, "cifar10", classifier, device=CPU)


def test_purifier_jobs_follow_the_profile_switches():
    cfg = notebook_config(load_profile("smoke"), "05_attack_invariant_arn")
    off = {**cfg, "seeds": [3, 4], "ablations": False, "arn_dp": False, "table2b": False}
    assert purifier_jobs(off) == [("ARN_PP", 3), ("Pixel-MSE_PP", 3), ("ARN_PP", 4), ("Pixel-MSE_PP", 4),
                                  ("APE-G_PP", 3), ("HGD_PP", 3)]
    assert seen_attacks(off) == ["PGD_N", "PGD_T"]
    on = {**off, "ablations": True, "arn_dp": True, "table2b": True}
    assert all(name in VARIANTS for name, _ in purifier_jobs(on))
    assert seen_attacks(on) == ["DDN_N", "PGD_N", "PGD_T", "STA_N"]
