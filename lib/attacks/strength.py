"""Attacks at a target strength measured by Guo et al.'s normalised L2 (RegionSparse's evaluation, spec-002 §3).

d(x, x') = mean_i ||x'_i - x_i||_2 / ||x_i||_2 over a set. `scale_to_normalized_l2` stretches a set of
perturbations by one global factor tau to reach d (the paper's tau-scaling of CW-L2); `mi_fgsm_at_l2` runs MI-FGSM
with one global L-inf budget calibrated so that the set reaches d.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lib.attacks.registry import generate

Model = Callable[[torch.Tensor], torch.Tensor]


def normalized_l2(x: torch.Tensor, x_adv: torch.Tensor) -> float:
    """Guo et al.'s normalised L2 dissimilarity: mean over images of ||x_adv - x||_2 / ||x||_2."""
    num = (x_adv - x).flatten(1).norm(dim=1)
    return float((num / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def scale_to_normalized_l2(x: torch.Tensor, x_adv: torch.Tensor, d: float, *, tau_max: float = 1e3,
                           iters: int = 50) -> tuple[torch.Tensor, float, float]:
    """One global tau >= 1 (bisection) so that clip(x + tau * (x_adv - x)) has mean normalised L2 d.

    Returns (scaled images, tau, achieved d). If d is already exceeded at tau = 1, tau = 1 and the achieved d is
    reported as it is; if even tau_max falls short, tau_max is used.
    """
    delta = x_adv - x

    def at(tau: float) -> torch.Tensor:
        return (x + tau * delta).clamp(0.0, 1.0)

    if normalized_l2(x, x_adv) >= d:
        return x_adv.clone(), 1.0, normalized_l2(x, x_adv)
    lo, hi = 1.0, tau_max
    if normalized_l2(x, at(hi)) < d:
        return at(hi), hi, normalized_l2(x, at(hi))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if normalized_l2(x, at(mid)) < d else (lo, mid)
    out = at(hi)
    return out, hi, normalized_l2(x, out)


def mi_fgsm_at_l2(model: Model, x: torch.Tensor, y: torch.Tensor, d: float, *, steps: int = 10, decay: float = 1.0,
                  refine: int = 2, batch_size: int = 500) -> tuple[torch.Tensor, float, float]:
    """MI-FGSM (sign update, L-inf ball) with one global eps chosen so the mean normalised L2 is about d.

    Starts from eps0 = d / mean_i(sqrt(N_pixels) / ||x_i||_2) and rescales eps by d / achieved `refine` times.
    Returns (images, eps, achieved d).
    """
    dims = x[0].numel()
    eps = d / float((math.sqrt(dims) / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())

    def run(e: float) -> torch.Tensor:
        return generate("mi_fgsm", model, x, y, batch_size=batch_size, eps=e, steps=steps, decay=decay)

    x_adv = run(eps)
    for _ in range(refine):
        got = normalized_l2(x, x_adv)
        if got <= 0:
            break
        eps = min(1.0, eps * d / got)
        x_adv = run(eps)
    return x_adv, eps, normalized_l2(x, x_adv)
