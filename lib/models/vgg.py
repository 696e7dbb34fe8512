"""CIFAR-style VGG with batch norm (kuangliu/pytorch-cifar): conv3x3-BN-ReLU stacks and max-pools, 512-d features."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

POOL = "M"

VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL],
}


class VGG(nn.Module):
    """VGG feature body: the configured convs and pools, then global average pool and flatten (feat_dim = last width).

    A max-pool is kept only while the feature map is at least 2 pixels wide, so small images work:
    32x32 keeps all five pools (-> 1x1, identical to kuangliu's VGG), 8x8 keeps the first three;
    larger images (64x64) end on a 2x2 map that the global average pool reduces.
    """

    def __init__(self, config: Sequence[int | str], in_channels: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for item in config:
            if item == POOL:
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU()]
            channels = int(item)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feat_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
