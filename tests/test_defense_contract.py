"""Every registry entry, built in the smoke profile for "digits" through the one factory, keeps the defense contract
of lib.defenses.base: purify keeps shape, dtype, device and the [0, 1] range; Built.classifier gives logits; the flags
are bools; stages are images of the input's shape; meta has config / train_seconds / cache_key; and a white-box
attacker gets a gradient through every defended model.

BPDA rule. A non-differentiable defense needs a backward pass for white-box attacks (lib.attacks.adaptive.attack_surface).
It either offers its own differentiable approximation (`bpda_purify`), or it is listed in IDENTITY_BPDA below: a
defense whose output approximates its input, so that the identity (the straight-through estimator of Athalye et al.
2018, attack_surface's fallback) is the usual BPDA approximation for it. The benchmark labels their white-box route
"BPDA" (an upper bound on robustness) instead of "BPDA-approx".
"""
from __future__ import annotations

import json

import pytest
import torch

from lib import data
from lib.attacks import attack_surface
from lib.defenses.base import Built
from lib.defenses.registry import LABELS, build, defense_names
from lib.profiles import load_profile
from lib.train import trained_classifier

IDENTITY_BPDA: dict[str, str] = {
    "bit_depth": "rounding to 2^bits levels: the straight-through estimator is the standard BPDA for quantisation",
    "nlm": "non-local means denoising: output close to the input",
    "jpeg": "JPEG encode/decode: output close to the input (Athalye et al. use the identity for it)",
    "tvm": "total-variation minimisation from kept pixels: a reconstruction of the input",
}


@pytest.fixture(scope="module")
def built() -> dict[str, Built]:
    """Every registry entry for digits in the smoke profile (trained once per cache, then loaded)."""
    profile = load_profile("smoke")
    classifier, _ = trained_classifier(profile, "digits", "target", device=torch.device("cpu"))
    return {name: build(name, profile, "digits", classifier, device=torch.device("cpu")) for name in defense_names()}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    """Four test digits, perturbed so that values sit at 0, at 1 and in between."""
    clean = data.load_dataset("digits", "test", n=4, seed=0).x
    return (clean + 0.3 * torch.sign(torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)


def test_every_entry_is_registered_with_a_label(built):
    assert list(built) == defense_names() == list(LABELS) and all(isinstance(b, Built) for b in built.values())


@pytest.mark.parametrize("name", defense_names())
def test_purify_keeps_shape_dtype_device_and_range(built, x, name):
    defense = built[name].defense.eval()
    with torch.no_grad():
        out = defense.purify(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("name", defense_names())
def test_the_defended_model_gives_logits(built, x, name):
    with torch.no_grad():
        logits = built[name].model().eval()(x)
    assert logits.shape == (len(x), data.dataset_info("digits").num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", defense_names())
def test_flags_stages_and_meta(built, x, name):
    b = built[name]
    defense = b.defense.eval()
    assert isinstance(defense.differentiable, bool) and isinstance(defense.randomized, bool)
    assert defense.bpda_purify is None or callable(defense.bpda_purify)
    with torch.no_grad():
        stages = defense.stages(x)
    assert isinstance(stages, dict)
    for stage, image in stages.items():
        assert isinstance(stage, str) and isinstance(image, torch.Tensor)
        assert image.shape == x.shape, f"{name}: stage {stage!r} has shape {tuple(image.shape)}, not {tuple(x.shape)}"
    if "mask" in stages:                                                   # the stage figures show as the mask
        assert float(stages["mask"].min()) >= 0.0 and float(stages["mask"].max()) <= 1.0
    assert {"config", "train_seconds", "cache_key"} <= set(b.meta)
    json.dumps(b.meta["config"])                                          # plain values only
    assert isinstance(b.meta["train_seconds"], float) and b.meta["train_seconds"] >= 0
    assert b.meta["cache_key"] is None or isinstance(b.meta["cache_key"], str)
    assert (b.meta["cache_key"] is None) == (b.meta["train_seconds"] == 0), "learned defenses are cached and timed"


@pytest.mark.parametrize("name", defense_names())
def test_non_differentiable_defenses_have_a_bpda_approximation_or_a_justified_identity(built, x, name):
    defense = built[name].defense
    if defense.differentiable:
        assert name not in IDENTITY_BPDA, f"{name} is differentiable: drop it from IDENTITY_BPDA"
        return
    if defense.bpda_purify is not None:
        assert name not in IDENTITY_BPDA, f"{name} has its own bpda_purify: drop it from IDENTITY_BPDA"
        approx = defense.bpda_purify(x.clone().requires_grad_(True))
        assert approx.shape == x.shape and approx.requires_grad
    else:
        assert name in IDENTITY_BPDA, f"{name} is not differentiable and has no bpda_purify: give it one, or list it " \
                                      f"in IDENTITY_BPDA with the reason the identity approximates it"


@pytest.mark.parametrize("name", defense_names())
def test_a_white_box_attacker_gets_a_gradient_through_every_defended_model(built, x, name):
    b = built[name]
    surface = attack_surface(b.classifier.eval(), b.defense.eval(), eot_samples=2)
    inputs = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(surface(inputs), torch.arange(len(x)) % 10)
    (grad,) = torch.autograd.grad(loss, inputs)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
