"""Input checks shared by attacks, defenses and models: fail loudly on malformed batches."""
from __future__ import annotations

import torch


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError unless `x` is a finite float batch (N, C, H, W) with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)} (rank {x.dim()})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def check_labels(y: torch.Tensor, n: int, name: str = "y") -> None:
    """Raise ValueError unless `y` is an integer vector of length `n`."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {n} labels, got {shape}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")


def check_nonnegative(value: float, name: str) -> None:
    """Raise ValueError if a budget or step size is negative or not finite."""
    v = float(value)
    if not (v >= 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_positive_int(value: int, name: str) -> None:
    """Raise ValueError unless `value` is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
