"""Shared fixtures: a small classifier trained in seconds on real data (scikit-learn's digits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from lib.models.base import ImageClassifier

torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription


def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def make_digits_cnn(width: int = 16) -> ImageClassifier:
    """A two-conv network for 1x8x8 inputs, normalisation inside."""
    body = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(),
    )
    return ImageClassifier(body, 64, 10, mean=[0.3], std=[0.4])


def train_quickly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Full-batch-ish Adam training; deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in perm.split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_split() -> dict[str, torch.Tensor]:
    """Fixed train/test split of the 1797 digits (first 1397 train, last 400 test after a seeded shuffle)."""
    x, y = _digits_tensors()
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    x, y = x[perm], y[perm]
    return {"x_train": x[:1397], "y_train": y[:1397], "x_test": x[1397:], "y_test": y[1397:]}


@pytest.fixture(scope="session")
def digits_model(digits_split) -> ImageClassifier:
    """Target classifier, about 97% test accuracy; eval mode, parameters frozen."""
    torch.manual_seed(0)
    model = train_quickly(make_digits_cnn(), digits_split["x_train"], digits_split["y_train"], seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def digits_surrogate(digits_split) -> ImageClassifier:
    """An independently initialised and trained classifier, for transfer (black-box) tests."""
    torch.manual_seed(1)
    model = train_quickly(make_digits_cnn(width=12), digits_split["x_train"], digits_split["y_train"], seed=1)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def digits_batch(digits_split) -> tuple[torch.Tensor, torch.Tensor]:
    """200 held-out test images and labels."""
    return digits_split["x_test"][:200], digits_split["y_test"][:200]
