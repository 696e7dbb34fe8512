"""The two OpenCV image filters of RegionSparse: non-local means (dictionary training images, Eq. 16) and the
bilateral filter of the background (§2.6), plus the tensor <-> OpenCV layout conversions they share."""
from __future__ import annotations

import cv2
import numpy as np
import torch

from lib.validate import check_images


def to_hwc(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) tensor -> (N, H, W, C) float32 numpy."""
    return x.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)


def from_hwc(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) numpy -> (N, C, H, W) tensor on the device and dtype of `like`."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(device=like.device, dtype=like.dtype)


def nlm_smooth(x: torch.Tensor, h: float = 10.0, template: int = 5, search: int = 11) -> torch.Tensor:
    """Non-local-means smoothing (Eq. 16; OpenCV on uint8), used only on dictionary-training images."""
    check_images(x)
    out = []
    for img in (np.rint(to_hwc(x) * 255).astype(np.uint8)):
        if img.shape[2] == 3:
            den = cv2.fastNlMeansDenoisingColored(img, None, h, h, template, search)
        else:
            den = cv2.fastNlMeansDenoising(img[..., 0], None, h, template, search)[..., None]
        out.append(den)
    return from_hwc(np.stack(out).astype(np.float32) / 255.0, x)


def bilateral(x: torch.Tensor, d: int = 5, sigma_color: float = 50.0, sigma_space: float = 5.0) -> torch.Tensor:
    """Bilateral filter of every image (OpenCV on float32, sigma_color on the 0-255 scale), kept in [0, 1]."""
    check_images(x)
    out = []
    for img in to_hwc(x):
        f = cv2.bilateralFilter(img, d, sigma_color / 255.0, sigma_space)
        out.append(f.reshape(img.shape))
    return from_hwc(np.clip(np.stack(out), 0.0, 1.0), x)
