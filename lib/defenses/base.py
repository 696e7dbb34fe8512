"""The defense contract shared by every defense of the five papers and the baselines.

A defense is built by one factory signature, `build(profile, dataset, classifier, *, device) -> Built`, and the
defended model is always `built.classifier(built.defense.purify(x))`. `built.classifier` is the classifier the
defense is meant to sit in front of: the given one, or the defense's own (SFM's fine-tuned F, an adversarially
trained model, IDFR's feature-restored classifier). Registry, benchmark and explorer use only this contract.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import nn

from lib.validate import check_images

Profile = Mapping[str, Any]


class NotBuiltForDataset(ValueError):
    """A defense has no settings for a dataset in the profile (its paper did not use the dataset, or the profile
    leaves it out), so its factory cannot build it there. Notebooks record it as a skip and go on with the rest."""


class Defense(nn.Module):
    """Base class of every input-purification defense.

    Subclasses implement `purify` (a batch in [0, 1] in, a batch of the same shape in [0, 1] out).
    `differentiable`: gradients through `purify` are exact (white-box attacks use them directly; otherwise BPDA).
    `randomized`: two calls on the same input may differ (white-box attacks then need EOT).
    `bpda_purify`: a differentiable approximation of `purify` for BPDA's backward pass, when the defense has a
    better one than the identity; None otherwise.
    `stages(x)`: named intermediate images (mask, masked, compressed, restored...) for figures and the explorer.
    `max_batch`: the most images one `purify` call may get (the profile's `purify_batch_sizes`, set by
    lib.defenses.registry.bounded); evaluations that stream a set through the defense (lib.evaluate) split it into
    batches of at most this size, so its memory does not grow with the set.

    Every subclass's `purify` checks its input first (lib.validate.check_images: a finite float batch (N, C, H, W)
    in [0, 1]), wrapped on once here, so NaN, infinite or 0-255 images get one clear error from any defense
    instead of a silent result; the check leaves gradients untouched.
    """

    differentiable: bool = True
    randomized: bool = False
    bpda_purify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    max_batch: Optional[int] = None   # images per purify call the profile allows (purify_batch_sizes); None: any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "purify" in cls.__dict__:
            cls.purify = _checked_purify(cls.__dict__["purify"])

    def purify(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediate images of `purify(x)`, each of x's shape, in pipeline order (none by default)."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)


def _checked_purify(purify: Callable[[Defense, torch.Tensor], torch.Tensor]
                    ) -> Callable[[Defense, torch.Tensor], torch.Tensor]:
    """`purify` with its input checked by check_images first."""

    @functools.wraps(purify)
    def checked(self: Defense, x: torch.Tensor) -> torch.Tensor:
        check_images(x)
        return purify(self, x)

    return checked


@dataclass
class Built:
    """What every defense factory returns: the defense, the classifier it sits in front of, and metadata.

    `meta` always has `config` (the settings it was built with), `train_seconds` (of the run that trained it,
    also when loaded from the cache; 0 for parameter-free defenses) and `cache_key` (None when nothing is cached).
    """

    defense: Defense
    classifier: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.meta = {"config": {}, "train_seconds": 0.0, "cache_key": None, **self.meta}

    def model(self) -> "Defended":
        """The defended model classifier(purify(x)) as one module."""
        return Defended(self.classifier, self.defense)


class DefenseFactory(Protocol):
    """The one factory signature of every defense."""

    def __call__(self, profile: Profile, dataset: str, classifier: nn.Module, *,
                 device: torch.device | None = None) -> Built: ...


class NoDefense(Defense):
    """The identity: the undefended classifier."""

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Defended(nn.Module):
    """classifier(defense.purify(x)) as one module, so attacks can treat it as a plain model."""

    def __init__(self, classifier: nn.Module, defense: Defense):
        super().__init__()
        self.classifier = classifier
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.defense.purify(x))


class Compose(Defense):
    """Defenses applied in order; differentiable only if every step is, randomised if any step is.

    Its BPDA approximation chains each step's own (`bpda_purify`, else `purify` when differentiable, else the
    step's forward under a straight-through gradient); its stages are every step's output, named by the step.
    """

    def __init__(self, *steps: Defense):
        super().__init__()
        if not steps:
            raise ValueError("Compose needs at least one defense")
        self.steps = nn.ModuleList(steps)
        self.differentiable = all(s.differentiable for s in steps)
        self.randomized = any(s.randomized for s in steps)
        if not self.differentiable and any(s.bpda_purify is not None for s in steps):
            self.bpda_purify = self._bpda_purify

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step.purify(x)
        return x

    def _bpda_purify(self, x: torch.Tensor) -> torch.Tensor:
        from lib.attacks.adaptive import bpda
        for step in self.steps:
            if step.bpda_purify is not None:
                x = step.bpda_purify(x)
            else:
                x = step.purify(x) if step.differentiable else bpda(step.purify)(x)
        return x

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, step in enumerate(self.steps):
            out.update(step.stages(x))
            x = step.purify(x)
            if i < len(self.steps) - 1:
                out[f"after {type(step).__name__}"] = x
        return out
