"""SFM-Defense from a profile: the data splits, the training settings and one trained (or cached) SFM.

Everything reads the profile's `notebooks.01_sfm_defense` section, so notebook 01, the w1 sweep and the
registry's `build` configure SFM-Defense in one place.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lib.data import ImageData, balanced_subset, load_dataset
from lib.defenses.base import Built
from lib.defenses.sfm.losses import w1_for_ratio
from lib.defenses.sfm.training import Log, SFMConfig, trained_sfm
from lib.defenses.squeeze import squeezer
from lib.evaluate import model_digest
from lib.models import classifier_from_spec
from lib.profiles import dataset_config, notebook_config

NOTEBOOK = "01_sfm_defense"  # the profile section every SFM setting comes from


def sfm_splits(profile: Mapping[str, Any], dataset: str) -> tuple[ImageData, ImageData]:
    """(SFM training subset, validation split) of the profile's training split for `dataset`.

    The validation split (`val_size` class-balanced images, seed + 1) is held out to choose w1; the rest, reduced to a
    class-balanced `sfm_train_size` subset when that is set, trains Algorithm 1.
    """
    cfg = notebook_config(profile, NOTEBOOK)
    seed = profile["seed"]
    train = load_dataset(dataset, "train", n=dataset_config(profile, dataset).get("train_size"), seed=seed)
    val_idx = balanced_subset(train.y, cfg["val_size"], seed=seed + 1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    rest = keep.nonzero().flatten()
    n_sfm = cfg["sfm_train_size"]
    if n_sfm is not None and n_sfm < len(rest):
        rest = rest[balanced_subset(train.y[rest], n_sfm, seed=seed)]
    return train.subset(rest), train.subset(val_idx)


def sfm_config(profile: Mapping[str, Any], sfm_data: ImageData, *, ratio: float,
               overrides: Mapping[str, Any] | None = None) -> SFMConfig:
    """The profile's SFM settings with w1 = ratio x the identity threshold of the SFM training images (spec-000
    §2.5.1, computed with the profile's w3 and batch size), then `overrides` (e.g. the loss ablations). The
    section's `sfm_per_dataset` replaces settings for one dataset (Tiny-ImageNet's w2 = 0.01, w3 = 100)."""
    cfg = notebook_config(profile, NOTEBOOK)
    base = {**cfg["sfm"], **cfg.get("sfm_per_dataset", {}).get(sfm_data.info.name, {})}
    defaults = SFMConfig()
    base["w1"] = w1_for_ratio(ratio, sfm_data.x, base.get("batch_size", defaults.batch_size),
                              base.get("reduction", defaults.reduction), base.get("w3", defaults.w3))
    return SFMConfig.from_mapping({**base, **(overrides or {}), "seed": profile["seed"]})


def sfm_for(profile: Mapping[str, Any], dataset: str, target: nn.Module, *, ratio: float,
            preprocess: str | None = None, overrides: Mapping[str, Any] | None = None,
            device: torch.device | None = None, log: Log | None = print) -> Built:
    """One SFM-Defense for `dataset` with w1 = `ratio` x the identity threshold, trained or loaded from the cache.

    Built.classifier is F_theta, SFM's own classifier fine-tuned on T(x) by Algorithm 1 (starting from a copy of
    `target` when the profile sets `init_from_target`, else from scratch; `target` itself is left as it was).
    `preprocess` is a squeezer spec ('median2', 'bit5', 'nlm'; default the profile's `default_preprocess`),
    `overrides` replace SFM settings after the ratio (ablations). meta['config'] holds the SFM settings with
    'ratio' and 'preprocess'.
    """
    cfg = notebook_config(profile, NOTEBOOK)
    spec = cfg["default_preprocess"] if preprocess is None else preprocess
    arch = dataset_config(profile, dataset)["classifier"]
    sfm_data, _ = sfm_splits(profile, dataset)
    sfm_cfg = sfm_config(profile, sfm_data, ratio=ratio, overrides=overrides)
    init = bool(cfg["init_from_target"])
    build_classifier: Callable[[], nn.Module] = (
        (lambda: copy.deepcopy(target).requires_grad_(True)) if init else (lambda: classifier_from_spec(arch, sfm_data.info)))
    key = {"dataset": dataset, "arch": arch, "init": model_digest(target) if init else "scratch"}
    say = log or (lambda _msg: None)
    extra = f", overrides {dict(overrides)}" if overrides else ""
    say(f"--- {dataset}: SFM-Defense, T = {spec}, w1 = {ratio} x threshold{extra} "
        f"(w = {tuple(round(w, 6) for w in sfm_cfg.weights)})")
    built = trained_sfm(build_classifier, squeezer(spec), {"spec": spec}, sfm_data, sfm_cfg, key=key, device=device,
                        log=log)
    if built.meta["cache_hit"]:
        say(f"loaded from cache; mask status at the end of training: {built.meta['mask_status']}")
    built.meta["config"] = {**built.meta["config"], "ratio": float(ratio), "preprocess": spec}
    return built
