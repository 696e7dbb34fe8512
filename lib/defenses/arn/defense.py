"""ARN as a defense: a trained generator in front of the classifier, purify(x) = G(E(x)) in [0, 1]."""
from __future__ import annotations

import torch
from torch import nn

from lib.defenses.base import Defense


def to_unit(out_pm: torch.Tensor) -> torch.Tensor:
    """A generator's [-1, 1] output as an image in [0, 1] (clamped)."""
    return ((out_pm + 1) / 2).clamp(0.0, 1.0)


class Purifier(Defense):
    """A trained generator (ARN's autoencoder, APE-G's or HGD's network) as a Defense.

    Deterministic (evaluation uses z = mu) and differentiable end to end, so white-box attacks use its exact
    gradients; BPDA is only the paper's Table 4 variant, forced by the attack surface.
    """

    differentiable = True

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def purify(self, x: torch.Tensor) -> torch.Tensor:  # x is checked by Defense (lib.validate.check_images)
        self.generator.eval()
        return to_unit(self.generator(x).out)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The restored image G(E(x)) (the only image between input and classifier; the code z is not one)."""
        return {"restored": self.purify(x)}
