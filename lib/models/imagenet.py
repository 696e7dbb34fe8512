"""torchvision ImageNet models (ResNet-50, Inception-v3) split into feature body and fc head, optionally pretrained.

Pretrained weights are torchvision's published files, kept in $TORCH_HOME/hub/checkpoints. A file found there
(downloaded earlier or copied in by hand) is checked against the hash published in its name before it is read,
and read with torch.load(weights_only=True): a damaged or planted file never runs code. When the weights cannot
be had (offline, no file) the builders raise a RuntimeError saying how to fetch them, never falling back to
random weights.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MIN_SIZE = 75


def _check_imagenet_input(arch: str, in_channels: int, mean: Sequence[float], std: Sequence[float],
                          pretrained: bool, width: float) -> None:
    """ImageNet architectures are RGB with fixed widths; pretrained weights expect ImageNet normalisation."""
    if in_channels != 3:
        raise ValueError(f"{arch} takes RGB images (in_channels=3), got in_channels={in_channels}")
    if width != 1.0:
        raise ValueError(f"{arch} has torchvision's fixed widths; width must be 1.0, got {width} "
                         f"(use a CIFAR-style architecture such as resnet50 for scaled-down runs)")
    close = all(abs(a - b) < 1e-3 for a, b in zip(list(mean) + list(std), IMAGENET_MEAN + IMAGENET_STD, strict=True))
    if pretrained and not close:
        raise ValueError(f"pretrained {arch} weights expect the ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD}, "
                         f"got mean {tuple(mean)} and std {tuple(std)}")


def _weights_path_help(weights: torchvision.models.WeightsEnum, builder: str) -> str:
    """Where torchvision caches a weights file and how to put it there by hand."""
    filename = weights.url.rsplit("/", 1)[-1]
    folder = f"{torch.hub.get_dir()}/checkpoints"
    return (f"torchvision looks for the weights file {filename} in {folder} ($TORCH_HOME/hub/checkpoints; "
            f"TORCH_HOME defaults to ~/.cache/torch). On a machine with network access run\n"
            f"  python -c \"import torchvision; torchvision.models.{builder}(weights='{weights.name}')\"\n"
            f"(or download {weights.url}) and copy {filename} into {folder} on this machine.")


def weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps the weights file of `weights` ($TORCH_HOME/hub/checkpoints/<file name of its URL>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def published_hash_prefix(path: Path) -> str:
    """The SHA-256 prefix torchvision publishes in a weights file's name (resnet50-0676ba61.pth -> 0676ba61)."""
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None:
        raise ValueError(f"{path.name} carries no published hash")
    return match.group(1)


def verified_state_dict(path: Path, expected_prefix: str, help_text: str = "") -> dict:
    """Read a weights file only if its SHA-256 starts with `expected_prefix`, and then with weights_only=True."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(expected_prefix):
        raise RuntimeError(f"{path} does not match its published hash (SHA-256 starts with "
                           f"{digest.hexdigest()[:len(expected_prefix)]}, expected {expected_prefix}): it is damaged "
                           f"or not the published file, and was not read. Delete it and fetch it again.\n{help_text}")
    return torch.load(path, map_location="cpu", weights_only=True)


def fetch_weights(weights_enum: type[torchvision.models.WeightsEnum], weights_name: str, builder: str) -> dict:
    """State dict of published torchvision weights (a verified local file, or downloaded and verified);
    RuntimeError saying how to get them."""
    try:
        weights = weights_enum[weights_name]
    except KeyError:
        valid = ", ".join(w.name for w in weights_enum)
        raise ValueError(f"unknown weights {weights_name!r} for {builder}; valid: {valid}") from None
    path = weights_file(weights)
    help_text = _weights_path_help(weights, builder)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=published_hash_prefix(path))
        except Exception as exc:  # offline or a failed download: say how to get it, never go on unweighted
            raise RuntimeError(f"could not load pretrained {builder} weights {weights_enum.__name__}.{weights.name} "
                               f"({type(exc).__name__}: {exc}).\n{help_text}") from exc
    return verified_state_dict(path, published_hash_prefix(path), help_text)


def _replace_head(fc: nn.Linear, num_classes: int) -> nn.Linear:
    """Keep the published 1000-class fc when it fits, else a fresh Linear on the same features (fine-tuning)."""
    return fc if fc.out_features == num_classes else nn.Linear(fc.in_features, num_classes)


def resnet50_imagenet(*, num_classes: int, in_channels: int, image_size: int, mean: Sequence[float],
                      std: Sequence[float], width: float = 1.0, pretrained: bool = False,
                      weights: str = "IMAGENET1K_V1") -> tuple[nn.Module, int, nn.Module]:
    """torchvision ResNet-50 as (body up to the pooled 2048-d vector, feat_dim, fc head).

    Pretrained uses IMAGENET1K_V1 (76.1% top-1, the classic weights) unless `weights` names another;
    with num_classes != 1000 (e.g. Tiny-ImageNet's 200) the fc is replaced by a fresh layer.
    """
    _check_imagenet_input("resnet50_imagenet", in_channels, mean, std, pretrained, width)
    if image_size < 32:
        raise ValueError(f"resnet50_imagenet needs image_size >= 32, got {image_size}")
    net = torchvision.models.resnet50(weights=None)
    if pretrained:
        net.load_state_dict(fetch_weights(torchvision.models.ResNet50_Weights, weights, "resnet50"))
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    body = nn.Sequential(OrderedDict([(n, getattr(net, n)) for n in names] + [("flatten", nn.Flatten())]))
    return body, net.fc.in_features, _replace_head(net.fc, num_classes)


class InceptionInputTransform(nn.Module):
    """torchvision's Inception `transform_input`: turns ImageNet-normalised input into (x - 0.5) / 0.5,
    the normalisation the TF-ported pretrained weights expect."""

    def __init__(self) -> None:
        super().__init__()
        # constants computed in double precision, as torchvision does, so outputs match it bit for bit
        self.register_buffer("scale", torch.tensor([s / 0.5 for s in IMAGENET_STD]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([(m - 0.5) / 0.5 for m in IMAGENET_MEAN]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def inception_v3(*, num_classes: int, in_channels: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], width: float = 1.0, pretrained: bool = False,
                 weights: str = "IMAGENET1K_V1") -> tuple[nn.Module, int, nn.Module]:
    """torchvision Inception-v3 as (body up to the pooled 2048-d vector, feat_dim, fc head).

    The auxiliary classifier is dropped (aux_logits=False): it only serves training losses. Inputs of 299x299
    are what the network was designed and pretrained for; anything >= 75 runs. With pretrained weights the body
    starts with torchvision's transform_input step, as torchvision.models.inception_v3 does.
    """
    _check_imagenet_input("inception_v3", in_channels, mean, std, pretrained, width)
    if image_size < INCEPTION_MIN_SIZE:
        raise ValueError(f"inception_v3 needs image_size >= {INCEPTION_MIN_SIZE} (299 recommended), got {image_size}")
    if pretrained:  # the configuration torchvision.models.inception_v3 uses for its published weights
        state = fetch_weights(torchvision.models.Inception_V3_Weights, weights, "inception_v3")
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
        net.load_state_dict(state)
    else:
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    layers = [(n, m) for n, m in net.named_children() if n not in ("AuxLogits", "fc")]
    if net.transform_input:
        layers.insert(0, ("transform_input", InceptionInputTransform()))
    body = nn.Sequential(OrderedDict(layers + [("flatten", nn.Flatten())]))
    return body, net.fc.in_features, _replace_head(net.fc, num_classes)
