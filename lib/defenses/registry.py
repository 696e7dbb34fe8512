"""Every defense of the project by name, built (and trained, through the caches) for one profile and dataset.

Two kinds: purifiers (`build_defense`: a Defense placed in front of the classifier) and defenses that
replace the classifier's forward pass (`build_defended_model`: PGD adversarial training, IDFR's
denoiser + feature restorer). The cross-defense benchmark, the visualisation notebooks and the explorer
all go through this module, so each defense is configured in one place: the profile section its entry reads.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from lib.defenses.base import Defense, NoDefense
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.squeeze import BitDepthReduction, MedianFilter, NonLocalMeans

Profile = Mapping[str, Any]


def _bits_for(dataset: str) -> int:
    """Xu et al.'s settings (1 bit for MNIST, 5 for colour images); 3 for Fashion-MNIST's textures (our choice)."""
    return 1 if dataset in ("mnist", "digits") else (3 if dataset == "fashion_mnist" else 5)


def _timed(defense: Defense, meta: Mapping[str, Any]) -> Defense:
    """Attach the training seconds of the run that trained it (kept in the cache metadata)."""
    defense.train_seconds = float(meta["train_seconds"])
    return defense


def _sfm(profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    """SFM's mask + squeezer in front of `classifier` (notebook 01 evaluates it with SFM's own fine-tuned classifier)."""
    from lib.defenses.sfm import sfm_for
    _, defense, meta = sfm_for(profile, dataset, classifier, log=None)
    return _timed(defense, meta)


def _idfr_denoiser(profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    """IDFR's input denoiser alone (the full IDFR also restores features: see build_defended_model)."""
    from lib.defenses.idfr import InputDenoising, idfr_for
    fit = idfr_for(profile, dataset, classifier)
    return _timed(InputDenoising(fit.denoiser), {"train_seconds": fit.meta["id_seconds"]})


def _regionsparse(profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.regionsparse import regionsparse_for
    return regionsparse_for(profile, dataset)


def _reconstruction(profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.reconstruction import reconstruction_for
    return _timed(*reconstruction_for(profile, dataset, classifier))


def _arn(profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    from lib.defenses.arn import arn_for
    return _timed(*arn_for(profile, dataset, classifier))


_PURIFIERS: dict[str, tuple[str, Callable[[Profile, str, nn.Module], Defense]]] = {
    "none": ("No defense", lambda profile, dataset, classifier: NoDefense()),
    "bit_depth": ("Bit-depth reduction", lambda profile, dataset, classifier: BitDepthReduction(_bits_for(dataset))),
    "median": ("Median filter 2x2", lambda profile, dataset, classifier: MedianFilter(2)),
    "nlm": ("Non-local means", lambda profile, dataset, classifier: NonLocalMeans()),
    "jpeg": ("JPEG (q=75)", lambda profile, dataset, classifier: JPEGCompression(75)),
    "tvm": ("TVM", lambda profile, dataset, classifier: TotalVariationMinimization(seed=profile.get("seed", 0))),
    "sfm": ("SFM mask + median 2x2", _sfm),
    "idfr_id": ("IDFR input denoiser (ID only)", _idfr_denoiser),
    "regionsparse": ("RegionSparse (OMP in the object region)", _regionsparse),
    "reconstruction": ("Compression + EDSR reconstruction", _reconstruction),
    "arn": ("ARN (attack-invariant restoration)", _arn),
}


def _adversarial_training(profile: Profile, dataset: str, classifier: nn.Module) -> tuple[nn.Module, float]:
    from lib.train import trained_classifier
    model, meta = trained_classifier(profile, dataset, "adversarial")
    return model, float(meta["train_seconds"])


def _idfr(profile: Profile, dataset: str, classifier: nn.Module) -> tuple[nn.Module, float]:
    from lib.defenses.idfr import idfr_for
    fit = idfr_for(profile, dataset, classifier)
    return fit.pipelines(classifier)["ID+FR"], float(fit.meta["id_seconds"] + fit.meta["fr_seconds"])


_MODELS: dict[str, tuple[str, Callable[[Profile, str, nn.Module], tuple[nn.Module, float]]]] = {
    "adv_training": ("PGD adversarial training", _adversarial_training),
    "idfr": ("IDFR (denoiser + feature restorer)", _idfr),
}

LABELS = {name: label for name, (label, _) in {**_PURIFIERS, **_MODELS}.items()}


def defense_names() -> list[str]:
    """Registered purifier names, baselines first."""
    return list(_PURIFIERS)


def defended_model_names() -> list[str]:
    """Registered defenses that replace the classifier's forward pass."""
    return list(_MODELS)


def build_defense(name: str, *, profile: Profile, dataset: str, classifier: nn.Module) -> Defense:
    """The named purifier for `dataset`, fitted (or loaded from the cache) for `classifier` under `profile`.

    A learned purifier carries `train_seconds` (of the run that trained it, also when loaded from the cache).
    """
    if name not in _PURIFIERS:
        raise ValueError(f"unknown defense {name!r}; valid: {', '.join(_PURIFIERS)}")
    return _PURIFIERS[name][1](profile, dataset, classifier)


def build_defended_model(name: str, *, profile: Profile, dataset: str, classifier: nn.Module
                         ) -> tuple[nn.Module, float]:
    """(model replacing `classifier`, its training seconds) for a defense that is not an input purifier."""
    if name not in _MODELS:
        raise ValueError(f"unknown defended model {name!r}; valid: {', '.join(_MODELS)}")
    return _MODELS[name][1](profile, dataset, classifier)
