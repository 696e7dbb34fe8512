"""Wide residual network body (Zagoruyko & Komodakis 2016), as in the widely used xternalz/WideResNet-pytorch."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lib.models.resnet_cifar import kaiming_init


class WideBasic(nn.Module):
    """Pre-activation BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3; 1x1 shortcut on the activated input if shapes differ."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.equal = stride == 1 and in_planes == planes
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-d-k body: 3x3 stem (16), three stages of (d-4)/6 WideBasic blocks with widths 16k/32k/64k
    (strides 1/2/2), final BN-ReLU and global average pool; feat_dim = 64k."""

    def __init__(self, depth: int, in_channels: int, widths: Sequence[int] = (16, 160, 320, 640), dropout: float = 0.3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 28, 40, ...), got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        in_planes = widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBasic(in_planes, planes, 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = planes
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feat_dim = in_planes
        self.depth = depth
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
