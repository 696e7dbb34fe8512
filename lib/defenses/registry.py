"""Every defense of the project by name, each built through the one factory signature of `lib.defenses.base`.

`build(name, profile, dataset, classifier)` returns a `Built`: the defense, the classifier it sits in front of
(the given one, or the defense's own: SFM's fine-tuned F, the adversarially trained model, IDFR's
feature-restored classifier) and metadata. The cross-defense benchmark, the visualisation notebooks and the
explorer all go through this module, so each defense is configured in one place: the profile section its
factory reads, and the selections (SFM's w1, RegionSparse's K) its paper package makes in the run.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable, Sequence

import torch
from torch import nn

from lib.data import DatasetUnavailable
from lib.defenses.base import Built, Defense, DefenseFactory, NoDefense, NotBuiltForDataset, Profile
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.squeeze import BitDepthReduction, MedianFilter, NonLocalMeans


def bits_for(dataset: str) -> int:
    """Xu et al.'s settings (1 bit for MNIST, 5 for colour images); 3 for Fashion-MNIST's textures (our choice)."""
    return 1 if dataset in ("mnist", "digits") else (3 if dataset == "fashion_mnist" else 5)


def _fixed(make: "type[Defense] | None" = None, **config) -> DefenseFactory:
    """Factory of a parameter-free defense in front of the given classifier."""

    def factory(profile: Profile, dataset: str, classifier: nn.Module, *,
                device: torch.device | None = None) -> Built:
        settings = {k: (v(profile, dataset) if callable(v) else v) for k, v in config.items()}
        defense = make(**settings) if make is not None else NoDefense()
        return Built(defense, classifier, {"config": settings})

    return factory


def _paper(module: str, factory: str = "build") -> DefenseFactory:
    """The factory `factory` of paper package lib.defenses.<module>, imported when first used."""

    def build_paper_defense(profile: Profile, dataset: str, classifier: nn.Module, *,
                            device: torch.device | None = None) -> Built:
        return getattr(import_module(f"lib.defenses.{module}"), factory)(profile, dataset, classifier, device=device)

    return build_paper_defense


def _adversarial_training(profile: Profile, dataset: str, classifier: nn.Module, *,
                          device: torch.device | None = None) -> Built:
    """Madry et al.'s PGD adversarial training: no purifier, the adversarially trained classifier (cached)."""
    from lib.train import trained_classifier
    model, meta = trained_classifier(profile, dataset, "adversarial", device=device)
    return Built(NoDefense(), model, {"config": {"role": "adversarial"}, "train_seconds": float(meta["train_seconds"]),
                                      "cache_key": meta["cache_key"]})


ENTRIES: dict[str, tuple[str, DefenseFactory]] = {
    "none": ("No defense", _fixed()),
    "bit_depth": ("Bit-depth reduction", _fixed(BitDepthReduction, bits=lambda profile, dataset: bits_for(dataset))),
    "median": ("Median filter 2x2", _fixed(MedianFilter, size=2)),
    "nlm": ("Non-local means", _fixed(NonLocalMeans)),
    "jpeg": ("JPEG (q=75)", _fixed(JPEGCompression, quality=75)),
    "tvm": ("TVM", _fixed(TotalVariationMinimization)),   # masks from torch's RNG: the evaluation seeds it per chunk
    "adv_training": ("PGD adversarial training", _adversarial_training),
    "sfm": ("SFM mask + median 2x2 (own classifier)", _paper("sfm")),
    "idfr_id": ("IDFR input denoiser (ID only)", _paper("idfr", "build_denoiser")),
    "idfr": ("IDFR (denoiser + feature restorer)", _paper("idfr")),
    "regionsparse": ("RegionSparse (OMP in the object region)", _paper("regionsparse")),
    "reconstruction": ("Compression + EDSR reconstruction", _paper("reconstruction")),
    "arn": ("ARN (attack-invariant restoration)", _paper("arn")),
}

LABELS: dict[str, str] = {name: label for name, (label, _) in ENTRIES.items()}


def defense_names() -> list[str]:
    """Every registered defense, baselines first."""
    return list(ENTRIES)


def build(name: str, profile: Profile, dataset: str, classifier: nn.Module, *,
          device: torch.device | None = None) -> Built:
    """The named defense for `dataset`, built (and trained, or loaded from the cache) for `classifier`."""
    if name not in ENTRIES:
        raise ValueError(f"unknown defense {name!r}; valid: {', '.join(ENTRIES)}")
    built = ENTRIES[name][1](profile, dataset, classifier, device=device)
    bounded(built.defense, profile, name)
    return built


def purify_batch_size(profile: Profile, name: str) -> int | None:
    """The profile's `purify_batch_sizes[name]`: the most images one purify call of registry defense `name` may get
    (None: not bounded). ValueError for a name that is no registered defense or a size that is no positive integer."""
    sizes = profile.get("purify_batch_sizes") or {}
    unknown = sorted(set(sizes) - set(ENTRIES))
    if unknown:
        raise ValueError(f"profile {profile.get('name')!r}: purify_batch_sizes names unknown defense(s) {unknown}; "
                         f"valid: {', '.join(ENTRIES)}")
    size = sizes.get(name)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"profile {profile.get('name')!r}: purify_batch_sizes.{name} must be a positive integer, "
                         f"got {size!r}")
    return size


def bounded(defense: Defense, profile: Profile, name: str) -> Defense:
    """`defense` with its `max_batch` set to purify_batch_size(profile, name) when the profile names one (else left
    as it is); returns the defense."""
    size = purify_batch_size(profile, name)
    if size is not None:
        defense.max_batch = size
    return defense


def build_each(names: Sequence[str], profile: Profile, dataset: str, classifier: nn.Module, *,
               skip: Callable[[str, str], None], device: torch.device | None = None) -> dict[str, Built]:
    """{name: build(name, ...)} for each named defense that can be built for `dataset`. One that cannot (its data
    or weights are missing: DatasetUnavailable; the profile has no settings for it there: NotBuiltForDataset) is
    reported as skip(f"{name} on {dataset}", reason) and left out, so the others still run."""
    built: dict[str, Built] = {}
    for name in names:
        try:
            built[name] = build(name, profile, dataset, classifier, device=device)
        except (DatasetUnavailable, NotBuiltForDataset) as err:
            skip(f"{name} on {dataset}", str(err))
    return built
