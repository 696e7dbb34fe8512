"""The defense contract: purify(x) -> x' (same shape, [0, 1]); the defended model is classifier(purify(x))."""
from __future__ import annotations

import torch
from torch import nn


class Defense(nn.Module):
    """Base class of every input-purification defense.

    Subclasses implement `purify`. `differentiable` says whether gradients through `purify` are
    meaningful (white-box attacks use them directly; otherwise BPDA is needed). `randomized`
    says whether two calls on the same input may differ (white-box attacks then need EOT).
    `fit` trains whatever the defense learns; defenses with nothing to learn keep the no-op.
    """

    differentiable: bool = True
    randomized: bool = False

    def purify(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)

    def fit(self, *args, **kwargs) -> "Defense":
        return self


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
    """Defenses applied in order; differentiable only if every step is, randomised if any step is."""

    def __init__(self, *steps: Defense):
        super().__init__()
        if not steps:
            raise ValueError("Compose needs at least one defense")
        self.steps = nn.ModuleList(steps)
        self.differentiable = all(s.differentiable for s in steps)
        self.randomized = any(s.randomized for s in steps)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step.purify(x)
        return x

    def fit(self, *args, **kwargs) -> "Compose":
        for step in self.steps:
            step.fit(*args, **kwargs)
        return self
