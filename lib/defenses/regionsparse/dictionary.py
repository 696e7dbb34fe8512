"""The robust global dictionary (spec-002 §2.3): online dictionary learning on smoothed, z-scored benign patches,
and the untrained 2-D DCT dictionary of the noTR ablation."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from lib.defenses.regionsparse.config import EPS, RegionSparseConfig
from lib.defenses.regionsparse.filters import nlm_smooth, to_hwc
from lib.defenses.regionsparse.patches import zscore_cols
from lib.validate import check_images


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
    for img in to_hwc(src).astype(np.float64):
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
    return atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), EPS)
