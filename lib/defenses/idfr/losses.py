"""IDFR's training objectives: the input denoiser's (Eq. 3, and the two variants compared with it) and the
feature restorer's (Eq. 6). Each is a pure function of the modules and one batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ID_LOSSES = ("ce", "feature_l1", "pixel_l1")


def id_loss(denoiser: nn.Module, classifier: nn.Module, z: torch.Tensor, x_clean: torch.Tensor, y: torch.Tensor,
            kind: str = "ce") -> torch.Tensor:
    """ID training loss on inputs z (adversarial or noisy) whose clean originals are x_clean.

    ce: CE(f(I_w(z)), y), the paper's Eq. 3. feature_l1: mean |f_enc(I_w(z)) - f_enc(x_clean)|, the authors' code
    (HGD-style representation guidance). pixel_l1: mean |I_w(z) - x_clean| (a pixel-guided denoiser baseline).
    """
    if kind not in ID_LOSSES:
        raise ValueError(f"unknown ID loss {kind!r}; valid: {', '.join(ID_LOSSES)}")
    out = denoiser(z)
    if kind == "ce":
        return F.cross_entropy(classifier(out), y)
    if kind == "feature_l1":
        with torch.no_grad():
            target = classifier.features(x_clean)
        return (classifier.features(out) - target).abs().mean()
    return (out - x_clean).abs().mean()


def fr_loss(restorer: nn.Module, classifier: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6: CE(f_cls(F_pi(h_mix)), y) with the frozen head f_cls."""
    return F.cross_entropy(classifier.head(restorer(h)), y)
