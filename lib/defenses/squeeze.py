"""Feature squeezing (Xu et al., NDSS 2018): bit-depth reduction, median filter, non-local means.

Used as the preprocessor T of SFM-Defense and as baselines across the project. Bit depth and the
median filter are batched tensor ops; non-local means goes through OpenCV one image at a time
(OpenCV is the reference implementation and has no batched call).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from lib.defenses.base import Compose, Defense
from lib.validate import check_images, check_positive_int


class BitDepthReduction(Defense):
    """T_bit(x) = round(x (2^bits - 1)) / (2^bits - 1), Xu et al.'s formula; a step function, so BPDA is needed."""

    differentiable = False

    def __init__(self, bits: int = 5):
        super().__init__()
        check_positive_int(bits, "bits")
        if bits > 16:
            raise ValueError(f"bits must be between 1 and 16, got {bits}")
        self.bits = bits

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        levels = 2 ** self.bits - 1
        return torch.round(x * levels) / levels

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _symmetric_pad(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    """Pad one axis by mirroring with the edge repeated (scipy's 'reflect', numpy's 'symmetric')."""
    n = x.shape[dim]
    if before > n or after > n:
        raise ValueError(f"padding ({before}, {after}) exceeds the image size {n}")
    index = torch.cat([torch.arange(before - 1, -1, -1), torch.arange(n), torch.arange(n - 1, n - 1 - after, -1)])
    return x.index_select(dim, index.to(x.device))


class MedianFilter(Defense):
    """k x k median filter per channel with scipy-compatible windows and padding.

    For an even window the median is the upper-middle value (scipy.ndimage.median_filter's choice;
    torch.median would take the lower one). The window of pixel i covers i - k//2 ... i + (k-1)//2,
    as scipy's does with origin 0. Gradients flow to the selected pixel, so the filter is (almost everywhere)
    differentiable and white-box attacks can use it directly.
    """

    differentiable = True

    def __init__(self, size: int = 2):
        super().__init__()
        check_positive_int(size, "size")
        self.size = size

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        k = self.size
        before, after = k // 2, (k - 1) // 2
        padded = _symmetric_pad(_symmetric_pad(x, before, after, 2), before, after, 3)
        n, c, h, w = x.shape
        windows = padded.unfold(2, k, 1).unfold(3, k, 1).reshape(n, c, h, w, k * k)
        # kthvalue is 1-based: rank k*k//2 (0-based) is the upper middle for even k*k, the middle for odd.
        return windows.kthvalue(k * k // 2 + 1, dim=-1).values

    def extra_repr(self) -> str:
        return f"size={self.size}"


class NonLocalMeans(Defense):
    """OpenCV non-local means; Xu et al.'s "13-3-2" = search window 13, patch 3, strength h = 2 (on 0-255).

    Colour images go through cv2.fastNlMeansDenoisingColored (RGB is reordered to OpenCV's BGR so that
    its Lab conversion is right); grey images through cv2.fastNlMeansDenoising. Not differentiable.
    """

    differentiable = False

    def __init__(self, h: float = 2.0, template_window: int = 3, search_window: int = 13):
        super().__init__()
        if not h > 0:
            raise ValueError(f"h must be > 0, got {h}")
        for name, value in (("template_window", template_window), ("search_window", search_window)):
            check_positive_int(value, name)
            if value % 2 == 0:
                raise ValueError(f"{name} must be odd, got {value}")
        self.h, self.template_window, self.search_window = float(h), template_window, search_window

    def _denoise(self, image: np.ndarray) -> np.ndarray:
        if image.shape[2] == 1:
            return cv2.fastNlMeansDenoising(image[:, :, 0], None, self.h, self.template_window,
                                            self.search_window)[:, :, None]
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        out = cv2.fastNlMeansDenoisingColored(bgr, None, self.h, self.h, self.template_window, self.search_window)
        return out[:, :, ::-1]

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"non-local means needs 1 or 3 channels, got {x.shape[1]}")
        images = (x.detach().permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        out = np.stack([self._denoise(img) for img in images])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0

    def extra_repr(self) -> str:
        return f"h={self.h}, template_window={self.template_window}, search_window={self.search_window}"


SQUEEZERS = {
    "bit": BitDepthReduction,
    "median": MedianFilter,
    "nlm": NonLocalMeans,
}


def squeezer(spec: str) -> Defense:
    """A squeezer (or a chain) from a short spec: 'bit5', 'median2', 'nlm', 'bit5+median2'."""
    steps = []
    for part in spec.split("+"):
        name = part.rstrip("0123456789")
        if name not in SQUEEZERS:
            raise ValueError(f"unknown squeezer {part!r} in {spec!r}; valid: bit<i>, median<k>, nlm (joined by '+')")
        arg = part[len(name):]
        steps.append(SQUEEZERS[name](int(arg)) if arg else SQUEEZERS[name]())
    return steps[0] if len(steps) == 1 else Compose(*steps)
