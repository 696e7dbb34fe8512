"""Device choice and seeding, in one place."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

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


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's RNG (CPU, and `device` when it is CUDA) seeded to `seed`, then restore the outer
    state: the block's randomness no longer depends on what ran before it (e.g. on which results were cached)."""
    cuda = device is not None and device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)   # torch.manual_seed would also reseed CUDA devices not restored here
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)                # this device only
        yield
