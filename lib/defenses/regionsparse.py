"""RegionSparse (Zhang et al., IJCNN 2020): sparse-code the located object region, bilateral-filter the rest.

Offline, a global overcomplete patch dictionary is learnt with online dictionary learning (scikit-learn's
MiniBatchDictionaryLearning, Mairal et al. 2009) on non-local-means-smoothed benign images whose patches are
z-scored per image (spec-002 §2.3). At test time a Sobel Gx - Gy / Otsu / morphology heuristic finds the object
box (§2.4), its patches are OMP-coded with K atoms and put back by overlap averaging (§2.5), and the background
gets a mild bilateral filter (§2.6): RS(x) = M * SC(x) + (1 - M) * BF(x). The ablations of Fig. 4 are flags.
OMP runs batched over all patches in torch (`batch_omp`), checked against scikit-learn's orthogonal_mp.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lib import cache
from lib.defenses.base import Defense
from lib.validate import check_images, check_positive_int

DICTIONARIES = ("learned", "dct")
REGIONS = ("bbox", "full", "none")
BACKGROUNDS = ("bilateral", "identity")
# Fig. 4's ablations (one added step removed each) and two extra variants that isolate the region split.
VARIANTS: dict[str, dict[str, Any]] = {
    "Region": {},
    "noTR": {"dictionary": "dct"},
    "noIS": {"smooth": False},
    "noPN": {"normalize": False},
    "noBS": {"background": "identity"},
    "Full-image SC (not in paper)": {"region": "full"},
    "BF only (not in paper)": {"region": "none"},
}
_EPS = 1e-6
# the settings the dictionary depends on (its cache key); test-time knobs are left out so variants share it
_DICTIONARY_FIELDS = ("patch_size", "n_atoms", "alpha", "dict_epochs", "dict_batch_size", "patches_per_image",
                      "nlm_h", "nlm_template", "nlm_search", "dictionary", "smooth", "normalize", "seed")


@dataclass(frozen=True)
class RegionSparseConfig:
    """Every RegionSparse knob (spec-002 §2.8); paper-unspecified values are the spec's assumptions."""

    patch_size: int = 5            # b
    n_atoms: int = 64              # k
    sparsity: int = 3              # K non-zero OMP coefficients per patch
    alpha: float = 1.0             # beta of Eq. 20 (dictionary learning only)
    dict_epochs: int = 5
    dict_batch_size: int = 256
    patches_per_image: int = 200   # n
    nlm_h: float = 10.0            # uint8 scale, as OpenCV takes it
    nlm_template: int = 5
    nlm_search: int = 11
    stride: int = 2                # test-time patch stride
    bilateral_d: int = 5
    bilateral_sigma_color: float = 50.0   # uint8 scale (applied to float images as sigma / 255)
    bilateral_sigma_space: float = 5.0
    loc_scale: float | None = None        # s of §2.4; None = image height / 299
    min_area: float = 0.02                # boxes smaller than this fraction fall back to the whole image
    dictionary: str = "learned"    # "dct" = noTR
    smooth: bool = True            # False = noIS
    normalize: bool = True         # False = noPN
    background: str = "bilateral"  # "identity" = noBS
    region: str = "bbox"           # "full" = sparse-code everything, "none" = bilateral only
    seed: int = 0

    def __post_init__(self) -> None:
        for value, name in ((self.patch_size, "patch_size"), (self.n_atoms, "n_atoms"), (self.sparsity, "sparsity"),
                            (self.dict_epochs, "dict_epochs"), (self.patches_per_image, "patches_per_image"),
                            (self.stride, "stride"), (self.dict_batch_size, "dict_batch_size")):
            check_positive_int(value, name)
        if self.sparsity > self.n_atoms:
            raise ValueError(f"sparsity K={self.sparsity} exceeds the number of atoms {self.n_atoms}")
        for value, name, valid in ((self.dictionary, "dictionary", DICTIONARIES), (self.region, "region", REGIONS),
                                   (self.background, "background", BACKGROUNDS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"min_area must lie in [0, 1), got {self.min_area}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RegionSparseConfig":
        """Build from a profile section, ignoring keys that are not RegionSparse settings."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in names})

    def variant(self, name: str) -> "RegionSparseConfig":
        """The configuration of one Fig. 4 ablation / extra variant (see VARIANTS)."""
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        return replace(self, **VARIANTS[name])


# --------------------------------------------------------------------------- image helpers (OpenCV per image)

def _hwc(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) tensor -> (N, H, W, C) float32 numpy."""
    return x.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)


def _nchw(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).to(device=like.device, dtype=like.dtype)


def nlm_smooth(x: torch.Tensor, h: float = 10.0, template: int = 5, search: int = 11) -> torch.Tensor:
    """Non-local-means smoothing (Eq. 16; OpenCV on uint8), used only on dictionary-training images."""
    check_images(x)
    out = []
    for img in (np.rint(_hwc(x) * 255).astype(np.uint8)):
        if img.shape[2] == 3:
            den = cv2.fastNlMeansDenoisingColored(img, None, h, h, template, search)
        else:
            den = cv2.fastNlMeansDenoising(img[..., 0], None, h, template, search)[..., None]
        out.append(den)
    return _nchw(np.stack(out).astype(np.float32) / 255.0, x)


def bilateral(x: torch.Tensor, d: int = 5, sigma_color: float = 50.0, sigma_space: float = 5.0) -> torch.Tensor:
    """Bilateral filter of every image (OpenCV on float32, sigma_color on the 0-255 scale), kept in [0, 1]."""
    check_images(x)
    out = []
    for img in _hwc(x):
        f = cv2.bilateralFilter(img, d, sigma_color / 255.0, sigma_space)
        out.append(f.reshape(img.shape))
    return _nchw(np.clip(np.stack(out), 0.0, 1.0), x)


# --------------------------------------------------------------------------- patches

def extract_patches(x: torch.Tensor, b: int, stride: int = 1) -> torch.Tensor:
    """All b x b patches of every channel: (N, C, L, b*b), L = positions of a stride grid (per channel mode)."""
    n, c, h, w = x.shape
    cols = F.unfold(x.reshape(n * c, 1, h, w), b, stride=stride)  # (N*C, b*b, L)
    return cols.transpose(1, 2).reshape(n, c, -1, b * b)


def fold_patches(patches: torch.Tensor, size: tuple[int, int], b: int, stride: int = 1,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap-average patches (N, C, L, b*b) back into images; returns (image, coverage count).

    `weights` (N, C, L) in {0, 1} leaves patches out; pixels no kept patch covers come back 0 with coverage 0.
    """
    n, c, length, d = patches.shape
    w = torch.ones(n, c, length, device=patches.device, dtype=patches.dtype) if weights is None else weights
    num = F.fold((patches * w[..., None]).reshape(n * c, length, d).transpose(1, 2), size, b, stride=stride)
    den = F.fold(w.reshape(n * c, 1, length).expand(-1, d, -1), size, b, stride=stride)
    img = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
    return img.reshape(n, c, *size), den.reshape(n, c, *size)


def zscore_cols(p: np.ndarray | torch.Tensor, eps: float = _EPS):
    """Eq. 17: z-score every column (patch dimension) over the rows; returns (z, mean, std) with std + eps."""
    mu = p.mean(0, keepdims=True) if isinstance(p, np.ndarray) else p.mean(0, keepdim=True)
    sd = (p.std(0, keepdims=True) if isinstance(p, np.ndarray) else p.std(0, unbiased=False, keepdim=True)) + eps
    return (p - mu) / sd, mu, sd


# --------------------------------------------------------------------------- dictionaries

def dct_dictionary(n_atoms: int, b: int) -> np.ndarray:
    """Untrained overcomplete 2-D DCT dictionary (noTR): Kronecker product of two 1-D DCTs, rows unit-norm."""
    side = math.isqrt(n_atoms)
    if side * side != n_atoms:
        raise ValueError(f"a 2-D DCT dictionary needs a square number of atoms, got {n_atoms}")
    k = np.arange(side)
    one_d = np.cos(np.outer(np.arange(b), k) * np.pi / side)  # (b, side)
    one_d[:, 1:] -= one_d[:, 1:].mean(0)
    one_d /= np.linalg.norm(one_d, axis=0, keepdims=True)
    atoms = np.kron(one_d, one_d).T  # (side*side, b*b)
    return (atoms / np.linalg.norm(atoms, axis=1, keepdims=True)).astype(np.float64)


def training_patches(images: torch.Tensor, cfg: RegionSparseConfig) -> np.ndarray:
    """The benign patch dataset D (Eqs. 14-15): optional NLM smoothing, n random patches per image and channel,
    z-scored per image and dimension (Eq. 17) unless cfg.normalize is False."""
    from sklearn.feature_extraction.image import extract_patches_2d

    check_images(images)
    src = nlm_smooth(images, cfg.nlm_h, cfg.nlm_template, cfg.nlm_search) if cfg.smooth else images
    rng = np.random.RandomState(cfg.seed)
    blocks = []
    for img in _hwc(src).astype(np.float64):
        per_image = [extract_patches_2d(img[..., ch], (cfg.patch_size,) * 2, max_patches=cfg.patches_per_image,
                                        random_state=rng).reshape(-1, cfg.patch_size ** 2)
                     for ch in range(img.shape[2])]
        p = np.concatenate(per_image)
        blocks.append(zscore_cols(p)[0] if cfg.normalize else p)
    return np.concatenate(blocks)


def learn_dictionary(images: torch.Tensor, cfg: RegionSparseConfig) -> np.ndarray:
    """The robust global dictionary (k, b*b), unit-norm rows: online dictionary learning on `training_patches`."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.exceptions import ConvergenceWarning

    if cfg.dictionary == "dct":
        return dct_dictionary(cfg.n_atoms, cfg.patch_size)
    data = training_patches(images, cfg)
    learner = MiniBatchDictionaryLearning(n_components=cfg.n_atoms, alpha=cfg.alpha, batch_size=cfg.dict_batch_size,
                                          max_iter=cfg.dict_epochs, fit_algorithm="cd", transform_algorithm="omp",
                                          random_state=cfg.seed)
    with warnings.catch_warnings():  # the inner Lasso steps of 'cd' warn on near-constant patches; harmless
        warnings.simplefilter("ignore", ConvergenceWarning)
        atoms = learner.fit(data).components_.astype(np.float64)
    return atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), _EPS)


# --------------------------------------------------------------------------- batched OMP

def batch_omp(signals: torch.Tensor, dictionary: torch.Tensor, sparsity: int, chunk: int = 200_000) -> torch.Tensor:
    """Orthogonal matching pursuit for many signals at once: codes (n, k) with at most `sparsity` non-zeros.

    signals (n, d), dictionary (k, d) with unit-norm rows. Gram-matrix OMP vectorised over signals: each step
    picks the atom of largest |residual correlation| (not yet chosen) and refits all chosen coefficients by
    least squares (batched solve). A signal whose residual correlation vanishes stops early, like scikit-learn.
    """
    if signals.dim() != 2 or dictionary.dim() != 2 or signals.shape[1] != dictionary.shape[1]:
        raise ValueError(f"need signals (n, d) and dictionary (k, d); got {tuple(signals.shape)} and "
                         f"{tuple(dictionary.shape)}")
    check_positive_int(sparsity, "sparsity")
    if sparsity > dictionary.shape[0]:
        raise ValueError(f"sparsity {sparsity} exceeds the number of atoms {dictionary.shape[0]}")
    dictionary = dictionary.to(device=signals.device, dtype=signals.dtype)
    gram = dictionary @ dictionary.T
    return torch.cat([_omp_chunk(s, dictionary, gram, sparsity) for s in signals.split(chunk)]) if len(signals) else \
        signals.new_zeros(0, dictionary.shape[0])


def _omp_chunk(x: torch.Tensor, dictionary: torch.Tensor, gram: torch.Tensor, sparsity: int) -> torch.Tensor:
    n, k = x.shape[0], dictionary.shape[0]
    rows = torch.arange(n, device=x.device)
    corr0 = x @ dictionary.T                       # (n, k) correlations with the signal
    corr = corr0.clone()
    chosen = torch.zeros(n, k, dtype=torch.bool, device=x.device)
    support = torch.zeros(n, sparsity, dtype=torch.long, device=x.device)
    valid = torch.zeros(n, sparsity, dtype=torch.bool, device=x.device)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    tiny = torch.finfo(x.dtype).eps * 10 * corr0.abs().amax(1).clamp_min(1.0)
    coef = x.new_zeros(n, 0)
    for t in range(sparsity):
        score = corr.abs().masked_fill(chosen, -1.0)
        best, j = score.max(1)
        alive &= best > tiny
        support[:, t] = j
        valid[:, t] = alive
        chosen[rows[alive], j[alive]] = True
        s = support[:, :t + 1]
        v = valid[:, :t + 1]
        g = gram[s[:, :, None], s[:, None, :]]    # (n, t+1, t+1)
        both = v[:, :, None] & v[:, None, :]
        eye = torch.eye(t + 1, device=x.device, dtype=x.dtype).expand_as(g)
        g = torch.where(both, g, eye)
        rhs = torch.where(v, corr0.gather(1, s), torch.zeros_like(corr0[:, :t + 1]))
        coef = torch.linalg.solve(g, rhs)          # zero on invalid slots
        corr = corr0 - torch.einsum("nt,ntk->nk", coef, gram[s])
    codes = x.new_zeros(n, k)
    return codes.scatter_add_(1, support, coef * valid)


# --------------------------------------------------------------------------- object localisation (§2.4)

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
    found = [localize(img, scale=scale, grow=grow, min_area=min_area) for img in _hwc(x)]
    return (torch.tensor([f[0] for f in found], dtype=torch.long),
            torch.tensor([f[1] for f in found], dtype=torch.bool))


def box_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks (N, 1, H, W) that are 1 inside each (y0, y1, x0, x1) box."""
    h, w = size
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    b = boxes[:, :, None, None]
    return ((ys >= b[:, 0]) & (ys < b[:, 1]) & (xs >= b[:, 2]) & (xs < b[:, 3])).unsqueeze(1).float()


# --------------------------------------------------------------------------- the defense

class RegionSparse(Defense):
    """RS(x) = M * SC(x) + (1 - M) * BF(x) with M the located object box (spec-002 §2.7).

    Non-differentiable (OpenCV localiser and filter, OMP's discrete support) and deterministic. Build it with
    `RegionSparse(cfg).fit(benign_images)` or `RegionSparse(cfg, dictionary=atoms)`; `last_stats` holds the
    fallback rate and mean region area of the latest `purify` call.
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

    def fit(self, images: torch.Tensor, use_cache: bool = True) -> "RegionSparse":
        """Learn the global dictionary from benign images (cached under the config and the images' digest)."""
        check_images(images)

        def compute() -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            atoms = torch.from_numpy(learn_dictionary(images, self.cfg))
            return {"atoms": atoms, "seconds": torch.tensor(time.perf_counter() - start)}

        settings = asdict(self.cfg)
        config = {"cfg": {k: settings[k] for k in _DICTIONARY_FIELDS}, "images": cache.tensor_digest(images)}
        if use_cache:
            learned = cache.cached_tensors("regionsparse/dictionary", config, compute,
                                           code=cache.source_fingerprint([learn_dictionary]))
        else:
            learned = compute()
        self._set_dictionary(learned["atoms"])
        # seconds of the run that learned the dictionary (NaN for entries cached before timing was recorded)
        self.train_seconds = float(learned.get("seconds", torch.tensor(float("nan"))))
        return self

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

    def sparse_code(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SC(x) inside `mask` (patches lying wholly inside it, z-scored per image over those patches); x elsewhere."""
        if self.dictionary.numel() == 0:
            raise ValueError("RegionSparse has no dictionary: call fit(benign_images) first or pass dictionary=")
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
            sd = (((flat - mu) ** 2 * wts[..., None]).sum(1, keepdim=True) / cnt).sqrt() + _EPS
        else:
            mu, sd = torch.zeros_like(flat[:, :1]), torch.ones_like(flat[:, :1])
        z = (flat - mu) / sd
        sel = wts > 0.5
        rec = torch.zeros_like(z)
        if sel.any():
            rows = z[sel]
            rec[sel] = batch_omp(rows, self.dictionary.to(rows), self.cfg.sparsity) @ self.dictionary.to(rows)
        rec = rec * sd + mu
        img, cover = fold_patches(rec.reshape(n, c, -1, b * b), size, b, s, weights=inside)
        img, cover = img[..., :h, :w], cover[..., :h, :w]
        return torch.where(cover > 0, img, x).clamp(0.0, 1.0)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        outs, fallbacks, areas = [], [], []
        for xb in x.split(self.batch_size):
            mask, fallback = self.region_masks(xb)
            cfg = self.cfg
            background = xb if cfg.background == "identity" else bilateral(
                xb, cfg.bilateral_d, cfg.bilateral_sigma_color, cfg.bilateral_sigma_space)
            coded = self.sparse_code(xb, mask) if mask.any() else xb
            outs.append(mask * coded + (1 - mask) * background)
            fallbacks.append(fallback)
            areas.append(mask.mean((1, 2, 3)).cpu())
        self.last_stats = {"fallback_rate": float(torch.cat(fallbacks).float().mean()),
                           "mean_region_area": float(torch.cat(areas).mean())}
        return torch.cat(outs).clamp(0.0, 1.0)


def build_variants(cfg: RegionSparseConfig, benign: torch.Tensor, names: list[str] | None = None
                   ) -> dict[str, RegionSparse]:
    """RegionSparse and its ablations (VARIANTS), each with the dictionary its flags call for (learnt once per
    distinct dictionary setting, cached)."""
    out: dict[str, RegionSparse] = {}
    for name in names or list(VARIANTS):
        vcfg = cfg.variant(name)
        out[name] = RegionSparse(vcfg) if vcfg.dictionary == "dct" else RegionSparse(vcfg).fit(benign)
    return out


def regionsparse_for(profile: Mapping[str, Any], dataset: str, notebook: str = "03_regionsparse") -> RegionSparse:
    """RegionSparse configured by a profile's notebook section and fitted (cached) on the last
    `dictionary_images` training images of `dataset`; K is the section's `regionsparse.sparsity` (uncalibrated)."""
    from lib.data import load_dataset
    from lib.profiles import dataset_config, notebook_config

    section = notebook_config(profile, notebook)
    seed = profile.get("seed", 0)
    cfg = RegionSparseConfig.from_mapping({**section["regionsparse"], "seed": seed})
    train = load_dataset(dataset, "train", n=dataset_config(profile, dataset).get("train_size"), seed=seed)
    return RegionSparse(cfg).fit(train.x[-section["dictionary_images"]:])
