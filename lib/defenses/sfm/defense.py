"""SFM-Defense at inference (spec-000 §2.7): purify(x) = T(x * G(x)), classified by SFM's own fine-tuned F."""
from __future__ import annotations

import torch
from torch import nn

from lib.defenses.base import Defense, NoDefense
from lib.defenses.sfm.networks import MaskedClassifier


class SFMDefense(Defense):
    """purify(x) = T(x * G(x)): the mask of G, then the squeezer T; the defended model is F(purify(x)).

    Flags follow the steps: G is differentiable, so the defense is differentiable exactly when T is (the 2x2
    median passes its gradient to the selected pixel; bit depth and non-local means have none) and randomised
    when T is. Without an exact gradient, `bpda_purify` differentiates G exactly and T by its own approximation,
    else the identity (spec-000 §8 item 8, revised).
    """

    def __init__(self, masker: nn.Module, preprocess: Defense | None = None):
        super().__init__()
        self.masker = masker
        self.preprocess = preprocess if preprocess is not None else NoDefense()
        self.differentiable = self.preprocess.differentiable
        self.randomized = self.preprocess.randomized
        if not self.differentiable:
            self.bpda_purify = self._masked_then_approximate_t

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """m = G(x), shape (N, 1, H, W), values in [0, 1]."""
        return self.masker(x)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x~ = x * G(x), the mask broadcast over channels."""
        return x * self.masker(x)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocess.purify(self.masked(x))

    def _masked_then_approximate_t(self, x: torch.Tensor) -> torch.Tensor:
        approximate_t = self.preprocess.bpda_purify
        masked = self.masked(x)
        return masked if approximate_t is None else approximate_t(masked)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mask (expanded to x's channels) and the masked image x * m; purify(x) = T(x * m) follows them."""
        mask = self.masker(x)
        masked = x * mask
        return {"mask": mask.expand_as(x), "masked": masked}

    def gray_box_model(self, classifier: nn.Module) -> MaskedClassifier:
        """The model a gray-box attacker differentiates: classifier(x * G(x)), without T."""
        return MaskedClassifier(classifier, self.masker)
