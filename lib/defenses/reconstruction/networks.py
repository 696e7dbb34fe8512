"""Paper 003's reconstruction network R_θ: an EDSR body (Lim et al. 2017) without batch norm (spec-003 §2.3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from lib.validate import check_positive_int


class ResBlock(nn.Module):
    """EDSR residual block without batch norm: x + res_scale · conv(relu(conv(x)))."""

    def __init__(self, n_feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feats, n_feats, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class EDSRRestorer(nn.Module):
    """EDSR (Lim et al. 2017) body: head conv, n_blocks ResBlocks, body-tail conv + global skip, tail (§2.3).

    scale = 1 (the default reading) keeps the resolution; scale 2 or 4 puts EDSR's up-sampler
    (log2(scale) x [conv F->4F, PixelShuffle(2)]) before the last conv. The output is not squashed;
    ReconstructionDefense clamps it to [0, 1].
    """

    def __init__(self, in_channels: int = 1, n_feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0,
                 scale: int = 1):
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (n_feats, "n_feats"), (n_blocks, "n_blocks")):
            check_positive_int(value, name)
        if scale not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
        if not res_scale > 0:
            raise ValueError(f"res_scale must be > 0, got {res_scale}")
        self.in_channels, self.n_feats, self.n_blocks, self.res_scale, self.scale = (
            in_channels, n_feats, n_blocks, float(res_scale), scale)
        self.head = nn.Conv2d(in_channels, n_feats, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_blocks)],
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        upsampler: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            upsampler += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2)]
        self.tail = nn.Sequential(*upsampler, nn.Conv2d(n_feats, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.body(h) + h)


def _conv3x3_parameters(c_in: int, c_out: int) -> int:
    """Weights and biases of one 3x3 convolution."""
    return 9 * c_in * c_out + c_out


def edsr_parameter_count(in_channels: int, n_feats: int, n_blocks: int, scale: int = 1) -> int:
    """Closed form of EDSRRestorer's parameter count (3x3 convolutions with biases), as in spec §2.3."""
    ups = int(math.log2(scale)) * _conv3x3_parameters(n_feats, 4 * n_feats)
    return (_conv3x3_parameters(in_channels, n_feats) + (2 * n_blocks + 1) * _conv3x3_parameters(n_feats, n_feats)
            + ups + _conv3x3_parameters(n_feats, in_channels))
