"""Small bodies for smoke runs, CPU surrogates and LISA: SmallCNN, SmallVGG (spec-001) and LISA-CNN (spec-004)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _conv_relu(in_planes: int, planes: int) -> list[nn.Module]:
    """3x3 'same' convolution + ReLU."""
    return [nn.Conv2d(in_planes, planes, 3, padding=1), nn.ReLU()]


def _stage(in_planes: int, planes: int, convs: int) -> list[nn.Module]:
    """`convs` conv-ReLU pairs, the first changing the channel count."""
    layers = _conv_relu(in_planes, planes)
    for _ in range(convs - 1):
        layers += _conv_relu(planes, planes)
    return layers


class SmallCNN(nn.Module):
    """Three stages of 3x3 conv-ReLU (max-pool after the first two), global average pool (feat_dim = channels[2])."""

    convs_per_stage = 1

    def __init__(self, in_channels: int, channels: Sequence[int] = (16, 32, 64)):
        super().__init__()
        c1, c2, c3 = channels
        k = self.convs_per_stage
        self.layers = nn.Sequential(
            *_stage(in_channels, c1, k), nn.MaxPool2d(2),
            *_stage(c1, c2, k), nn.MaxPool2d(2),
            *_conv_relu(c2, c3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feat_dim = c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallVGG(SmallCNN):
    """spec-001's CPU target: conv16-16-pool-32-32-pool-64, global average pool (feat_dim = channels[2])."""

    convs_per_stage = 2


class LisaCNN(nn.Module):
    """LISA-CNN body (Eykholt et al. 2018): conv64 8x8/2 'same', conv128 6x6/2, conv128 5x5/1, ReLUs, flatten.

    The last two convolutions are unpadded ('valid', as in the original) when image_size >= 28 (32x32 -> 16 -> 6 -> 2,
    feat_dim 512); on smaller images they get padding 2 so the map does not vanish (8x8 -> 4 -> 2 -> 2).
    """

    def __init__(self, in_channels: int, image_size: int, channels: Sequence[int] = (64, 128, 128)):
        super().__init__()
        c1, c2, c3 = channels
        side = image_size // 2
        pad = 0 if side >= 14 else 2
        side = (side + 2 * pad - 6) // 2 + 1
        side = side + 2 * pad - 4
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, 8, stride=2, padding=3), nn.ReLU(),
            nn.Conv2d(c1, c2, 6, stride=2, padding=pad), nn.ReLU(),
            nn.Conv2d(c2, c3, 5, padding=pad), nn.ReLU(), nn.Flatten(),
        )
        self.feat_dim = c3 * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
