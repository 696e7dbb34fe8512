"""Device choice and seeding, in one place."""
from __future__ import annotations

import random

import numpy as np
import torch


def get_device(preference: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; 'cpu' / 'cuda' force one."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {preference!r}; use 'auto', 'cpu' or 'cuda'")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(preference)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
