"""Object localisation (spec-002 §2.4): Sobel Gx - Gy, Otsu binarisation, morphology, the largest contour's box."""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from lib.defenses.regionsparse.filters import to_hwc
from lib.validate import check_images


def _odd(v: float) -> int:
    return max(1, int(round(v)) // 2 * 2 + 1) if v >= 1 else 1


def localize_steps(img: np.ndarray, *, scale: float | None = None, grow: int = 0, min_area: float = 0.02
                   ) -> dict[str, Any]:
    """Every stage of the object localiser (§2.4) for one HxW[xC] float image in [0, 1] (Fig. 2's lower row).

    Grayscale -> Gaussian pre-blur -> Sobel G = Gx - Gy -> box blur -> Otsu -> closing, erode, dilate -> largest
    external contour -> bounding rectangle grown by `grow` px. No contour, or one under `min_area` of the image,
    gives the whole image (fallback). Keys: gray, gradient, binary, morphology (uint8 maps), box, fallback.
    """
    if img.ndim == 3:
        gray = img.mean(2) if img.shape[2] != 3 else cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2GRAY)
    elif img.ndim == 2:
        gray = img
    else:
        raise ValueError(f"localize takes an HxW or HxWxC image, got shape {img.shape}")
    h, w = gray.shape
    s = h / 299.0 if scale is None else scale
    g8 = np.rint(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    k = _odd(9 * s)
    if k > 1:
        g8 = cv2.GaussianBlur(g8, (k, k), 0)
    gx = cv2.Sobel(g8, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g8, cv2.CV_32F, 0, 1, ksize=3)
    grad = cv2.convertScaleAbs(cv2.subtract(gx, gy))
    if k > 1:
        grad = cv2.blur(grad, (k, k))
    steps: dict[str, Any] = {"gray": g8, "gradient": grad, "binary": np.zeros_like(grad),
                             "morphology": np.zeros_like(grad), "box": (0, h, 0, w), "fallback": True}
    if int(grad.max()) == int(grad.min()):
        return steps
    _, binary = cv2.threshold(grad, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kc = _odd(25 * s)
    closed = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kc, kc)))
    it = max(1, int(round(4 * s)))
    closed = cv2.dilate(cv2.erode(closed, None, iterations=it), None, iterations=it)
    steps.update(binary=binary, morphology=closed)
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return steps
    x0, y0, bw, bh = cv2.boundingRect(max(contours, key=cv2.contourArea))
    if bw * bh < min_area * h * w:
        return steps
    steps.update(box=(max(0, y0 - grow), min(h, y0 + bh + grow), max(0, x0 - grow), min(w, x0 + bw + grow)),
                 fallback=False)
    return steps


def localize(img: np.ndarray, *, scale: float | None = None, grow: int = 0, min_area: float = 0.02
             ) -> tuple[tuple[int, int, int, int], bool]:
    """Object box (y0, y1, x0, x1) of one image and whether it fell back to the whole image (see localize_steps)."""
    steps = localize_steps(img, scale=scale, grow=grow, min_area=min_area)
    return steps["box"], steps["fallback"]


def localize_batch(x: torch.Tensor, *, scale: float | None = None, grow: int = 0, min_area: float = 0.02
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (N, 4) as (y0, y1, x0, x1) and fallback flags (N,) for a batch in [0, 1]."""
    check_images(x)
    found = [localize(img, scale=scale, grow=grow, min_area=min_area) for img in to_hwc(x)]
    return (torch.tensor([f[0] for f in found], dtype=torch.long),
            torch.tensor([f[1] for f in found], dtype=torch.bool))


def box_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (N, 1, H, W) that are 1 inside each (y0, y1, x0, x1) box."""
    h, w = size
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    b = boxes[:, :, None, None]
    return ((ys >= b[:, 0]) & (ys < b[:, 1]) & (xs >= b[:, 2]) & (xs < b[:, 3])).unsqueeze(1).float()
