"""SFM-Defense's loss, Eq. 2: L_mask = w1 ||x~||_1 + w2 (1 - cos(F(x), F(x~))) + w3 ||x - x~||_2 (Eqs. 3-5),
and the loss scale that decides whether a given w1 does anything at all (spec-000 §2.5.1).

The batch reduction of the L1/L2 terms matters: the default "batch_tensor" sums |x~| over the whole batch and takes
one Frobenius norm of x - x~ over the whole batch. Under it the all-ones (identity) mask minimises
w1 L_sp + w3 L_recon exactly when w1 / w3 <= 1 / sqrt(N), N the number of elements one norm couples;
`w1_for_ratio` expresses w1 as a multiple of that threshold, so it keeps its meaning when the batch or image
size changes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lib.validate import check_images

REDUCTIONS = ("batch_tensor", "per_sample")
SEG_REDUCTIONS = ("mean", "sum")
# Elements coupled by one norm for which the paper's weights were published (spec-000 §2.5.1):
# 3 x 32 x 32 x 128 for CIFAR10/SVHN (w1 = 2.5e-3), 3 x 64 x 64 x 128 for Tiny-ImageNet (w1 = 0.1, w3 = 100).
REFERENCE_ELEMENTS = {"cifar": 3 * 32 * 32 * 128, "tiny": 3 * 64 * 64 * 128}
PAPER_WEIGHTS = {"cifar": (2.5e-3, 1.0, 1.0), "tiny": (0.1, 0.01, 100.0)}


def check_reduction(reduction: str, seg_reduction: str) -> None:
    """ValueError unless `reduction` is one of REDUCTIONS and `seg_reduction` one of SEG_REDUCTIONS."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if seg_reduction not in SEG_REDUCTIONS:
        raise ValueError(f"unknown seg_reduction {seg_reduction!r}; valid: {', '.join(SEG_REDUCTIONS)}")


def sparsity_loss(x_tilde: torch.Tensor, reduction: str = "batch_tensor") -> torch.Tensor:
    """Eq. 3, L_sp = ||x~||_1: summed over the whole batch, or per sample then averaged."""
    check_reduction(reduction, "mean")
    per = x_tilde.abs().flatten(1).sum(1)
    return per.sum() if reduction == "batch_tensor" else per.mean()


def semantic_loss(logits_clean: torch.Tensor, logits_masked: torch.Tensor, seg_reduction: str = "mean") -> torch.Tensor:
    """Eq. 4, L_seg = 1 - cos(F(x), F(x~)) per sample, averaged (or summed) over the batch."""
    check_reduction("batch_tensor", seg_reduction)
    per = 1.0 - F.cosine_similarity(logits_clean, logits_masked, dim=1, eps=1e-12)
    return per.mean() if seg_reduction == "mean" else per.sum()


def reconstruction_loss(x: torch.Tensor, x_tilde: torch.Tensor, reduction: str = "batch_tensor") -> torch.Tensor:
    """Eq. 5, L_recon = ||x - x~||_2 (not squared): one norm over the whole batch, or per sample then averaged."""
    check_reduction(reduction, "mean")
    diff = (x - x_tilde).flatten(1)
    # sqrt(sum + tiny) keeps the gradient finite when x~ = x exactly (all-ones mask)
    if reduction == "batch_tensor":
        return (diff.square().sum() + 1e-12).sqrt()
    return (diff.square().sum(1) + 1e-12).sqrt().mean()


def sfm_losses(x: torch.Tensor, x_tilde: torch.Tensor, logits_clean: torch.Tensor, logits_masked: torch.Tensor,
               weights: tuple[float, float, float], reduction: str = "batch_tensor",
               seg_reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The three terms and Eq. 2's total L_mask = w1 L_sp + w2 L_seg + w3 L_recon."""
    w1, w2, w3 = weights
    terms = {"sp": sparsity_loss(x_tilde, reduction), "seg": semantic_loss(logits_clean, logits_masked, seg_reduction),
             "recon": reconstruction_loss(x, x_tilde, reduction)}
    terms["total"] = w1 * terms["sp"] + w2 * terms["seg"] + w3 * terms["recon"]
    return terms


def coupled_elements(x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor") -> float:
    """Effective number of elements one L1/L2 norm couples: sum_p a_p^2 / b_p per image (a_p, b_p: sum and sum of
    squares of pixel p over channels; 3 per grey colour pixel, 1 per non-zero grey pixel), times the batch size
    for the batch-tensor reduction. The identity mask is optimal for w1 / w3 <= 1 / sqrt(this)."""
    check_images(x)
    a, b = x.sum(1), x.square().sum(1)
    per_image = torch.where(b > 0, a.square() / b.clamp_min(1e-12), torch.zeros_like(a)).flatten(1).sum(1).mean()
    return float(per_image) * (batch_size if reduction == "batch_tensor" else 1)


def identity_threshold(x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor") -> float:
    """1 / sqrt(coupled_elements): the largest w1 / w3 for which the all-ones mask minimises w1 L_sp + w3 L_recon."""
    return 1.0 / math.sqrt(coupled_elements(x, batch_size, reduction))


def paper_threshold_ratio(setting: str = "cifar") -> float:
    """(w1 / w3) / threshold of the paper's published weights under the batch-tensor reading at B = 128
    (about 1.57 for CIFAR10/SVHN, 1.25 for Tiny-ImageNet): how far past the identity threshold the paper sits."""
    if setting not in PAPER_WEIGHTS:
        raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(PAPER_WEIGHTS)}")
    w1, _, w3 = PAPER_WEIGHTS[setting]
    return w1 / w3 * math.sqrt(REFERENCE_ELEMENTS[setting])


def w1_for_ratio(ratio: float, x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor",
                 w3: float = 1.0) -> float:
    """The w1 that puts w1 / w3 at `ratio` times the identity threshold for images like x (spec-000 §2.5.1 rescaling)."""
    if not ratio >= 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    return float(ratio) * w3 * identity_threshold(x, batch_size, reduction)
