"""The classifier contract: [0, 1] images in, logits out, normalisation inside the model."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, stored as buffers so it moves with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """normalize -> features -> head. Takes pixels in [0, 1], returns logits.

    Split into `features` (penultimate vector, shape (N, feat_dim)) and `head` (linear layer)
    so that feature-space defenses (IDFR's restorer) and activation analyses can reach inside.
    """

    def __init__(self, features: nn.Module, feat_dim: int, num_classes: int,
                 mean: Sequence[float], std: Sequence[float], head: nn.Module | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = features
        self.head = head if head is not None else nn.Linear(feat_dim, num_classes)
        self.feat_dim = feat_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feat_dim) of a [0, 1] batch."""
        return self.body(self.normalize(x))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features."""
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
