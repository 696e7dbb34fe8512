"""Activation analysis for any classifier: per-channel max activations (RegionSparse Sec. III, Fig. 1), the
total activation of a layer (Eq. 7) and its adversarial/benign ratio per layer, and class activation maps
(exact CAM for global-average-pool + linear heads, Grad-CAM from the grad-cam package for the rest).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lib.validate import check_images

# leaf modules whose outputs count as "detector" activations by default: post-ReLU maps and global pooling
# (local max-pooling is left out: it leaves every channel's global maximum unchanged)
_DEFAULT_TYPES = (nn.ReLU, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the model's ReLU and global-pooling modules (the hook points of the activation analysis)."""
    names = [n for n, m in model.named_modules() if isinstance(m, _DEFAULT_TYPES)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no ReLU or pooling modules; pass layer names explicitly")
    return names


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None,
                  record: Callable[[str, torch.Tensor], None]) -> list[str]:
    """One forward pass of x with `record(name, output)` called for every output of the named layers (default:
    default_layers); returns the layer names. Hooks are removed even when the forward pass fails."""
    check_images(x)
    layers = list(layers or default_layers(model))
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; valid names include {default_layers(model)[:8]}")

    def hook(name: str):
        return lambda _module, _inputs, output: record(name, output.detach())

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return layers


def channel_max_activations(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None
                            ) -> dict[str, torch.Tensor]:
    """p_l = per-channel global max of each layer's output, (N, C), in forward-execution order.

    A layer with a 2-D output (N, C) (e.g. after global pooling) is returned as it is.
    """
    found: dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        found[name] = out.flatten(2).amax(2) if out.dim() > 2 else out

    layer_outputs(model, x, layers, record)
    return {n: found[n].cpu() for n in found}


def total_activation(p: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """Eq. 7: V = sum over channels with p > gamma of p * sign(p - gamma), i.e. the sum of p above gamma, per row."""
    return torch.where(p > gamma, p * torch.sign(p - gamma), torch.zeros_like(p)).sum(-1)


def activation_ratios(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, layers: Sequence[str] | None = None,
                      gamma: float = 0.0) -> pd.DataFrame:
    """Per layer (forward order): mean V over benign and adversarial images and their ratio R = V_adv / V_benign."""
    benign = channel_max_activations(model, x, layers)
    adv = channel_max_activations(model, x_adv, layers)
    rows = []
    for index, name in enumerate(benign):
        vb, va = float(total_activation(benign[name], gamma).mean()), float(total_activation(adv[name], gamma).mean())
        rows.append({"layer index": index, "layer": name, "channels": benign[name].shape[1], "gamma": gamma,
                     "V benign": vb, "V adversarial": va, "ratio": va / vb if vb > 0 else float("nan")})
    return pd.DataFrame(rows)


def activation_grid(p: torch.Tensor) -> np.ndarray:
    """Lay a C-vector out as a near-square 2-D grid for the Fig. 1 heat map: rows = the largest divisor of C not
    above sqrt(C) when that is at least half of sqrt(C) (32 -> 4x8, 2048 -> 32x64), else floor(sqrt(C)), zero-padded."""
    v = p.detach().cpu().flatten().numpy()
    root = math.sqrt(len(v))
    divisor = max(d for d in range(1, int(root) + 1) if len(v) % d == 0)
    rows = divisor if divisor >= root / 2 else max(1, int(root))
    cols = math.ceil(len(v) / rows)
    out = np.zeros(rows * cols, dtype=v.dtype)
    out[:len(v)] = v
    return out.reshape(rows, cols)


def _gap_linear_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(module producing the pre-pool maps, linear head) if the model ends in global-average-pool + Linear."""
    head = getattr(model, "head", None)
    body = getattr(model, "body", None)
    if not isinstance(head, nn.Linear) or body is None:
        return None
    pools = [m for m in body.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools or pools[-1].output_size not in (1, (1, 1)):
        return None
    return pools[-1], head


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.flatten(1).amin(1).view(-1, 1, 1)
    hi = maps.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(hi > lo, (maps - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(maps))


@torch.no_grad()
def class_activation_map(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Exact CAM (Zhou et al. 2016) for global-average-pool + linear models: ReLU(sum_k w_ck F_k), bilinearly
    upsampled to the input and min-max normalised per image, (N, H, W) in [0, 1]; classes default to top-1."""
    parts = _gap_linear_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} does not end in global average pooling + Linear; use grad_cam")
    pool, head = parts
    grabbed: list[torch.Tensor] = []
    handle = pool.register_forward_hook(lambda _m, inputs, _o: grabbed.append(inputs[0].detach()))
    try:
        logits = model(x)
    finally:
        handle.remove()
    feats = grabbed[0]                                     # (N, K, h, w)
    classes = logits.argmax(1) if classes is None else classes.to(logits.device)
    weights = head.weight[classes]                         # (N, K)
    maps = F.relu(torch.einsum("nk,nkhw->nhw", weights, feats))
    maps = F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _normalise(maps).cpu()


def last_conv(model: nn.Module) -> nn.Module:
    """The model's last Conv2d module (Grad-CAM's usual target layer)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
             layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W) in [0, 1] from the grad-cam package, at `layer` (default: the last Conv2d)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    check_images(x)
    with torch.no_grad():
        classes = model(x).argmax(1) if classes is None else classes
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with GradCAM(model=model, target_layers=[layer or last_conv(model)]) as cam:
        maps = torch.from_numpy(cam(input_tensor=x, targets=targets))
    return _normalise(maps.float())


def cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Exact CAM where the architecture allows it, else Grad-CAM; returns (maps, method name)."""
    if _gap_linear_parts(model) is not None:
        return class_activation_map(model, x, classes), "CAM"
    return grad_cam(model, x, classes), "Grad-CAM"


def cam_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of two batches of maps thresholded at `threshold` (per image)."""
    ma, mb = a >= threshold, b >= threshold
    inter = (ma & mb).flatten(1).sum(1).float()
    union = (ma | mb).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
