"""ARN's objective (spec §2.3): each term of Eqs. 1-8 as a function, and the weights that combine them.

L_{D_A} and L_att act on the latent code (attack discriminator), L_nor pulls the code's posterior to N(0, I),
L_mse and L_adv act on the restored image (pixel loss, image discriminator). Every image is in [-1, 1] space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

DA_LOSSES = ("ce", "bce")
MSE_REDUCTIONS = ("mean", "sample_sum")
KL_REDUCTIONS = ("batchmean", "sum", "none")


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """L_nor as the closed-form KL(N(mu, exp(logvar)) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)).

    reduction: 'batchmean' sums over dimensions and averages over samples; 'sum' sums over everything (the
    official code); 'none' returns one value per sample.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    per_sample = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _check_da_loss(kind: str) -> None:
    if kind not in DA_LOSSES:
        raise ValueError(f"kind must be one of {DA_LOSSES}, got {kind!r}")


def attack_discriminator_loss(logits: torch.Tensor, domains: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """L_{D_A} (Eq. 1): softmax cross-entropy of D_A's logits against the domain labels ('bce': the code's
    independent sigmoids against one-hot targets)."""
    _check_da_loss(kind)
    if kind == "ce":
        return F.cross_entropy(logits, domains)
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(domains, logits.shape[1]).to(logits.dtype))


def attack_invariance_loss(logits: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """L_att (Eq. 2): cross-entropy of D_A's prediction against the uniform 'attack-confused' label [1/K .. 1/K].

    With softmax CE it equals -mean_k log softmax_k and is minimal (log K) at uniform logits.
    """
    _check_da_loss(kind)
    if kind == "ce":
        return -F.log_softmax(logits, dim=1).mean(1).mean()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 / logits.shape[1]))


def restoration_mse(out_pm: torch.Tensor, target_pm: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_mse (Eq. 4): 'mean' over all elements (the code), or 'sample_sum' (sum over pixels, mean over samples)."""
    if reduction not in MSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MSE_REDUCTIONS}, got {reduction!r}")
    sq = (out_pm - target_pm).pow(2)
    return sq.mean() if reduction == "mean" else sq.flatten(1).sum(1).mean()


def image_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_{D_I} (Eq. 5, as the bounded standard GAN loss): BCE(D_I(x), 1) + BCE(D_I(G(E(x~))), 0)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv (Eq. 6), non-saturating: BCE(D_I(G(E(x~))), 1) = -mean log D_I(G(E(x~)))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def gradient_penalty(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """WGAN-GP term mean (||grad D(x_hat)|| - 1)^2 on x_hat between the natural target and the fake (spec A10)."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator).to(real)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def logit_guided_loss(classifier: nn.Module, restored: torch.Tensor, natural: torch.Tensor) -> torch.Tensor:
    """HGD's L1 logit-guided loss: mean |f(restored) - f(natural)| through the frozen classifier ([0, 1] images)."""
    return (classifier(restored) - classifier(natural).detach()).abs().mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights and reductions of the purifier objective (spec §2.3 presets); w_logit is HGD's logit-guided term."""

    w_mse: float = 200.0
    w_att: float = 0.5
    w_nor: float = 1e-3
    w_adv: float = 0.01
    w_logit: float = 0.0
    gp: float = 0.0
    mse_reduction: str = "mean"
    kl_reduction: str = "batchmean"
    da_loss: str = "ce"

    def __post_init__(self) -> None:
        for name in ("w_mse", "w_att", "w_nor", "w_adv", "w_logit", "gp"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.mse_reduction not in MSE_REDUCTIONS or self.kl_reduction not in KL_REDUCTIONS[:2] \
                or self.da_loss not in DA_LOSSES:
            raise ValueError(f"bad reductions: mse {self.mse_reduction!r} (valid {MSE_REDUCTIONS}), kl "
                             f"{self.kl_reduction!r} (valid {KL_REDUCTIONS[:2]}), "
                             f"da {self.da_loss!r} (valid {DA_LOSSES})")


PRESETS: dict[str, LossWeights] = {
    "paper_mnist": LossWeights(1.0, 0.1, 0.01, 0.1, mse_reduction="sample_sum"),
    "paper_cifar": LossWeights(1.0, 100.0, 10.0, 100.0, mse_reduction="sample_sum"),
    "official_code": LossWeights(200.0, 0.5, 1e-6, 0.01, gp=30.0, kl_reduction="sum", da_loss="bce"),
    "tiny": LossWeights(200.0, 0.5, 1e-3, 0.01),
}


def loss_weights(preset: str, **overrides: float) -> LossWeights:
    """A named preset (paper_mnist, paper_cifar, official_code, tiny) with some fields replaced (ablations)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)
