"""Adversarial-training losses, each a `loss(model, x, y)` for `lib.train.fit_classifier`.

- `pgd_training_loss`: Madry et al. (2018), the benchmark's adversarially trained baseline.
- `kurakin_training_loss`: Kurakin et al. (2017) as in PixelDefend's code, paper 003's Table 4 baselines.
- `fgsm_mixed_loss`: 50/50 clean/FGSM with per-image budgets, paper 002's fine-tuned baseline.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.attacks import bim, pgd
from lib.attacks.gradient import input_gradient
from lib.validate import check_nonnegative, check_positive_int

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def pgd_training_loss(eps: float, steps: int = 7, alpha: float | None = None) -> Loss:
    """Madry et al.'s adversarial training loss: cross-entropy on L-inf PGD examples (random start) of each batch."""
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.eval()
        x_adv = pgd(model, x, y, eps=eps, steps=steps, alpha=alpha)
        model.train()
        return F.cross_entropy(model(x_adv), y)

    return loss


KURAKIN_KINDS = ("fgsm", "bim")


def kurakin_training_loss(kind: str, *, sigma: float = 8 / 255, max_steps: int | None = None,
                          adv_weight: float = 0.3) -> Loss:
    """Kurakin et al. (2017) adversarial training as in PixelDefend's code (spec §2.8), for fit_classifier.

    Half of each batch stays clean; the other half is attacked with the model's *predicted* labels
    (no label leaking) at ε = |truncated normal(0, σ)| (cut at 2σ): per example for FGSM, per batch for
    BIM with T = int(min(ε255 + 4, 1.25 ε255)) steps (at most `max_steps`) of α = max(1/255, ε/T).
    Loss = (CE_clean + adv_weight · CE_adv) / (1 + adv_weight). Attacks run in the model's current mode.
    """
    if kind not in KURAKIN_KINDS:
        raise ValueError(f"unknown adversarial training {kind!r}; valid: {', '.join(KURAKIN_KINDS)}")
    check_nonnegative(sigma, "sigma")
    check_nonnegative(adv_weight, "adv_weight")
    if max_steps is not None:
        check_positive_int(max_steps, "max_steps")

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        half = len(xb) // 2
        x_src = xb[half:]
        with torch.no_grad():
            pred = model(x_src).argmax(1)
        if kind == "fgsm":
            eps = (torch.randn(len(x_src), device=xb.device).clamp(-2, 2).abs() * sigma).view(-1, 1, 1, 1)
            x_adv = (x_src + eps * input_gradient(model, x_src, pred).sign()).clamp(0.0, 1.0).detach()
        else:
            eps = float(torch.randn(()).clamp(-2, 2).abs()) * sigma
            e255 = 255.0 * eps
            steps = max(1, int(min(e255 + 4, 1.25 * e255)))
            steps = min(steps, max_steps) if max_steps is not None else steps
            x_adv = bim(model, x_src, pred, eps=eps, alpha=max(1.0 / 255.0, eps / steps), steps=steps)
        ce_clean = F.cross_entropy(model(xb[:half]), yb[:half])
        ce_adv = F.cross_entropy(model(x_adv), yb[half:])
        return (ce_clean + adv_weight * ce_adv) / (1.0 + adv_weight)

    return loss_fn


def fgsm_mixed_loss(levels: Sequence[float] = tuple(range(2, 23, 4)), seed: int = 0) -> Loss:
    """50/50 clean/FGSM cross-entropy with a per-image eps drawn from `levels` (0-255 scale), as in Kurakin et al."""
    gen = torch.Generator().manual_seed(seed)
    levels_t = torch.tensor(list(levels), dtype=torch.float32) / 255

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        eps = levels_t[torch.randint(len(levels_t), (len(xb),), generator=gen)].to(xb).view(-1, 1, 1, 1)
        model.eval()
        with torch.enable_grad():
            xv = xb.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xv), yb), xv)
        model.train()
        x_adv = (xb + eps * g.sign()).clamp(0, 1).detach()
        return 0.5 * F.cross_entropy(model(xb), yb) + 0.5 * F.cross_entropy(model(x_adv), yb)

    return loss
