"""Paper 003's defense D(x) = clamp(R_θ(Q_k(x)), 0, 1) in front of an unchanged classifier (spec-003 §2.1-2.2).

Q_k rounds every pixel to k levels: a step function with zero gradient almost everywhere, so adaptive
attacks use BPDA through it (`ReconstructionDefense.bpda_purify`, a straight-through Q_k and exact gradients
through R_θ). `PixelDepthCompression` is Q_k alone, the paper's Fig. 3 ablation.
"""
from __future__ import annotations

import torch
from torch import nn

from lib.defenses.base import Defense
from lib.validate import check_images, check_positive_int


def check_levels(levels: int) -> None:
    """ValueError unless `levels` is a whole number of quantisation levels k in [2, 256]."""
    check_positive_int(levels, "levels")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be between 2 and 256 (k quantisation levels per channel), got {levels}")


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q_k(x) = round(x (k - 1)) / (k - 1): every pixel and channel to one of k levels in [0, 1] (§2.2).

    Non-differentiable (a step function); `straight_through_quantize` is its BPDA version.
    """
    check_levels(levels)
    check_images(x)
    return torch.round(x * (levels - 1)) / (levels - 1)


def straight_through_quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q_k forward, identity backward (straight-through BPDA, Athalye et al. 2018)."""
    return x + (quantize(x, levels) - x).detach()


class PixelDepthCompression(Defense):
    """Q_k alone as a defense (the paper's Fig. 3 ablation). Not differentiable: attacks need BPDA."""

    differentiable = False

    def __init__(self, levels: int):
        super().__init__()
        check_levels(levels)
        self.levels = levels

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class ReconstructionDefense(Defense):
    """D(x) = clamp(R_θ(Q_k(x)), 0, 1). Q_k is a step function, so `differentiable` is False.

    `bpda_purify` is the same forward with a straight-through gradient for Q_k and exact gradients
    through R_θ: what an adaptive (BPDA) attacker differentiates (spec §7.4); lib.attacks.attack_surface uses it.
    `stages` gives the compressed image Q_k(x) and the restored one D(x) (the rows of the paper's Fig. 5).
    """

    differentiable = False

    def __init__(self, restorer: nn.Module, levels: int):
        super().__init__()
        check_levels(levels)
        self.restorer = restorer
        self.levels = levels

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.restorer(quantize(x, self.levels)).clamp(0.0, 1.0)

    def bpda_purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.restorer(straight_through_quantize(x, self.levels)).clamp(0.0, 1.0)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        compressed = quantize(x, self.levels)
        return {"compressed": compressed, "restored": self.restorer(compressed).clamp(0.0, 1.0)}

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
