"""Input checks shared by attacks, defenses, data and models: fail loudly, once, at the public entry point.

Every check raises one ValueError that names the parameter, says what value it got and what is allowed, so a
bad input never surfaces as an error from deep inside torch, OpenCV or a notebook (and is never accepted).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch


def check_images(x: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError unless `x` is a finite float batch (N, C, H, W) with values in [0, 1].

    One reduction and one device synchronisation (min and max, which NaN and inf propagate into); the check
    does not touch the autograd graph, so gradients through `x` are unaffected.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images (N, C, H, W) in [0, 1], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)} (rank {x.dim()})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}"
                         + (" (0-255 images? divide by 255)" if x.dtype == torch.uint8 else ""))
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}; give at least one image")
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(x.detach())).tolist())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got values in [{lo}, {hi}] (NaN or infinite entries)")
    if lo < 0.0 or hi > 1.0:
        hint = " (0-255 images? divide by 255)" if hi > 1.0 and hi <= 255.0 and lo >= 0.0 else ""
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def check_labels(y: torch.Tensor, n: int, name: str = "y", num_classes: int | None = None) -> None:
    """Raise ValueError unless `y` is an integer (not boolean) vector of `n` class labels, each in
    [0, num_classes) when `num_classes` is given."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {n} labels, got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class labels (torch.long), got dtype {y.dtype}")
    if num_classes is not None and n:
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(y.detach())).tolist())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must hold class labels in [0, {num_classes - 1}] ({num_classes} classes), "
                             f"got {bad}")


def check_attack_inputs(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> int:
    """Check an attack's images and labels (range given the model's classes); return the number of classes.

    The class count comes from the model's logits on the first image, computed without gradients and with the
    random state restored afterwards, so a randomised model's later draws are the same as without the check.
    """
    check_images(x)
    check_labels(y, x.shape[0])
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        logits = model(x[:1])
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (N, classes), got {shape}")
    num_classes = logits.shape[1]
    check_labels(y, x.shape[0], num_classes=num_classes)
    return num_classes


def _number(value: object, name: str, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    return float(value)


def check_nonnegative(value: float, name: str) -> None:
    """Raise ValueError unless a budget or step size is a finite number >= 0."""
    v = _number(value, name, "a finite number >= 0")
    if not (v >= 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_positive_int(value: int, name: str) -> None:
    """Raise ValueError unless `value` is a whole number >= 1 (not a boolean)."""
    v = _number(value, name, "an integer >= 1")
    if not math.isfinite(v) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
