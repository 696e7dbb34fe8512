"""BPDA, EOT and attack_surface: forward/backward semantics and that adaptive attacks beat oblivious ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.attacks import BPDA, EOT, attack_surface, bpda, pgd
from lib.defenses.base import Defense


class BitDepth(Defense):
    """1-bit squeezing: non-differentiable (zero gradient almost everywhere)."""

    differentiable = False

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)


class GaussianNoise(Defense):
    """Adds clipped Gaussian noise; keeps every draw so tests can recompute the expectation."""

    randomized = True

    def __init__(self, sigma: float, generator: torch.Generator):
        super().__init__()
        self.sigma, self.generator, self.draws = sigma, generator, []

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator) * self.sigma
        self.draws.append(noise)
        return (x + noise).clamp(0.0, 1.0)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def quantize(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.round(t * 3) / 3


def test_bpda_forward_is_forward_fn_and_backward_is_identity():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 5, 5, requires_grad=True)
    w = torch.randn(4, 1, 5, 5)
    out = bpda(quantize)(x)
    assert torch.equal(out, quantize(x))
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(grad, w)
    # autograd through the rounding itself would give no signal at all
    (zero,) = torch.autograd.grad((torch.round(x * 3) / 3 * w).sum(), x)
    assert torch.count_nonzero(zero) == 0


def test_bpda_custom_backward_and_numpy_forward():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 2, 4, 4)
    numpy_round_trip = lambda t: np.round(t.cpu().numpy() * 7) / 7  # noqa: E731 - returns float64 NumPy
    layer = bpda(numpy_round_trip, backward_fn=lambda t: t ** 2)
    assert isinstance(layer, BPDA)
    out = layer(x)
    assert out.dtype == x.dtype and torch.allclose(out, torch.round(x.detach() * 7) / 7)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.allclose(grad, 2 * x.detach() * w)
    with pytest.raises(ValueError, match="keep the shape"):
        bpda(lambda t: t[:, :1])(x)


def soft_round(t: torch.Tensor, sharpness: float = 8.0) -> torch.Tensor:
    """Differentiable stand-in for torch.round: a sigmoid staircase, steep near the rounding thresholds."""
    floor = torch.floor(t)
    return floor + torch.sigmoid(sharpness * (t - floor - 0.5))


def test_bpda_pgd_beats_naive_and_graybox_pgd_through_bit_depth(digits_model, digits_batch):
    torch.manual_seed(0)
    x, y = digits_batch
    defense = BitDepth()
    defended = lambda t: digits_model(defense.purify(t))  # noqa: E731
    clean = accuracy(defended, x, y)
    identity = attack_surface(digits_model, defense)
    assert isinstance(identity.purify, BPDA) and torch.equal(identity(x), defended(x))
    # L-inf: autograd through rounding gives zero gradients and the attack stalls; straight-through BPDA does not
    linf = dict(eps=0.3, steps=20, random_start=False)
    assert accuracy(defended, pgd(defended, x, y, **linf), y) == clean
    assert accuracy(defended, pgd(identity, x, y, **linf), y) < clean - 0.5
    # L2: the gray-box attack spends its budget on pixels that rounding restores; BPDA with a faithful
    # backward (soft rounding) puts it on pixels near the threshold and beats it by a wide margin
    l2 = dict(eps=1.0, steps=20, random_start=False)
    gray = accuracy(defended, pgd(digits_model, x, y, norm="l2", **l2), y)
    smooth = attack_surface(digits_model, defense, backward_fn=soft_round)
    adaptive = accuracy(defended, pgd(smooth, x, y, norm="l2", **l2), y)
    assert adaptive < gray - 0.15, (adaptive, gray)


@pytest.mark.parametrize("max_batch", [None, 7])
def test_eot_is_mean_over_draws_and_has_finite_gradients(digits_model, digits_batch, max_batch):
    x = digits_batch[0][:10]
    defense = GaussianNoise(0.2, torch.Generator().manual_seed(0))
    surface = attack_surface(digits_model, defense, eot_samples=5)
    surface.max_batch = max_batch
    assert isinstance(surface, EOT)
    x_var = x.clone().requires_grad_(True)
    logits = surface(x_var)
    noise = torch.cat(defense.draws).view(5, *x.shape)
    expected = torch.stack([digits_model((x + n).clamp(0, 1)) for n in noise]).mean(0)
    assert torch.allclose(logits, expected, atol=1e-5)
    (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x_var)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # same seed, same draws: EOT is reproducible through the defense's generator
    defense.generator.manual_seed(0)
    assert torch.equal(surface(x), logits.detach())


def test_attack_surface_composition(digits_model, digits_batch):
    x = digits_batch[0][:8]
    plain = attack_surface(digits_model, GaussianNoise(0.1, torch.Generator().manual_seed(0)), eot_samples=1)
    assert not isinstance(plain, EOT)
    with pytest.raises(ValueError, match="eot_samples"):
        attack_surface(digits_model, BitDepth(), eot_samples=0)
    # a differentiable defense is differentiated directly (no BPDA): gradients match plain autograd
    blur = Defense()
    blur.purify = lambda t: torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=1)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(attack_surface(digits_model, blur)(x1).sum(), x1)
    (g2,) = torch.autograd.grad(digits_model(blur.purify(x2)).sum(), x2)
    assert torch.allclose(g1, g2)


def test_eot_pgd_through_noise_defense_lowers_accuracy(digits_model, digits_batch):
    torch.manual_seed(0)
    x, y = digits_batch[0][:100], digits_batch[1][:100]
    defense = GaussianNoise(0.15, torch.Generator().manual_seed(1))
    defended = lambda t: digits_model(defense.purify(t))  # noqa: E731
    surface = attack_surface(digits_model, defense, eot_samples=8)
    x_adv = pgd(surface, x, y, eps=0.2, steps=10, generator=torch.Generator().manual_seed(0))
    assert accuracy(defended, x_adv, y) < accuracy(defended, x, y) - 0.5
