"""What RegionSparse learns, each built, trained and cached: the global dictionary, and the classifier copies of the
evaluation protocol (fine-tuned on transformed images for Figs. 6-7, FGSM adversarially fine-tuned for Table II)."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lib import cache
from lib.adversarial_training import fgsm_mixed_loss
from lib.data import ImageData
from lib.defenses.regionsparse.config import DICTIONARY_FIELDS, RegionSparseConfig
from lib.defenses.regionsparse.dictionary import dct_dictionary, learn_dictionary
from lib.evaluate import model_digest
from lib.train import TrainConfig, cached_model, fit_classifier
from lib.validate import check_images

NAMESPACE = "regionsparse/dictionary"


def trained_dictionary(images: torch.Tensor, cfg: RegionSparseConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The dictionary (k, b*b) that `cfg` calls for, learnt on benign `images` and cached under the dictionary
    settings and the images' digest (the DCT dictionary of noTR needs no images and is not cached).

    Returns (atoms, meta) with meta `train_seconds` (of the run that learnt it; NaN for old entries without
    timing) and `cache_key`.
    """
    if cfg.dictionary == "dct":
        return torch.from_numpy(dct_dictionary(cfg.n_atoms, cfg.patch_size)), {"train_seconds": 0.0, "cache_key": None}
    check_images(images)

    def compute() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        atoms = torch.from_numpy(learn_dictionary(images, cfg))
        return {"atoms": atoms, "seconds": torch.tensor(time.perf_counter() - start)}

    settings = asdict(cfg)
    config = {"cfg": {k: settings[k] for k in DICTIONARY_FIELDS}, "images": cache.tensor_digest(images)}
    code = cache.source_fingerprint([learn_dictionary])
    learned = cache.cached_tensors(NAMESPACE, config, compute, code=code)
    return learned["atoms"], {"train_seconds": float(learned.get("seconds", torch.tensor(float("nan")))),
                              "cache_key": cache.config_key(config, code)}


def trained_copy(model: nn.Module, data: ImageData, cfg: TrainConfig, *, tag: str, config: Mapping[str, Any],
                 loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """A copy of `model` fine-tuned on `data` with cross-entropy or `loss_fn` (e.g. `fgsm_mixed_loss` for Table
    II), cached under tag, config, the start weights and the data; returns (model, metadata)."""
    key = {"tag": tag, **dict(config), "start": model_digest(model), "data": cache.tensor_digest(data.x, data.y),
           "train": asdict(cfg)}

    def build() -> nn.Module:
        return copy.deepcopy(model).cpu()

    def train(m: nn.Module, partial) -> dict:
        hist = fit_classifier(m, data, cfg, device=device, checkpoint=partial, desc=tag, loss_fn=loss_fn)
        return {"final_loss": hist[-1]["loss"], "train_size": len(data)}

    return cached_model("regionsparse/finetuned", key, build, train, code=(trained_copy, fgsm_mixed_loss),
                        device=device)
