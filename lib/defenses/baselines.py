"""Classic input-transformation baselines: JPEG compression (through ART) and total-variation minimisation.

TVM (Guo et al., ICLR 2018) keeps a random Bernoulli subset of pixels and refits the image by TV-regularised
least squares. ART's TotalVarMin solves one image and channel at a time with scipy; ours solves the same
objective for the whole batch at once with torch's L-BFGS (a test checks it reaches ART's objective values).
"""
from __future__ import annotations

import numpy as np
import torch

from lib.defenses.base import Defense
from lib.validate import check_images, check_positive_int


class JPEGCompression(Defense):
    """JPEG encode/decode at a given quality via ART's JpegCompression (PIL underneath); not differentiable."""

    differentiable = False

    def __init__(self, quality: int = 75):
        super().__init__()
        from art.defences.preprocessor import JpegCompression

        if not 1 <= int(quality) <= 95:
            raise ValueError(f"quality must be in [1, 95], got {quality}")
        self.quality = int(quality)
        self._art = JpegCompression(clip_values=(0.0, 1.0), quality=self.quality, channels_first=True)

    @torch.no_grad()
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        out, _ = self._art(x.detach().cpu().numpy().astype(np.float32))
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


def tv_objective(z: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, lamb: float, norm: int = 2) -> torch.Tensor:
    """Guo et al.'s TVM objective per image and channel, shape (N, C), as ART's TotalVarMin defines it.

    ||keep * (z - x)||_2 + lamb * (sum over row pairs of ||vertical differences||_p
                                 + sum over column pairs of ||horizontal differences||_p).
    """
    fit = ((z - x) ** 2 * keep).sum(dim=(2, 3)).add(1e-12).sqrt()
    vertical = torch.linalg.vector_norm(z[:, :, 1:, :] - z[:, :, :-1, :], ord=norm, dim=3).sum(dim=2)
    horizontal = torch.linalg.vector_norm(z[:, :, :, 1:] - z[:, :, :, :-1], ord=norm, dim=2).sum(dim=2)
    return fit + lamb * (vertical + horizontal)


def tv_minimize(x: torch.Tensor, keep: torch.Tensor, *, lamb: float = 0.5, norm: int = 2,
                max_iter: int = 30) -> torch.Tensor:
    """Minimise tv_objective from z = x for a whole batch with L-BFGS (the per-image objectives are independent)."""
    z = x.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([z], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = tv_objective(z, x, keep, lamb, norm).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return z.detach().clamp(0.0, 1.0)


class TotalVariationMinimization(Defense):
    """TVM: keep each pixel with probability `keep_prob`, refit by TV minimisation; randomised, not differentiable.

    Defaults follow ART's TotalVarMin (keep probability 0.3, lambda 0.5, L2); 30 joint L-BFGS iterations reach
    a lower objective on every image than ART's 10 per-image iterations (tests/test_squeeze_baselines.py). Pass `seed` for reproducible masks: each call draws a fresh mask from the defense's own generator.
    """

    differentiable = False
    randomized = True

    def __init__(self, keep_prob: float = 0.3, lamb: float = 0.5, norm: int = 2, max_iter: int = 30,
                 seed: int | None = None):
        super().__init__()
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        if not lamb >= 0.0:
            raise ValueError(f"lamb must be >= 0, got {lamb}")
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm}")
        check_positive_int(max_iter, "max_iter")
        self.keep_prob, self.lamb, self.norm, self.max_iter = float(keep_prob), float(lamb), norm, max_iter
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        keep = (torch.rand(x.shape, generator=self.generator) < self.keep_prob).to(x)
        return tv_minimize(x, keep, lamb=self.lamb, norm=self.norm, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob}, lamb={self.lamb}, norm={self.norm}, max_iter={self.max_iter}"
