"""LeNet-5 feature bodies: advertorch's MNIST LeNet5 (paper 004) and the classic 6-16-120-84 LeNet (paper 003)."""
from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """advertorch.test_utils.LeNet5 without its last layer: conv32-pool-conv64-pool-fc200 (spec-004 §3.2).

    Convolutions are 3x3 with padding 1, so any image_size >= 4 works unchanged (8x8 -> 4 -> 2);
    the flattened size is channels[1] * (image_size // 4) ** 2 (3136 on 28x28, as in advertorch).
    """

    def __init__(self, in_channels: int, image_size: int, channels: tuple[int, int] = (32, 64), hidden: int = 200):
        super().__init__()
        c1, c2 = channels
        side = image_size // 4
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(),
        )
        self.feat_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5Classic(nn.Module):
    """Modern LeNet-5 without its last layer: conv6(5x5, pad 2)-pool-conv16(5x5)-pool-fc120-fc84 (spec-003 §2.6).

    The second convolution is unpadded as in LeNet when image_size >= 12 (28x28 -> 400 flattened); on smaller
    images it gets padding 2, because an unpadded 5x5 kernel would leave no pixels (8x8 -> 4 -> 4 -> 2).
    """

    def __init__(self, in_channels: int, image_size: int, channels: tuple[int, int] = (6, 16),
                 hidden: tuple[int, int] = (120, 84)):
        super().__init__()
        c1, c2 = channels
        h1, h2 = hidden
        side = image_size // 2
        pad2 = 0 if side >= 6 else 2
        side = (side + 2 * pad2 - 4) // 2
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * side * side, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
        )
        self.feat_dim = h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
