"""CIFAR-style GoogLeNet (kuangliu/pytorch-cifar): 3x3 stem, Inception-v1 blocks a3..b5, global average pool."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

POOL = "M"

# (n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) per Inception block; POOL = 3x3 stride-2 max-pool.
GOOGLENET_CONFIG: list[tuple[int, int, int, int, int, int] | str] = [
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), POOL,                    # a3, b3
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), POOL,                 # a4..e4
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),                      # a5, b5
]
GOOGLENET_STEM = 192


def _conv_bn(in_planes: int, planes: int, kernel: int) -> list[nn.Module]:
    """Convolution ('same' padding) + BN + ReLU."""
    return [nn.Conv2d(in_planes, planes, kernel, padding=kernel // 2), nn.BatchNorm2d(planes), nn.ReLU()]


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1; 1x1->3x3; 1x1->3x3->3x3 (the '5x5'); 3x3 max-pool->1x1."""

    def __init__(self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int):
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*_conv_bn(in_planes, n3x3red, 1), *_conv_bn(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(*_conv_bn(in_planes, n5x5red, 1), *_conv_bn(n5x5red, n5x5, 3), *_conv_bn(n5x5, n5x5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn(in_planes, pool_planes, 1))
        self.out_planes = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    """GoogLeNet body: stem conv3x3, Inception blocks with two padded stride-2 max-pools, global average pool.

    The padded pools (kernel 3, stride 2, padding 1) halve any size >= 2 (8x8 -> 4 -> 2, 32x32 -> 16 -> 8),
    and the adaptive average pool replaces kuangliu's fixed AvgPool2d(8), so every image_size >= 4 works.
    feat_dim is 1024 at full width.
    """

    def __init__(self, in_channels: int, stem: int = GOOGLENET_STEM,
                 config: Sequence[tuple[int, ...] | str] = tuple(GOOGLENET_CONFIG)):
        super().__init__()
        layers: list[nn.Module] = _conv_bn(in_channels, stem, 3)
        planes = stem
        for item in config:
            if item == POOL:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            block = Inception(planes, *item)
            layers.append(block)
            planes = block.out_planes
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feat_dim = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
