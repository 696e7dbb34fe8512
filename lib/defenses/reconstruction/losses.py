"""Paper 003's training objective for R_θ: eq. (4), the halved squared error per image (spec-003 §2.5)."""
from __future__ import annotations

import torch


def restorer_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (4): L(θ) = 1/(2N) Σ ||F(X, θ) − Y||², the squared error summed per image, halved, averaged."""
    if output.shape != target.shape:
        raise ValueError(f"output and target shapes differ: {tuple(output.shape)} vs {tuple(target.shape)}")
    return 0.5 * (output - target).pow(2).flatten(1).sum(1).mean()
