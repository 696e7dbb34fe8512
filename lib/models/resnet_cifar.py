"""CIFAR-style residual bodies: kuangliu's ResNet-18/34/50/101 and He et al.'s 6n+2 family (ResNet-20/56/110)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def kaiming_init(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions, unit BN; the initialisation of He et al. and Zagoruyko & Komodakis."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: spatial subsampling plus zero channels, parameter-free."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad = (0, 0, 0, 0, extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], self.pad)


def _projection(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option-B shortcut: 1x1 strided convolution + BN."""
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; `pad_shortcut` selects option A over option B."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, pad_shortcut: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif pad_shortcut:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a projection shortcut where shapes change."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        same = stride == 1 and in_planes == out_planes
        self.shortcut = nn.Identity() if same else _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _stem(in_channels: int, planes: int) -> nn.Sequential:
    """3x3 stride-1 convolution + BN + ReLU, no max-pool (the CIFAR stem)."""
    return nn.Sequential(nn.Conv2d(in_channels, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU())


class ResNet(nn.Module):
    """kuangliu/pytorch-cifar ResNet body: CIFAR stem, four stages (strides 1, 2, 2, 2), global average pool.

    ResNet-18/34 use BasicBlock [2,2,2,2]/[3,4,6,3]; ResNet-50/101 Bottleneck [3,4,6,3]/[3,4,23,3];
    widths 64/128/256/512 at width 1, so feat_dim is 512 (BasicBlock) or 2048 (Bottleneck).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int], in_channels: int,
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        layers: list[nn.Module] = [_stem(in_channels, widths[0])]
        in_planes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, num_blocks, strict=True)):
            for j in range(n):
                layers.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * block.expansion
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feat_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetCifar(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth 6n+2: 16-channel stem, three stages of n BasicBlocks
    (widths 16/32/64, strides 1/2/2) with parameter-free option-A shortcuts, global average pool (feat_dim 64)."""

    def __init__(self, depth: int, in_channels: int, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNetCifar depth must be 6n+2 with n >= 1 (8, 20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        layers: list[nn.Module] = [_stem(in_channels, widths[0])]
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, pad_shortcut=True))
                in_planes = planes
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feat_dim = in_planes
        self.depth = depth
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
