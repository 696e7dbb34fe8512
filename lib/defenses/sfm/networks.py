"""SFM-Defense's networks: the mask generator G (an Attention U-Net, spec-000 §2.2) and the modules built around it.

`AttentionUNet` predicts one sigmoid mask channel; `MaskedClassifier` is F(x * G(x)), the model a gray-box attacker
differentiates; `SFMPair` holds F and G together so that Algorithm 1's two networks are cached as one module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.validate import check_positive_int


class _ConvBlock(nn.Sequential):
    """[Conv3x3 -> BatchNorm -> ReLU] x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpConv(nn.Sequential):
    """Nearest x2 upsampling -> Conv3x3 -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _AttentionGate(nn.Module):
    """Oktay et al. 2018 additive attention: skip * sigmoid(BN(conv(relu(BN(conv g) + BN(conv skip)))))."""

    def __init__(self, f_g: int, f_l: int, f_int: int):
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(f_g, f_int, 1), nn.BatchNorm2d(f_int))
        self.w_x = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.BatchNorm2d(f_int))
        self.psi = nn.Sequential(nn.Conv2d(f_int, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(F.relu(self.w_g(g) + self.w_x(skip)))


class AttentionUNet(nn.Module):
    """The mask generator G: Attention U-Net (AttU_Net layout), C channels in, one sigmoid channel out.

    base_width b and depth d (resolution levels, d - 1 poolings) set the size; the paper's scale is
    b = 64, d = 5 (about 35 M parameters). The d - 1 poolings need sides divisible by 2 ** (d - 1): any other
    side (28 for MNIST, 8 for the smoke digits) is padded by edge replication to the next multiple and the mask is
    cropped back, so the output always has the input's height and width.
    """

    def __init__(self, in_channels: int, base_width: int = 64, depth: int = 5):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_width, "base_width")
        if int(depth) != depth or depth < 2:
            raise ValueError(f"depth must be an integer >= 2 (levels of the U-Net), got {depth}")
        widths = [base_width * 2 ** i for i in range(depth)]
        self.depth = depth
        self.encoders = nn.ModuleList([_ConvBlock(in_channels, widths[0])] +
                                      [_ConvBlock(widths[i - 1], widths[i]) for i in range(1, depth)])
        self.ups = nn.ModuleList([_UpConv(widths[i], widths[i - 1]) for i in range(depth - 1, 0, -1)])
        self.gates = nn.ModuleList([_AttentionGate(widths[i - 1], widths[i - 1], max(1, widths[i - 1] // 2))
                                    for i in range(depth - 1, 0, -1)])
        self.decoders = nn.ModuleList([_ConvBlock(2 * widths[i - 1], widths[i - 1]) for i in range(depth - 1, 0, -1)])
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"AttentionUNet needs (N, C, H, W), got {tuple(x.shape)}")
        factor = 2 ** (self.depth - 1)
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % factor, -width % factor
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:   # replicate, not reflect: reflection needs the pad smaller than the side (8 -> 16 is not)
            x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode="replicate")
        return self._mask(x)[..., top:top + height, left:left + width]

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask of an input whose sides are divisible by 2 ** (depth - 1)."""
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(F.max_pool2d(h, 2) if i else h)
            skips.append(h)
        for up, gate, dec, skip in zip(self.ups, self.gates, self.decoders, reversed(skips[:-1])):
            h = up(h)
            h = dec(torch.cat([gate(h, skip), h], dim=1))
        return torch.sigmoid(self.out(h))


class MaskedClassifier(nn.Module):
    """F(x * G(x)): the gray-box attack surface (classifier and masker known, squeezer T not)."""

    def __init__(self, classifier: nn.Module, masker: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.masker = masker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x * self.masker(x))


class SFMPair(nn.Module):
    """Classifier F and masker G as one module, so Algorithm 1's two networks are cached together."""

    def __init__(self, classifier: nn.Module, masker: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.masker = masker
