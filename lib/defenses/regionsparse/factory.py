"""The one RegionSparse factory: its dictionary learnt (cached) and K selected in the run, in front of a classifier."""
from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lib.defenses.base import Built
from lib.defenses.regionsparse.config import VARIANTS, RegionSparseConfig
from lib.defenses.regionsparse.defense import RegionSparse
from lib.defenses.regionsparse.evaluation import dictionary_images
from lib.defenses.regionsparse.selection import profile_config, select_sparsity
from lib.defenses.regionsparse.training import trained_dictionary


def build(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
          device: torch.device | None = None) -> Built:
    """RegionSparse for `dataset` in front of `classifier`: the profile's notebook-03 settings, the dictionary
    learnt on the dataset's benign training images (cached) and K chosen by `select_sparsity` (cached).
    meta: config (with the chosen K), train_seconds (dictionary learning), cache_key (the dictionary's) and
    `k_selection` (the candidates' table as records)."""
    selection = select_sparsity(profile, dataset, classifier, device=device)
    cfg = replace(profile_config(profile), sparsity=selection.chosen)
    atoms, meta = trained_dictionary(dictionary_images(profile, dataset).to(device), cfg)
    defense = RegionSparse(cfg, dictionary=atoms)
    if device is not None:
        defense = defense.to(device)
    return Built(defense, classifier, {"config": asdict(cfg), **meta,
                                       "k_selection": selection.table.to_dict("records")})


def variant_defenses(cfg: RegionSparseConfig, images: torch.Tensor, names: Sequence[str] | None = None
                     ) -> dict[str, RegionSparse]:
    """RegionSparse and its Fig. 4 ablations (VARIANTS) with `cfg`'s K, each with the dictionary its flags call
    for (learnt on `images` once per distinct dictionary setting, cached)."""
    out: dict[str, RegionSparse] = {}
    for name in names or list(VARIANTS):
        vcfg = cfg.variant(name)
        out[name] = RegionSparse(vcfg, dictionary=trained_dictionary(images, vcfg)[0])
    return out
