"""Figure helpers with one consistent style: image grids and clean-vs-adversarial panels."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_numpy_image(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) for imshow."""
    arr = img.detach().cpu().clamp(0, 1).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def show_image(ax, img: torch.Tensor, title: str = "") -> None:
    """Draw one [0, 1] image without ticks."""
    arr = to_numpy_image(img)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def image_grid(images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8,
               suptitle: str = "", scale: float = 1.3):
    """A grid of [0, 1] images with optional per-image titles; returns the figure."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            show_image(ax, images[i], titles[i] if titles else "")
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def perturbation_image(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(other - clean) rescaled per image to fill [0, 1] around 0.5, so small perturbations are visible."""
    delta = other - clean
    scale = delta.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return (0.5 + 0.5 * delta / scale).clamp(0, 1)


def clean_vs_adversarial(clean: torch.Tensor, adversarial: torch.Tensor, labels: Sequence[str],
                         clean_pred: Sequence[str], adv_pred: Sequence[str], title: str):
    """Three rows: clean (with prediction), adversarial (with prediction), magnified perturbation."""
    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), squeeze=False)
    delta = perturbation_image(clean, adversarial)
    for i in range(n):
        show_image(axes[0, i], clean[i], f"true {labels[i]}\npred {clean_pred[i]}")
        show_image(axes[1, i], adversarial[i], f"pred {adv_pred[i]}")
        show_image(axes[2, i], delta[i])
    for ax, name in zip(axes[:, 0], ("clean", "adversarial", "δ (magnified)")):
        ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
