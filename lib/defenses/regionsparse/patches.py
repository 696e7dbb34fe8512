"""Patches of images (per channel, on a stride grid), their overlap-averaged reassembly, and z-scoring (Eq. 17)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lib.defenses.regionsparse.config import EPS


def extract_patches(x: torch.Tensor, b: int, stride: int = 1) -> torch.Tensor:
    """All b x b patches of every channel: (N, C, L, b*b), L = positions of a stride grid (per channel mode)."""
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), b, stride=stride)  # (N*C, b*b, L)
    return cols.transpose(1, 2).reshape(n, c, -1, b * b)


def fold_patches(patches: torch.Tensor, size: tuple[int, int], b: int, stride: int = 1,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap-average patches (N, C, L, b*b) back into images; returns (image, coverage count).

    `weights` (N, C, L) in {0, 1} leaves patches out; pixels no kept patch covers come back 0 with coverage 0.
    """
    n, c, length, d = patches.shape
    w = torch.ones(n, c, length, device=patches.device, dtype=patches.dtype) if weights is None else weights
    num = F.fold((patches * w[..., None]).reshape(n * c, length, d).transpose(1, 2), size, b, stride=stride)
    den = F.fold(w.reshape(n * c, 1, length).expand(-1, d, -1), size, b, stride=stride)
    img = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
    return img.reshape(n, c, *size), den.reshape(n, c, *size)


def zscore_cols(p: np.ndarray | torch.Tensor, eps: float = EPS):
    """Eq. 17: z-score every column (patch dimension) over the rows; returns (z, mean, std) with std + eps."""
    mu = p.mean(0, keepdims=True) if isinstance(p, np.ndarray) else p.mean(0, keepdim=True)
    sd = (p.std(0, keepdims=True) if isinstance(p, np.ndarray) else p.std(0, unbiased=False, keepdim=True)) + eps
    return (p - mu) / sd, mu, sd
