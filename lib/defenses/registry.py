"""Every defense of the project by name, built (and trained, through the caches) for one profile and dataset.

The cross-defense benchmark, the visualisation notebooks and the explorer widget all go through
`build_defense`, so a defense is configured in exactly one place: its entry here reads the profile.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from lib.defenses.base import Defense, NoDefense
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.squeeze import BitDepthReduction, MedianFilter, NonLocalMeans

Builder = Callable[[Mapping[str, Any], str, nn.Module], Defense]


def _bits_for(dataset: str) -> int:
    """Xu et al.'s settings (1 bit for MNIST, 5 for colour images); 3 for Fashion-MNIST's textures (our choice)."""
    return 1 if dataset in ("mnist", "digits") else (3 if dataset == "fashion_mnist" else 5)


_BUILDERS: dict[str, Builder] = {
    "none": lambda profile, dataset, classifier: NoDefense(),
    "bit_depth": lambda profile, dataset, classifier: BitDepthReduction(_bits_for(dataset)),
    "median": lambda profile, dataset, classifier: MedianFilter(2),
    "nlm": lambda profile, dataset, classifier: NonLocalMeans(),
    "jpeg": lambda profile, dataset, classifier: JPEGCompression(75),
    "tvm": lambda profile, dataset, classifier: TotalVariationMinimization(seed=profile.get("seed", 0)),
}


def _regionsparse(profile: Mapping[str, Any], dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.regionsparse import regionsparse_for
    return regionsparse_for(profile, dataset)


def _sfm(profile: Mapping[str, Any], dataset: str, classifier: nn.Module) -> Defense:
    """SFM's mask + squeezer in front of `classifier` (notebook 01 evaluates it with SFM's own fine-tuned classifier)."""
    from lib.defenses.sfm import sfm_for
    _, defense, meta = sfm_for(profile, dataset, classifier, log=None)
    defense.train_seconds = meta["train_seconds"]
    return defense


def _reconstruction(profile: Mapping[str, Any], dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.reconstruction import reconstruction_for
    defense, meta = reconstruction_for(profile, dataset, classifier)
    defense.train_seconds = meta["train_seconds"]
    return defense


def _arn(profile: Mapping[str, Any], dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.arn import arn_for
    defense, meta = arn_for(profile, dataset, classifier)
    defense.train_seconds = meta["train_seconds"]
    return defense


_BUILDERS.update({"sfm": _sfm, "regionsparse": _regionsparse, "reconstruction": _reconstruction, "arn": _arn})


LABELS = {
    "none": "No defense",
    "bit_depth": "Bit-depth reduction",
    "median": "Median filter 2x2",
    "nlm": "Non-local means",
    "jpeg": "JPEG (q=75)",
    "tvm": "TVM",
    "sfm": "SFM mask + median 2x2",
    "regionsparse": "RegionSparse (OMP in the object region)",
    "reconstruction": "Compression + EDSR reconstruction",
    "arn": "ARN (attack-invariant restoration)",
}


def defense_names() -> list[str]:
    """Registered defense names, baselines first."""
    return list(_BUILDERS)


def build_defense(name: str, *, profile: Mapping[str, Any], dataset: str, classifier: nn.Module) -> Defense:
    """The named defense for `dataset`, fitted (or loaded from the cache) for `classifier` under `profile`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown defense {name!r}; valid: {', '.join(_BUILDERS)}")
    return _BUILDERS[name](profile, dataset, classifier)
