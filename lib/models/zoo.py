"""Classifier registry: build any architecture by name as an ImageClassifier, scaled by `width` (and `depth`)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

from torch import nn

from lib.models import imagenet
from lib.models.base import ImageClassifier
from lib.models.googlenet import GOOGLENET_CONFIG, GOOGLENET_STEM, GoogLeNet
from lib.models.lenet import LeNet5, LeNet5Classic
from lib.models.resnet_cifar import BasicBlock, Bottleneck, ResNet, ResNetCifar
from lib.models.small import LisaCNN, SmallCNN, SmallVGG
from lib.models.vgg import POOL, VGG, VGG_CONFIGS
from lib.models.wideresnet import WideResNet
from lib.validate import check_positive_int

if TYPE_CHECKING:
    from lib.data import DatasetInfo

MIN_IMAGE_SIZE = 8
MIN_CHANNELS = 4


def scale_channels(channels: int, width: float) -> int:
    """Channel count times `width`, rounded, never below MIN_CHANNELS."""
    return max(MIN_CHANNELS, int(round(channels * width)))


def _lenet5(in_channels: int, image_size: int, width: float) -> nn.Module:
    c1, c2, hidden = (scale_channels(c, width) for c in (32, 64, 200))
    return LeNet5(in_channels, image_size, (c1, c2), hidden)


def _lenet5_classic(in_channels: int, image_size: int, width: float) -> nn.Module:
    c1, c2, h1, h2 = (scale_channels(c, width) for c in (6, 16, 120, 84))
    return LeNet5Classic(in_channels, image_size, (c1, c2), (h1, h2))


_RESNET_STAGES = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                  50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


def _resnet(in_channels: int, image_size: int, width: float, depth: int) -> nn.Module:
    block, blocks = _RESNET_STAGES[depth]
    return ResNet(block, blocks, in_channels, [scale_channels(c, width) for c in (64, 128, 256, 512)])


def _resnet_cifar(in_channels: int, image_size: int, width: float, depth: int) -> nn.Module:
    return ResNetCifar(depth, in_channels, [scale_channels(c, width) for c in (16, 32, 64)])


def _wrn(in_channels: int, image_size: int, width: float, depth: int,
         widen_factor: int = 10, dropout: float = 0.3) -> nn.Module:
    check_positive_int(widen_factor, "widen_factor")
    widths = [scale_channels(16, width)] + [scale_channels(c * widen_factor, width) for c in (16, 32, 64)]
    return WideResNet(depth, in_channels, widths, dropout)


def _vgg(in_channels: int, image_size: int, width: float, depth: int) -> nn.Module:
    config = [c if c == POOL else scale_channels(int(c), width) for c in VGG_CONFIGS[depth]]
    return VGG(config, in_channels, image_size)


def _googlenet(in_channels: int, image_size: int, width: float) -> nn.Module:
    config = [b if b == POOL else tuple(scale_channels(c, width) for c in b) for b in GOOGLENET_CONFIG]
    return GoogLeNet(in_channels, scale_channels(GOOGLENET_STEM, width), config)


def _smallcnn(in_channels: int, image_size: int, width: float) -> nn.Module:
    return SmallCNN(in_channels, [scale_channels(c, width) for c in (16, 32, 64)])


def _smallvgg(in_channels: int, image_size: int, width: float) -> nn.Module:
    return SmallVGG(in_channels, [scale_channels(c, width) for c in (16, 32, 64)])


def _lisacnn(in_channels: int, image_size: int, width: float) -> nn.Module:
    return LisaCNN(in_channels, image_size, [scale_channels(c, width) for c in (64, 128, 128)])


class _Entry(NamedTuple):
    """A from-scratch architecture: body factory, the depth its name implies, whether `depth` may change it."""

    factory: Callable[..., nn.Module]
    depth: int | None = None
    depth_override: bool = False


_SCRATCH: dict[str, _Entry] = {
    "googlenet": _Entry(_googlenet),
    "lenet5": _Entry(_lenet5),
    "lenet5_classic": _Entry(_lenet5_classic),
    "lisacnn": _Entry(_lisacnn),
    "resnet18": _Entry(_resnet, 18),
    "resnet34": _Entry(_resnet, 34),
    "resnet50": _Entry(_resnet, 50),
    "resnet101": _Entry(_resnet, 101),
    "resnet20": _Entry(_resnet_cifar, 20),
    "resnet56": _Entry(_resnet_cifar, 56),
    "resnet110": _Entry(_resnet_cifar, 110),
    "resnet_cifar": _Entry(_resnet_cifar, 20, depth_override=True),
    "smallcnn": _Entry(_smallcnn),
    "smallvgg": _Entry(_smallvgg),
    "vgg11": _Entry(_vgg, 11),
    "vgg13": _Entry(_vgg, 13),
    "vgg16": _Entry(_vgg, 16),
    "vgg19": _Entry(_vgg, 19),
    "wrn": _Entry(_wrn, 28, depth_override=True),
}

_TORCHVISION: dict[str, Callable[..., tuple[nn.Module, int, nn.Module]]] = {
    "inception_v3": imagenet.inception_v3,
    "resnet50_imagenet": imagenet.resnet50_imagenet,
}

ARCHITECTURES: tuple[str, ...] = tuple(sorted({**_SCRATCH, **_TORCHVISION}))


def _check_common(arch: str, num_classes: int, in_channels: int, image_size: int,
                  mean: Sequence[float], std: Sequence[float], width: float) -> None:
    """Reject unknown names and malformed sizes before anything is built."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHITECTURES)}")
    check_positive_int(num_classes, "num_classes")
    check_positive_int(in_channels, "in_channels")
    check_positive_int(image_size, "image_size")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need one value per channel ({in_channels}), "
                         f"got {len(mean)} and {len(std)}")
    if not all(s > 0 for s in std):
        raise ValueError(f"std must be positive, got {tuple(std)}")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a finite number > 0, got {width}")


def build_classifier(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                     mean: Sequence[float], std: Sequence[float], width: float = 1.0, depth: int | None = None,
                     pretrained: bool = False, **kwargs) -> ImageClassifier:
    """Build `arch` as an ImageClassifier taking [0, 1] images of in_channels x image_size x image_size.

    `width` multiplies every channel count (minimum 4). `depth` may change the depth of the families that take
    it (resnet_cifar: 6n+2, default 20; wrn: 6n+4, default 28); for other names it must be None or the depth the
    name states. Extra keyword arguments go to the architecture (wrn: widen_factor=10, dropout=0.3;
    torchvision models: weights='IMAGENET1K_V1'). Only resnet50_imagenet and inception_v3 can be pretrained.
    """
    _check_common(arch, num_classes, in_channels, image_size, mean, std, width)
    if arch in _TORCHVISION:
        if depth is not None:
            raise ValueError(f"{arch} has a fixed depth; depth must be None, got {depth}")
        body, feat_dim, head = _TORCHVISION[arch](num_classes=num_classes, in_channels=in_channels,
                                                  image_size=image_size, mean=mean, std=std, width=width,
                                                  pretrained=pretrained, **kwargs)
        return ImageClassifier(body, feat_dim, num_classes, mean, std, head=head)
    if pretrained:
        raise ValueError(f"{arch} has no published weights to load; train it, or use one of {sorted(_TORCHVISION)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    entry = _SCRATCH[arch]
    if depth is not None and depth != entry.depth and not entry.depth_override:
        fixed = "has no depth parameter" if entry.depth is None else f"has depth {entry.depth} by its name"
        raise ValueError(f"{arch} {fixed}; got depth={depth} (depth can be set for resnet_cifar and wrn)")
    if entry.depth is None:
        body = entry.factory(in_channels, image_size, width, **kwargs)
    else:
        body = entry.factory(in_channels, image_size, width, depth if depth is not None else entry.depth, **kwargs)
    return ImageClassifier(body, body.feat_dim, num_classes, mean, std)


# keys of a profile's classifier spec that go to the architecture itself (wrn: widen_factor, dropout; torchvision
# models: which published weights)
ARCH_KEYWORDS: tuple[str, ...] = ("widen_factor", "dropout", "weights")


def classifier_from_spec(spec: Mapping[str, Any], info: "DatasetInfo") -> ImageClassifier:
    """An untrained (or published, with `pretrained: true`) classifier of a profile's spec for the dataset `info`
    describes: `arch`, `width`, `depth`, `pretrained` and ARCH_KEYWORDS (e.g. WRN-28-20 is arch wrn, depth 28,
    widen_factor 20). Pretrained torchvision weights get the ImageNet normalisation they were trained with."""
    pretrained = bool(spec.get("pretrained", False))
    mean, std = (imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD) if pretrained else (info.mean, info.std)
    return build_classifier(spec["arch"], num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, mean=mean, std=std, width=spec.get("width", 1.0),
                            depth=spec.get("depth"), pretrained=pretrained,
                            **{k: spec[k] for k in ARCH_KEYWORDS if k in spec})


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameter elements, counting shared tensors once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
