"""IDFR's networks (spec-001 §2.3, §2.5): the U-Net input denoiser I_w (Table 6), the MLP feature restorer F_pi
(Table 7), and the defended classifier f_cls(F_pi(f_enc(I_w(x)))) as one module.

The target f = f_cls o f_enc is any lib.models.ImageClassifier: `features(x)` is f_enc (penultimate embedding),
`head(h)` is f_cls. Both stay frozen; only I_w and F_pi are trained (lib.defenses.idfr.training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.validate import check_positive_int

SKIP8 = ("layer2", "layer1")
OUT_ACTS = ("bn_relu", "linear")


def _scale(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class InputDenoiser(nn.Module):
    """Table 6 U-Net: L1-L2 (32), L3-L4 (64, stride 2), L5 (128, stride 2), cat(a3, up a5) -> L6 (192) -> L7 (64),
    cat(skip, up a7) -> L8 (96) -> L9 (in_channels); output x + r (residual, authors' code), clamped to [0, 1].

    skip8: which 32-channel map feeds L8 ("layer2" = paper text, "layer1" = authors' code). out_act: L9 as in
    Table 6 (conv+BN+ReLU, so r >= 0) or a plain conv ("linear"). Upsampling is bilinear (align_corners=True) to the
    skip tensor's exact size, so any image size works. clamp01 keeps the project's [0, 1] contract (the paper has none).
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, skip8: str = "layer2", out_act: str = "bn_relu",
                 residual: bool = True, clamp01: bool = True):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if skip8 not in SKIP8:
            raise ValueError(f"skip8 must be one of {SKIP8}, got {skip8!r}")
        if out_act not in OUT_ACTS:
            raise ValueError(f"out_act must be one of {OUT_ACTS}, got {out_act!r}")
        c1, c3, c5 = (_scale(c, width) for c in (32, 64, 128))
        self.skip8, self.residual, self.clamp01 = skip8, residual, clamp01
        self.l1, self.l2 = _conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1)
        self.l3, self.l4 = _conv_bn_relu(c1, c3, 2), _conv_bn_relu(c3, c3)
        self.l5 = _conv_bn_relu(c3, c5, 2)
        self.l6, self.l7 = _conv_bn_relu(c3 + c5, c3 + c5), _conv_bn_relu(c3 + c5, c3)
        self.l8 = _conv_bn_relu(c1 + c3, c1 + c3)
        self.l9 = (_conv_bn_relu(c1 + c3, in_channels) if out_act == "bn_relu"
                   else nn.Conv2d(c1 + c3, in_channels, 3, padding=1))

    @staticmethod
    def _up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.l1(x)
        a2 = self.l2(a1)
        a3 = self.l3(a2)
        a5 = self.l5(self.l4(a3))
        a7 = self.l7(self.l6(torch.cat([a3, self._up(a5, a3)], 1)))
        skip = a2 if self.skip8 == "layer2" else a1
        r = self.l9(self.l8(torch.cat([skip, self._up(a7, skip)], 1)))
        out = x + r if self.residual else r
        return out.clamp(0.0, 1.0) if self.clamp01 else out


def restorer_dims(dim: int) -> tuple[int, int, int]:
    """Hidden sizes of the FR encoder: Table 7's 512 -> 256 -> 128 -> 32, as ratios d/2, d/4, max(d/16, 16)."""
    check_positive_int(dim, "dim")
    return max(dim // 2, 1), max(dim // 4, 1), max(dim // 16, 16)


class FeatureRestorer(nn.Module):
    """Table 7: d -> d/2 -> d/4 -> d/16 -> d/4 -> d/2 -> d, Linear + ReLU after every layer (output >= 0, like the
    post-ReLU features it replaces). skips=True adds the authors' Keras skips (L1 out -> L5 out, L2 out -> L4 out)."""

    def __init__(self, dim: int, skips: bool = False):
        super().__init__()
        h1, h2, h3 = restorer_dims(dim)
        sizes = [dim, h1, h2, h3, h2, h1, dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.skips = skips
        self.dim = dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"FeatureRestorer({self.dim}) needs features of shape (N, {self.dim}), got {tuple(h.shape)}")
        outs = []
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(h))
            if self.skips and i in (3, 4):
                h = h + outs[4 - i if i == 3 else 0]  # L4 += L2 out, L5 += L1 out
            outs.append(h)
        return h


class IDFRClassifier(nn.Module):
    """f_cls(F_pi(f_enc(I_w(x)))): the defended classifier as one differentiable module.

    `classifier` must expose features(x) and head(h) (lib.models.ImageClassifier). denoiser or restorer None
    leaves that stage out (Table 5's ablation: none / ID / FR / ID+FR; the contract's feature-restored classifier
    is the one without a denoiser, placed behind the InputDenoising defense).
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module | None = None, restorer: nn.Module | None = None):
        super().__init__()
        if not (hasattr(classifier, "features") and hasattr(classifier, "head")):
            raise ValueError("IDFRClassifier needs a classifier with features(x) and head(h) (an ImageClassifier)")
        self.classifier, self.denoiser, self.restorer = classifier, denoiser, restorer

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Restored penultimate features F_pi(f_enc(I_w(x)))."""
        h = self.classifier.features(self.denoiser(x) if self.denoiser is not None else x)
        return self.restorer(h) if self.restorer is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(self.embed(x))
