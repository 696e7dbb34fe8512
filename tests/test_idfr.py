"""IDFR (spec-001): denoiser and restorer architectures, the convex-hull sampler, both training objectives and
trainings, the cached pipeline and the defense contract. The tables are tested in tests/test_idfr_tables.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from lib.attacks import fgsm
from lib.defenses import idfr
from lib.evaluate import AttackSpec, accuracy
from lib.profiles import load_profile
from lib.train import frozen


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ architectures

def test_denoiser_matches_table6_and_keeps_shape_and_range():
    assert _params(idfr.InputDenoiser(3)) == 669_033  # spec §2.3, Table 6 at full width
    torch.manual_seed(0)
    for channels, width, size in [(3, 1.0, 32), (1, 0.25, 16), (1, 0.25, 28), (1, 0.5, 8)]:
        x = torch.rand(2, channels, size, size)
        out = idfr.InputDenoiser(channels, width=width).eval()(x)
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1


def test_denoiser_keeps_any_image_size():
    # issue 16: the U-Net denoiser takes any side (28x28 MNIST, odd sizes), output shape equal to the input's
    generator = torch.Generator().manual_seed(0)
    for size in [(28, 28), (17, 23)]:
        x = torch.rand(2, 3, *size, generator=generator)
        assert idfr.InputDenoiser(3, width=0.25).eval()(x).shape == x.shape


def test_denoiser_flags():
    x = torch.rand(3, 1, 16, 16)
    raw = idfr.InputDenoiser(1, width=0.25, clamp01=False).eval()
    assert (raw(x) >= x - 1e-6).all()  # Table 6's final BN+ReLU: residual r >= 0, the ID only adds intensity
    linear = idfr.InputDenoiser(1, width=0.25, out_act="linear", residual=False, skip8="layer1", clamp01=False).eval()
    assert linear(x).shape == x.shape and (linear(x) < 0).any()
    with pytest.raises(ValueError, match="skip8"):
        idfr.InputDenoiser(1, skip8="layer3")
    with pytest.raises(ValueError, match="out_act"):
        idfr.InputDenoiser(1, out_act="tanh")


def test_restorer_matches_table7():
    fr = idfr.FeatureRestorer(512)
    assert _params(fr) == 337_184  # spec §2.5
    assert [layer.out_features for layer in fr.layers] == [256, 128, 32, 128, 256, 512]
    assert idfr.restorer_dims(64) == (32, 16, 16) and idfr.restorer_dims(2048) == (1024, 512, 128)
    h = torch.randn(4, 512)
    assert fr(h).shape == (4, 512) and (fr(h) >= 0).all()
    skipped = idfr.FeatureRestorer(64, skips=True)
    assert skipped(torch.randn(5, 64)).shape == (5, 64)
    with pytest.raises(ValueError, match="shape"):
        fr(torch.randn(4, 100))


def test_pipeline_composes_id_encoder_fr_head(digits_model):
    torch.manual_seed(0)
    den, res = idfr.InputDenoiser(1, width=0.25).eval(), idfr.FeatureRestorer(digits_model.feat_dim).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(idfr.IDFRClassifier(digits_model)(x), digits_model(x))
        full = idfr.IDFRClassifier(digits_model, den, res)(x)
        assert torch.allclose(full, digits_model.head(res(digits_model.features(den(x)))))
        assert torch.allclose(idfr.InputDenoising(den).purify(x), den(x))
    with pytest.raises(ValueError, match="features"):
        idfr.IDFRClassifier(torch.nn.Linear(3, 3))


# ------------------------------------------------------------------ convex-hull sampler

def _pool(seed: int = 0, empty_p2_class: int | None = None) -> idfr.FeaturePool:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(20)
    h = torch.randn(60, 5, generator=g) + 4 * y[:, None].float()
    correct = torch.rand(60, generator=g) > 0.3
    if empty_p2_class is not None:
        correct[y == empty_p2_class] = True
    return idfr.FeaturePool(h, y, correct)


def _in_hull(point: np.ndarray, vertices: np.ndarray, tol: float = 1e-5) -> bool:
    """LP feasibility: |sum_k w_k v_k - point| <= tol (float32 rounding) with w >= 0, sum w = 1."""
    n = len(vertices)
    a_ub = np.vstack([vertices.T, -vertices.T])
    b_ub = np.concatenate([point + tol, -point + tol])
    res = linprog(np.zeros(n), A_ub=a_ub, b_ub=b_ub, A_eq=np.ones((1, n)), b_eq=[1.0], bounds=[(0, None)] * n,
                  method="highs")
    return res.status == 0


def test_paper_sampler_mixes_p1_with_p2_of_the_same_class_inside_its_hull():
    pool = _pool()
    batch = idfr.ConvexHullSampler(pool, "paper").sample(40, torch.Generator().manual_seed(1))
    i, j, y = batch["i"], batch["j"], batch["y"]
    assert (pool.y[i] == y).all() and (pool.y[j] == y).all()
    assert pool.correct[i].all() and (~pool.correct[j]).all()
    assert ((batch["alpha"] >= 0) & (batch["alpha"] <= 1)).all()
    a = batch["alpha"][:, None]
    assert torch.allclose(batch["h"], a * pool.h[i] + (1 - a) * pool.h[j])
    for k in range(len(y)):
        same = pool.h[pool.y == y[k]].double().numpy()
        assert _in_hull(batch["h"][k].double().numpy(), same)
    other = pool.h[pool.y == (y[0] + 1) % 3].double().numpy()
    assert not _in_hull(batch["h"][0].double().numpy(), other)  # the check can fail: class means are 4 sigma apart


def test_sampler_falls_back_to_p1_and_code_pairing():
    pool = _pool(empty_p2_class=1)
    sampler = idfr.ConvexHullSampler(pool, "paper")
    assert sampler.fallback_classes == [1]
    batch = sampler.sample(200, torch.Generator().manual_seed(2))
    ones = batch["y"] == 1
    assert ones.any() and pool.correct[batch["j"][ones]].all()
    code = idfr.ConvexHullSampler(pool, "code").sample(200, torch.Generator().manual_seed(3))
    assert (pool.y[code["i"]] == code["y"]).all() and (pool.y[code["j"]] == code["y"]).all()
    assert set(torch.round(code["alpha"] * 10).long().tolist()) <= set(range(1, 11))
    with pytest.raises(ValueError, match="pairing"):
        idfr.ConvexHullSampler(pool, "random")
    none_correct = idfr.FeaturePool(pool.h, pool.y, torch.zeros_like(pool.correct))
    with pytest.raises(ValueError, match="correctly classified"):
        idfr.ConvexHullSampler(none_correct, "paper")


# ------------------------------------------------------------------ training objectives

@pytest.mark.parametrize("kind", idfr.ID_LOSSES)
def test_each_id_objective_decreases_on_a_fixed_batch(kind, digits_model, digits_split):
    x, y = digits_split["x_train"][:64], digits_split["y_train"][:64]
    x_adv = fgsm(digits_model, x, y, eps=0.2)
    torch.manual_seed(0)
    den = idfr.InputDenoiser(1, width=0.25).train()
    opt = torch.optim.Adam(den.parameters(), lr=0.01)
    losses = []
    with frozen(digits_model):
        for _ in range(15):
            opt.zero_grad()
            loss = idfr.id_loss(den, digits_model, x_adv, x, y, kind)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_id_losses_equal_their_equations(digits_model, digits_split):
    x, y = digits_split["x_train"][:8], digits_split["y_train"][:8]
    z = (x + 0.1).clamp(0, 1)
    den = idfr.InputDenoiser(1, width=0.25).eval()
    with torch.no_grad():
        out = den(z)
        assert torch.isclose(idfr.id_loss(den, digits_model, z, x, y, "ce"),
                             torch.nn.functional.cross_entropy(digits_model(out), y))
        assert torch.isclose(idfr.id_loss(den, digits_model, z, x, y, "pixel_l1"), (out - x).abs().mean())
        feat = (digits_model.features(out) - digits_model.features(x)).abs().mean()
        assert torch.isclose(idfr.id_loss(den, digits_model, z, x, y, "feature_l1"), feat)
    with pytest.raises(ValueError, match="unknown ID loss"):
        idfr.id_loss(den, digits_model, z, x, y, "mse")


def test_fr_objective_decreases_and_training_leaves_the_target_frozen(digits_model, digits_split):
    x, y = digits_split["x_train"][:200], digits_split["y_train"][:200]
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    flags = [p.requires_grad for p in digits_model.parameters()]
    den = idfr.InputDenoiser(1, width=0.25)
    hist = idfr.train_denoiser(den, digits_model, fgsm(digits_model, x, y, eps=0.2), x, y,
                               idfr.IDConfig(epochs=1, batch_size=64), device=torch.device("cpu"))
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    pool = idfr.feature_pool(digits_model, den, [fgsm(digits_model, x, y, eps=0.3), x], y, device=torch.device("cpu"))
    assert pool.h.shape == (400, digits_model.feat_dim) and len(pool.correct) == 400
    sampler = idfr.ConvexHullSampler(pool, "paper")
    batch = sampler.sample(96, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    fr = idfr.FeatureRestorer(digits_model.feat_dim)
    opt = torch.optim.Adam(fr.parameters(), lr=0.01)
    losses = []
    with frozen(digits_model):
        for _ in range(30):
            opt.zero_grad()
            loss = idfr.fr_loss(fr, digits_model, batch["h"], batch["y"])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    hist = idfr.train_feature_restorer(fr, digits_model, sampler, idfr.FRConfig(epochs=2, steps_per_epoch=5),
                               device=torch.device("cpu"))
    assert len(hist) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())
    assert [p.requires_grad for p in digits_model.parameters()] == flags


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="loss"):
        idfr.IDConfig(loss="l2")
    with pytest.raises(ValueError, match="noise_copies"):
        idfr.IDConfig(noise_copies=-1)
    with pytest.raises(ValueError, match="pairing"):
        idfr.FRConfig(pairing="any")
    with pytest.raises(ValueError, match="epsilon"):
        idfr.attack_grid([{"name": "fgsm"}], [])


# ------------------------------------------------------------------ the defense works on real data

def _setting(x: torch.Tensor, y: torch.Tensor, specs) -> idfr.IDFRSetting:
    return idfr.IDFRSetting(x, y, specs, idfr.IDConfig(epochs=3, batch_size=64, noise_copies=1),
                            idfr.FRConfig(epochs=2, steps_per_epoch=50), {"width": 0.5})


def test_idfr_raises_accuracy_under_the_oblivious_attack_on_digits(digits_model, digits_split, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    x, y = digits_split["x_train"][:600], digits_split["y_train"][:600]
    specs = idfr.attack_grid([{"name": "fgsm", "label": "FGSM"},
                              {"name": "bim", "label": "BIM", "params": {"alpha": 0.05, "steps": 5}}], [0.2, 0.3])
    adv, choice = idfr.mixture_adversarial(digits_model, x, y, specs, seed=0)
    assert set(choice.tolist()) == {0, 1, 2, 3}
    assert ((adv - x).abs().flatten(1).amax(1) <= torch.tensor([s.eps for s in specs])[choice] + 1e-6).all()
    fit = idfr.trained_idfr(digits_model, _setting(x, y, specs), device=cpu)
    assert not fit.meta["id_cache_hit"] and 0 <= fit.meta["p2_fraction"] <= 1
    assert [h["epoch"] for h in fit.meta["id_history"]] == [1, 2, 3] and len(fit.meta["fr_history"]) == 2
    again = idfr.trained_idfr(digits_model, _setting(x, y, specs), device=cpu)
    assert again.meta["id_cache_hit"] and again.meta["fr_cache_hit"]
    assert again.meta["fr_history"] == fit.meta["fr_history"]
    xt, yt = digits_split["x_test"][:200], digits_split["y_test"][:200]
    x_adv = fgsm(digits_model, xt, yt, eps=0.2)
    pipes = fit.pipelines(digits_model)
    undefended, defended = accuracy(pipes["No Defense"], x_adv, yt), accuracy(pipes["ID"], x_adv, yt)
    assert defended > undefended + 20, (undefended, defended)
    assert accuracy(pipes["ID"], xt, yt) > 85  # clean accuracy survives the denoiser

    rows = idfr.tables.evaluate_models(digits_model, {"ID": pipes["ID"]}, {}, xt[:50], yt[:50],
                                       [AttackSpec("fgsm", {"eps": 0.2}, "FGSM")], threats=("gray", "white"), device=cpu)
    assert list(rows["threat"]) == ["white-box (oblivious)", "adaptive (ours)"]
    assert rows["robust_acc"].iloc[1] <= rows["robust_acc"].iloc[0] + 10


def test_trainings_are_deterministic_and_a_baseline_loss_is_its_own_model(digits_model, digits_split, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    x, y = digits_split["x_train"][:128], digits_split["y_train"][:128]
    setting = idfr.IDFRSetting(x, y, idfr.attack_grid([{"name": "fgsm"}], [0.2]),
                               idfr.IDConfig(epochs=2, batch_size=64, noise_copies=1), idfr.FRConfig(epochs=1, steps_per_epoch=5),
                               {"width": 0.25})
    den, x_adv, meta = idfr.trained_denoiser(digits_model, setting, device=cpu)
    torch.manual_seed(0)
    first = idfr.InputDenoiser(1, width=0.25)
    torch.manual_seed(0)
    second = idfr.InputDenoiser(1, width=0.25)
    h1 = idfr.train_denoiser(first, digits_model, x_adv, x, y, setting.id_cfg, cpu)
    h2 = idfr.train_denoiser(second, digits_model, x_adv, x, y, setting.id_cfg, cpu)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    pixel, _, pixel_meta = idfr.trained_denoiser(digits_model, setting, loss="pixel_l1", device=cpu)
    assert pixel_meta["cache_key"] != meta["cache_key"] and not pixel_meta["cache_hit"]
    with pytest.raises(ValueError, match="fr_pool"):
        idfr.IDFRSetting(x, y, setting.specs, setting.id_cfg, setting.fr_cfg, {}, fr_pool="heldout")


def test_factories_follow_the_defense_contract(digits_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    profile = load_profile("smoke")
    built = idfr.build(profile, "digits", digits_model, device=cpu)
    assert isinstance(built.defense, idfr.InputDenoising) and built.defense.differentiable
    assert isinstance(built.classifier, idfr.IDFRClassifier) and built.classifier.denoiser is None
    assert built.classifier.restorer is not None and built.classifier.classifier is digits_model
    assert built.meta["train_seconds"] > 0 and built.meta["cache_key"] and built.meta["config"]["fr_pool"] == "all_configs"
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        full = idfr.IDFRClassifier(digits_model, built.defense.denoiser, built.classifier.restorer)(x)
        assert torch.allclose(built.model()(x), full)
        stages = built.defense.stages(x)
    assert list(stages) == ["residual"] and stages["residual"].shape == x.shape
    assert stages["residual"].min() >= 0 and stages["residual"].max() <= 1
    alone = idfr.build_denoiser(profile, "digits", digits_model, device=cpu)
    assert alone.classifier is digits_model
    assert all(torch.equal(a, b) for a, b in zip(alone.defense.state_dict().values(), built.defense.state_dict().values()))
    with pytest.raises(ValueError, match="no IDFR budgets"):
        idfr.build(profile, "fashion_mnist", digits_model, device=cpu)
