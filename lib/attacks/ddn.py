"""Decoupled Direction and Norm attack (Rony et al. 2019), batched, after the authors' reference code.

Each step: SGD on delta along the L2-normalised gradient of the cross-entropy (cosine-annealed step from 1
to 0.01), then the per-sample norm epsilon shrinks by (1 - gamma) if the current point is adversarial and
grows by (1 + gamma) otherwise (capped at the largest norm the box allows), delta is projected onto the
epsilon-sphere, and x + delta is quantised to `levels` grey levels and clipped to [0, 1]. The smallest-norm
adversarial point seen is kept per sample.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_LR_MIN = 0.01  # final step of the cosine schedule (the reference's eta_min; the initial step is 1)
_TINY = 1e-12  # guards the projection of an all-zero delta


def ddn(model: Model, x: torch.Tensor, y: torch.Tensor, *, steps: int = 100, gamma: float = 0.05,
        init_norm: float = 1.0, quantize: bool = True, levels: int = 256, targeted: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Minimum-L2 DDN attack; returns the smallest-norm adversarial found per sample, or x where none.

    `generator` seeds the random direction used where a gradient is exactly zero (as the reference does).
    """
    check_attack_inputs(model, x, y)
    check_positive_int(steps, "steps")
    check_nonnegative(gamma, "gamma")
    check_nonnegative(init_norm, "init_norm")
    check_positive_int(levels, "levels")
    if gamma >= 1 or levels < 2:
        raise ValueError(f"need 0 <= gamma < 1 and levels >= 2, got gamma={gamma}, levels={levels}")

    x = x.detach()
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    sign = 1.0 if targeted else -1.0  # SGD descends sign * CE: ascends CE untargeted, descends it targeted
    delta = torch.zeros_like(x)
    eps = torch.full((n,), float(init_norm), device=x.device, dtype=x.dtype)
    worst_norm = torch.maximum(x, 1 - x).flatten(1).norm(dim=1)
    best_l2 = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    best_adv = x.clone()

    for i in range(steps):
        lr = _LR_MIN + (1 - _LR_MIN) * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
        with torch.enable_grad():
            adv = (x + delta).clamp(0.0, 1.0).requires_grad_(True)
            logits = model(adv)
            loss = sign * F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            pred = logits.argmax(1)
            is_adv = pred == y if targeted else pred != y
            l2 = delta.flatten(1).norm(dim=1)
            better = is_adv & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best_adv = torch.where(better.view(view), adv, best_adv)

            grad_norm = grad.flatten(1).norm(dim=1)
            zero = grad_norm == 0
            if zero.any():
                grad[zero] = torch.randn(grad[zero].shape, generator=generator, device=x.device, dtype=x.dtype)
                grad_norm = grad.flatten(1).norm(dim=1)
            delta = delta - lr * grad / grad_norm.view(view)

            eps = torch.minimum(eps * torch.where(is_adv, 1 - gamma, 1 + gamma), worst_norm)
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(_TINY)).view(view)
            adv_next = x + delta
            if quantize:
                adv_next = torch.round(adv_next * (levels - 1)) / (levels - 1)
            delta = adv_next.clamp(0.0, 1.0) - x
    return best_adv.detach()
