"""Minimum-norm and spatial attacks (CW-L2, DeepFool, DDN, stAdv) against independent implementations.

Oracles (test-only): foolbox (CW-L2, DeepFool, DDN) and ART (CW-L2). ART's CarliniL2Method has an
aliasing bug in its binary search (`c_old = c_current` without a copy) that freezes c after the first
failure following a success, so it stops improving with more steps; the comparison with it therefore
uses modest step counts, and foolbox's faithful port of the authors' code is the tighter check.
"""
from __future__ import annotations

import pytest
import torch

from lib.attacks.cw import cw_l2, cw_l2_details, cw_l2_fixed_c
from lib.attacks.ddn import ddn
from lib.attacks.deepfool import deepfool
from lib.attacks.spatial import flow_smoothness, flow_warp, stadv, stadv_details

fb = pytest.importorskip("foolbox")


def _fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def _l2(x_adv, x):
    return (x_adv - x).flatten(1).norm(dim=1)


def _median_norm(model, x_adv, x, y):
    """(success rate, median L2 over the fooled samples)."""
    ok = _fooled(model, x_adv, y)
    return ok.float().mean().item(), _l2(x_adv, x)[ok].median().item()


ATTACKS = {
    "cw": lambda m, x, y: cw_l2(m, x, y, steps=30, lr=0.1, binary_steps=3),
    "deepfool": lambda m, x, y: deepfool(m, x, y),
    "ddn": lambda m, x, y: ddn(m, x, y, steps=50),
    "stadv": lambda m, x, y: stadv(m, x, y, steps=50),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_contract_and_success(name, digits_model, digits_batch):
    torch.manual_seed(0)
    x, y = digits_batch[0][:60], digits_batch[1][:60]
    x_before = x.clone()
    x_adv = ATTACKS[name](digits_model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x, x_before)
    assert not digits_model.training
    assert _fooled(digits_model, x_adv, y).float().mean() >= 0.95  # the undefended model is fooled on almost all


@pytest.mark.parametrize("call", [
    lambda m, x, y: cw_l2(m, x, y, c=-1.0),
    lambda m, x, y: cw_l2(m, x, y, steps=0),
    lambda m, x, y: cw_l2(m, x, y, binary_steps=0),
    lambda m, x, y: deepfool(m, x, y, overshoot=-0.1),
    lambda m, x, y: deepfool(m, x, y, num_candidates=1),
    lambda m, x, y: ddn(m, x, y, gamma=-0.05),
    lambda m, x, y: ddn(m, x, y, levels=1),
    lambda m, x, y: stadv(m, x, y, tau=-1.0),
    lambda m, x, y: stadv(m, x, y, fail_mode="nan"),
])
def test_bad_parameters_raise(call, digits_model, digits_batch):
    with pytest.raises(ValueError):
        call(digits_model, digits_batch[0][:4], digits_batch[1][:4])


@pytest.mark.parametrize("attack", [cw_l2, deepfool, ddn, stadv])
@pytest.mark.parametrize("bad", ["range", "nan", "rank"])
def test_bad_inputs_raise(attack, bad, digits_model, digits_batch):
    x, y = digits_batch[0][:4].clone(), digits_batch[1][:4]
    if bad == "range":
        x[0, 0, 0, 0] = 1.5
    elif bad == "nan":
        x[0, 0, 0, 0] = float("nan")
    else:
        x = x[:, 0]
    with pytest.raises(ValueError):
        attack(digits_model, x, y)


def test_cw_matches_foolbox_and_art(digits_model, digits_batch):
    """Median L2 over successes within 10% of both peers with identical c, kappa, lr, steps, binary steps."""
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    x, y = digits_batch[0][:40], digits_batch[1][:40]
    params = dict(c=0.1, steps=20, lr=0.1, binary_steps=5)
    res = cw_l2_details(digits_model, x, y, **params)
    ours_rate, ours_med = _median_norm(digits_model, res.x_adv, x, y)
    assert torch.equal(res.success, _fooled(digits_model, res.x_adv, y))
    assert torch.allclose(res.l2[res.success], _l2(res.x_adv, x)[res.success], atol=1e-5)

    _, fb_adv, fb_ok = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=5, steps=20, stepsize=0.1, confidence=0.0, initial_const=0.1, abort_early=True,
    )(fb.PyTorchModel(digits_model, bounds=(0, 1)), x, y, epsilons=None)
    fb_med = _l2(fb_adv, x)[fb_ok].median().item()

    clf = PyTorchClassifier(model=digits_model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                            nb_classes=10, clip_values=(0.0, 1.0))
    art_adv = CarliniL2Method(clf, confidence=0.0, learning_rate=0.1, binary_search_steps=5, max_iter=20,
                              initial_const=0.1, batch_size=len(x), verbose=False).generate(x.numpy(), y.numpy())
    art_rate, art_med = _median_norm(digits_model, torch.from_numpy(art_adv), x, y)

    assert ours_rate >= max(fb_ok.float().mean().item(), art_rate) - 0.05
    assert abs(ours_med - fb_med) <= 0.10 * fb_med, (ours_med, fb_med)
    assert abs(ours_med - art_med) <= 0.10 * art_med, (ours_med, art_med)


def test_cw_follows_reference_per_sample(digits_model, digits_batch):
    """Without abort-early (the only intended difference), each sample's result matches foolbox's port."""
    x, y = digits_batch[0][:40], digits_batch[1][:40]
    res = cw_l2_details(digits_model, x, y, c=0.1, steps=20, lr=0.1, binary_steps=5, abort_early=False)
    _, peer, peer_ok = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=5, steps=20, stepsize=0.1, confidence=0.0, initial_const=0.1, abort_early=False,
    )(fb.PyTorchModel(digits_model, bounds=(0, 1)), x, y, epsilons=None)
    assert torch.equal(res.success, peer_ok)
    peer_l2 = _l2(peer, x)[peer_ok]
    assert torch.allclose(res.l2[peer_ok], peer_l2, rtol=1e-2, atol=1e-4)


def test_cw_returns_x_where_it_fails(digits_model, digits_batch):
    x, y = digits_batch[0][:20], digits_batch[1][:20]
    res = cw_l2_details(digits_model, x, y, c=1e-3, steps=3, lr=0.01, binary_steps=1)
    assert (~res.success).any()
    assert torch.equal(res.x_adv[~res.success], x[~res.success])
    assert torch.isinf(res.l2[~res.success]).all()


def test_deepfool_matches_foolbox(digits_model, digits_batch):
    x, y = digits_batch
    x = x[:100]
    y = y[:100]
    ours = deepfool(digits_model, x, y, steps=50, overshoot=0.02, num_candidates=10)
    _, peer, _ = fb.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02)(
        fb.PyTorchModel(digits_model, bounds=(0, 1)), x, y, epsilons=None)
    ours_rate, ours_med = _median_norm(digits_model, ours, x, y)
    peer_rate, peer_med = _median_norm(digits_model, peer, x, y)
    assert abs(ours_rate - peer_rate) <= 0.02
    assert abs(ours_med - peer_med) <= 0.02 * peer_med, (ours_med, peer_med)
    same = (ours - peer).flatten(1).abs().amax(1) <= 1e-4  # same algorithm: nearly every sample identical
    assert same.float().mean() >= 0.95


def test_deepfool_batched_equals_per_image(digits_model, digits_batch):
    x, y = digits_batch[0][:5], digits_batch[1][:5]
    batched = deepfool(digits_model, x, y)
    single = torch.cat([deepfool(digits_model, x[i:i + 1], y[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, single, atol=1e-4)
    assert not torch.equal(batched, x)


def test_deepfool_leaves_misclassified_samples_alone(digits_model, digits_batch):
    x, y = digits_batch[0][:10], digits_batch[1][:10]
    with torch.no_grad():
        wrong = (digits_model(x).argmax(1) + 1) % 10
    assert torch.equal(deepfool(digits_model, x, wrong), x)


def test_ddn_matches_foolbox(digits_model, digits_batch):
    """foolbox has no quantisation, so the parity run switches it off; then the quantised run is checked."""
    x, y = digits_batch[0][:100], digits_batch[1][:100]
    ours = ddn(digits_model, x, y, steps=100, gamma=0.05, init_norm=1.0, quantize=False)
    _, peer, peer_ok = fb.attacks.DDNAttack(init_epsilon=1.0, steps=100, gamma=0.05)(
        fb.PyTorchModel(digits_model, bounds=(0, 1)), x, y, epsilons=None)
    ours_rate, ours_med = _median_norm(digits_model, ours, x, y)
    peer_med = _l2(peer, x)[peer_ok].median().item()
    assert ours_rate >= peer_ok.float().mean().item() - 0.02
    assert abs(ours_med - peer_med) <= 0.15 * peer_med, (ours_med, peer_med)

    quantised = ddn(digits_model, x, y, steps=100, quantize=True, levels=256)
    changed = (quantised != x).flatten(1).any(1)
    assert changed.float().mean() >= 0.95
    assert _fooled(digits_model, quantised[changed], y[changed]).all()  # every returned success is misclassified
    levels = quantised[changed] * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert abs(_median_norm(digits_model, quantised, x, y)[1] - peer_med) <= 0.15 * peer_med


def test_ddn_targeted(digits_model, digits_batch):
    x, y = digits_batch[0][:30], digits_batch[1][:30]
    target = (y + 1) % 10
    with torch.no_grad():
        hit = digits_model(ddn(digits_model, x, target, steps=100, targeted=True)).argmax(1) == target
    assert hit.float().mean() >= 0.9


def test_cw_targeted_matches_foolbox(digits_model, digits_batch):
    x, y = digits_batch[0][:30], digits_batch[1][:30]
    target = (y + 1) % 10
    res = cw_l2_details(digits_model, x, target, c=0.1, steps=100, lr=0.1, binary_steps=3, targeted=True)
    with torch.no_grad():
        assert (digits_model(res.x_adv[res.success]).argmax(1) == target[res.success]).all()
    _, peer, peer_ok = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=3, steps=100, stepsize=0.1,
                                                        initial_const=0.1)(
        fb.PyTorchModel(digits_model, bounds=(0, 1)), x, fb.criteria.TargetedMisclassification(target),
        epsilons=None)
    assert res.success.float().mean() >= max(0.9, peer_ok.float().mean().item() - 0.05)
    ours_med, peer_med = res.l2[res.success].median().item(), _l2(peer, x)[peer_ok].median().item()
    assert abs(ours_med - peer_med) <= 0.10 * peer_med, (ours_med, peer_med)


def test_flow_warp_is_bilinear_resampling():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 6, generator=g)
    zero = torch.zeros(2, 2, 5, 6)
    assert torch.allclose(flow_warp(x, zero), x, atol=1e-6)
    right = zero.clone()
    right[:, 0] = 1.0  # sample one column to the right; the last column repeats the border
    shifted = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    assert torch.allclose(flow_warp(x, right), shifted, atol=1e-6)
    half_down = zero.clone()
    half_down[:, 1] = 0.5
    assert torch.allclose(flow_warp(x, half_down)[:, :, :-1], (x[:, :, :-1] + x[:, :, 1:]) / 2, atol=1e-6)
    with pytest.raises(ValueError):
        flow_warp(x, torch.zeros(2, 2, 5, 5))


def test_flow_smoothness_matches_definition():
    flow = torch.zeros(1, 2, 3, 3)
    flow[0, 0, 1, 1] = 1.0  # one pixel moved: 4 neighbour pairs of length 1, each counted from both ends
    expected = 2 * (4 * (1.0 + 1e-8) ** 0.5 + 8 * 1e-4)  # the other 8 of the 12 pairs contribute sqrt(1e-8)
    assert flow_smoothness(flow).item() == pytest.approx(expected, rel=1e-5)


def test_stadv_returns_warps_and_fools(digits_model, digits_batch):
    x, y = digits_batch[0][:60], digits_batch[1][:60]
    res = stadv_details(digits_model, x, y, tau=0.05, steps=50)
    assert torch.allclose(flow_warp(x, res.flow), res.x_adv, atol=1e-6)
    assert res.success.float().mean() >= 0.95
    assert _fooled(digits_model, res.x_adv[res.success], y[res.success]).all()
    assert torch.equal(res.x_adv, stadv(digits_model, x, y, tau=0.05, steps=50))


def test_stadv_targeted(digits_model, digits_batch):
    x, y = digits_batch[0][:30], digits_batch[1][:30]
    target = (y + 1) % 10
    res = stadv_details(digits_model, x, target, steps=100, lr=0.02, targeted=True)
    with torch.no_grad():
        pred = digits_model(res.x_adv).argmax(1)
    assert res.success.float().mean() >= 0.8
    assert (pred[res.success] == target[res.success]).all()


def test_stadv_fail_modes(digits_model, digits_batch):
    """A heavy smoothness weight leaves some samples unbroken: zeros (advertorch) or the last iterate."""
    x, y = digits_batch[0][:60], digits_batch[1][:60]
    last = stadv_details(digits_model, x, y, tau=0.5, steps=30, fail_mode="last")
    zeros = stadv_details(digits_model, x, y, tau=0.5, steps=30, fail_mode="zeros")
    failed = ~zeros.success
    assert torch.equal(last.success, zeros.success) and failed.any() and (~failed).any()
    assert torch.equal(zeros.x_adv[failed], torch.zeros_like(x[failed]))
    assert torch.equal(zeros.x_adv[~failed], last.x_adv[~failed])
    assert torch.allclose(last.x_adv[failed], flow_warp(x[failed], last.flow[failed]), atol=1e-6)
    assert not torch.equal(last.x_adv[failed], x[failed])


def test_cw_fixed_c_is_one_search_step_handing_on_the_last_iterate(digits_model, digits_batch):
    """CW-L2 at a fixed c (RegionSparse's protocol): one binary-search step without abort-early; successes are
    the smallest successful iterate, the rest the last iterate (not x), so tau-scaling can still grow them."""
    x, y = digits_batch[0][:40], digits_batch[1][:40]
    res = cw_l2_details(digits_model, x, y, c=0.1, steps=15, lr=0.01, binary_steps=1, abort_early=False)
    out = cw_l2_fixed_c(digits_model, x, y, c=0.1, steps=15, lr=0.01)
    assert res.success.any() and not res.success.all()
    torch.testing.assert_close(out[res.success], res.x_adv[res.success])
    torch.testing.assert_close(out[~res.success], res.last[~res.success])
    assert (_l2(out[~res.success], x[~res.success]) > 0).all()


def test_cw_fixed_c_changes_the_prediction_of_a_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(5, 1, 4, 4)
    y = model(x).argmax(1)
    x_adv = cw_l2_fixed_c(model, x, y, c=10.0, steps=200, lr=0.05)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (model(x_adv).argmax(1) != y).float().mean() >= 0.6


def test_cw_runs_under_no_grad(digits_model, digits_batch):
    x, y = digits_batch[0][:8], digits_batch[1][:8]
    with torch.no_grad():
        out = cw_l2_fixed_c(digits_model, x, y, steps=3)
    torch.testing.assert_close(out, cw_l2_fixed_c(digits_model, x, y, steps=3))
