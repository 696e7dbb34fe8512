"""The RegionSparse defense (spec-002 §2.7): RS(x) = M * SC(x) + (1 - M) * BF(x).

M is the located object box snapped to the patch grid, SC(x) the OMP code of the region's z-scored patches with
K atoms of the global dictionary put back by overlap averaging, BF(x) a mild bilateral filter of the rest.
`bpda_purify` is its differentiable approximation for BPDA (the projection onto the atoms OMP selected).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lib.defenses.base import Defense
from lib.defenses.regionsparse.config import EPS, RegionSparseConfig
from lib.defenses.regionsparse.dictionary import dct_dictionary
from lib.defenses.regionsparse.filters import bilateral
from lib.defenses.regionsparse.localize import box_mask, localize_batch
from lib.defenses.regionsparse.omp import batch_omp, support_projection
from lib.defenses.regionsparse.patches import extract_patches, fold_patches
from lib.validate import check_images


class RegionSparse(Defense):
    """RS(x) = M * SC(x) + (1 - M) * BF(x) with M the located object box (spec-002 §2.7).

    Non-differentiable (OpenCV localiser and filter, OMP's discrete support) and deterministic; `bpda_purify` is
    its differentiable approximation. `dictionary` is the learnt one (`trained_dictionary`); the noTR variant builds
    its DCT dictionary itself. `last_stats` holds the fallback rate and mean region area of the latest `purify` call.
    """

    differentiable = False
    randomized = False

    def __init__(self, cfg: RegionSparseConfig | None = None, dictionary: np.ndarray | torch.Tensor | None = None,
                 batch_size: int = 256):
        super().__init__()
        self.cfg = cfg or RegionSparseConfig()
        self.batch_size = batch_size
        self.register_buffer("dictionary", torch.empty(0))
        if dictionary is not None:
            self._set_dictionary(dictionary)
        elif self.cfg.dictionary == "dct":
            self._set_dictionary(dct_dictionary(self.cfg.n_atoms, self.cfg.patch_size))
        self.last_stats: dict[str, float] = {}

    def _set_dictionary(self, atoms: np.ndarray | torch.Tensor) -> None:
        atoms = torch.as_tensor(np.asarray(atoms), dtype=torch.float32)
        if atoms.shape != (self.cfg.n_atoms, self.cfg.patch_size ** 2):
            raise ValueError(f"dictionary must have shape {(self.cfg.n_atoms, self.cfg.patch_size ** 2)}, "
                             f"got {tuple(atoms.shape)}")
        self.dictionary = atoms.to(self.dictionary.device)

    def region_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (N, 1, H, W) of the regions to sparse-code, snapped outward to the patch grid, and fallback flags."""
        n, _, h, w = x.shape
        if self.cfg.region == "none":
            return x.new_zeros(n, 1, h, w), torch.zeros(n, dtype=torch.bool)
        if self.cfg.region == "full":
            boxes, fallback = torch.tensor([[0, h, 0, w]] * n), torch.zeros(n, dtype=torch.bool)
        else:
            boxes, fallback = localize_batch(x, scale=self.cfg.loc_scale, grow=math.ceil(self.cfg.patch_size / 2),
                                             min_area=self.cfg.min_area)
        return box_mask(self._snap(boxes, h, w), (h, w)).to(x), fallback

    def _snap(self, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Grow boxes to whole patch-grid cells so every pixel inside is covered by an in-box patch."""
        b, s = self.cfg.patch_size, self.cfg.stride
        out = boxes.clone()
        for lo, hi, size in ((0, 1, h), (2, 3, w)):
            start = torch.div(boxes[:, lo], s, rounding_mode="floor") * s
            extent = (boxes[:, hi] - start - b).clamp_min(0)
            end = start + b + torch.div(extent + s - 1, s, rounding_mode="floor") * s
            out[:, lo], out[:, hi] = start, torch.minimum(end, torch.full_like(end, size))
        return out

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad right/bottom so the stride grid reaches the last row and column."""
        b, s = self.cfg.patch_size, self.cfg.stride
        h, w = x.shape[-2:]
        ph, pw = (-(h - b)) % s, (-(w - b)) % s
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def sparse_code(self, x: torch.Tensor, mask: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """SC(x) inside `mask` (patches lying wholly inside it, z-scored per image over those patches); x elsewhere.
        `differentiable`: each patch's code is its projection onto the atoms OMP chose for it (`support_projection`,
        the same value, with gradients) instead of OMP's own coefficients."""
        if self.dictionary.numel() == 0:
            raise ValueError("RegionSparse has no dictionary: pass dictionary= (see trained_dictionary)")
        b, s = self.cfg.patch_size, self.cfg.stride
        n, c, h, w = x.shape
        xp, mp = self._padded(x), self._padded(mask)
        size = tuple(xp.shape[-2:])
        patches = extract_patches(xp, b, s)                              # (N, C, L, d)
        inside = (extract_patches(mp, b, s).amin(-1) > 0.5).expand(n, c, -1).to(x.dtype)  # (N, C, L)
        flat, wts = patches.reshape(n, -1, b * b), inside.reshape(n, -1)
        if self.cfg.normalize:
            cnt = wts.sum(1).clamp_min(1.0)[:, None, None]
            mu = (flat * wts[..., None]).sum(1, keepdim=True) / cnt
            var = ((flat - mu) ** 2 * wts[..., None]).sum(1, keepdim=True) / cnt
            sd = var.clamp_min(EPS ** 2).sqrt() + EPS      # clamped: a finite gradient for flat regions too
        else:
            mu, sd = torch.zeros_like(flat[:, :1]), torch.ones_like(flat[:, :1])
        z = (flat - mu) / sd
        sel = wts > 0.5
        rec = torch.zeros_like(z)
        if sel.any():
            rows = z[sel]
            atoms = self.dictionary.to(rows)
            rec[sel] = (support_projection(rows, atoms, self.cfg.sparsity) if differentiable
                        else batch_omp(rows, atoms, self.cfg.sparsity) @ atoms)
        rec = rec * sd + mu
        img, cover = fold_patches(rec.reshape(n, c, -1, b * b), size, b, s, weights=inside)
        img, cover = img[..., :h, :w], cover[..., :h, :w]
        return torch.where(cover > 0, img, x).clamp(0.0, 1.0)

    def _parts(self, x: torch.Tensor, differentiable: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(region mask M, fallback flags, background BF(x) or x, SC(x) inside M and x elsewhere) of one batch;
        `differentiable`: as `bpda_purify` takes them (M held fixed, BF's backward the identity, SC by projection)."""
        mask, fallback = self.region_masks(x.detach())
        cfg = self.cfg
        background = x if cfg.background == "identity" else bilateral(
            x, cfg.bilateral_d, cfg.bilateral_sigma_color, cfg.bilateral_sigma_space)
        if differentiable and cfg.background != "identity":
            background = x + (background - x).detach()        # straight-through: BF(x) forward, identity backward
        coded = self.sparse_code(x, mask, differentiable) if mask.any() else x
        return mask, fallback, background, coded

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        return self._purified(x, differentiable=False)

    def bpda_purify(self, x: torch.Tensor) -> torch.Tensor:
        """RS(x) with gradients, for BPDA's backward pass: the same forward value as `purify`, differentiated as
        M * P(x) + (1 - M) * x, where P projects each in-region patch (z-scored, with its statistics differentiated)
        onto the atoms OMP selected for it, by least squares with that support held fixed (`support_projection`).

        Why this approximation: OMP's output is exactly that projection; only the choice of atoms is discrete, and it
        is piecewise constant in x, so with the support fixed the gradient is exact wherever a small step does not
        change the chosen atoms (Athalye et al. 2018 recommend such a locally exact surrogate over the identity).
        The region mask M is a box from thresholded Sobel responses: also piecewise constant (zero gradient almost
        everywhere), so it is held fixed. The bilateral filter of the background is an OpenCV call whose output
        approximates its input, so its backward is the identity (straight-through). Identity BPDA of the whole
        defense is reported beside this one (threat `white-identity`)."""
        check_images(x)
        return self._purified(x, differentiable=True)

    def _purified(self, x: torch.Tensor, differentiable: bool) -> torch.Tensor:
        """RS(x) in batches of `batch_size`; records `last_stats` (for `purify`'s calls only)."""
        outs, fallbacks, areas = [], [], []
        for xb in x.split(self.batch_size):
            mask, fallback, background, coded = self._parts(xb, differentiable)
            outs.append(mask * coded + (1 - mask) * background)
            fallbacks.append(fallback)
            areas.append(mask.mean((1, 2, 3)).cpu())
        if not differentiable:
            self.last_stats = {"fallback_rate": float(torch.cat(fallbacks).float().mean()),
                               "mean_region_area": float(torch.cat(areas).mean())}
        return torch.cat(outs).clamp(0.0, 1.0)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The localised region M (as x's channels), the background filter BF(x) and the region's code SC(x)."""
        check_images(x)
        mask, _, background, coded = self._parts(x)
        return {"mask": mask.expand_as(x).contiguous(), "bilateral background": background,
                "sparse-coded region": coded}
