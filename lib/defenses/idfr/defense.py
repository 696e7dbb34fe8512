"""IDFR under the project's defense contract (lib.defenses.base).

The input denoiser is the purifier (`InputDenoising`); the feature restorer lives inside the classifier, so the
full IDFR is Built(InputDenoising(I_w), f_cls o F_pi o f_enc): `built.model()` is f_cls(F_pi(f_enc(I_w(x)))).
Registry entries "idfr" (`build`) and "idfr_id" (`build_denoiser`, the ID in front of the unchanged target).
"""
from __future__ import annotations

import torch
from torch import nn

from lib.defenses.base import Built, Defense, Profile
from lib.defenses.idfr.networks import IDFRClassifier, InputDenoiser
from lib.defenses.idfr.training import IDFRSetting, trained_denoiser, trained_idfr


class InputDenoising(Defense):
    """The ID as a lib Defense: purify = I_w(x), differentiable end to end (white-box attacks need no BPDA)."""

    differentiable = True

    def __init__(self, denoiser: InputDenoiser):
        super().__init__()
        self.denoiser = denoiser

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x).clamp(0.0, 1.0)

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """'residual': |I_w(x) - x|, what the denoiser changed (in [0, 1], x's shape)."""
        return {"residual": (self.purify(x) - x).abs()}


def build(profile: Profile, dataset: str, classifier: nn.Module, *, device: torch.device | None = None) -> Built:
    """ID + FR for `classifier` on `dataset` with the profile's 02_idfr settings (trained once, then cached):
    the denoiser as the defense, the classifier with the feature restorer inserted as Built.classifier."""
    setting = IDFRSetting.from_profile(profile, dataset)
    fit = trained_idfr(classifier, setting, device=device)
    return Built(InputDenoising(fit.denoiser), IDFRClassifier(classifier, restorer=fit.restorer),
                 {"config": setting.config(), "train_seconds": float(fit.meta["id_seconds"] + fit.meta["fr_seconds"]),
                  "cache_key": fit.meta["fr_cache_key"]})


def build_denoiser(profile: Profile, dataset: str, classifier: nn.Module, *,
                   device: torch.device | None = None) -> Built:
    """The ID alone (no feature restorer) in front of the unchanged `classifier`; same settings and cache as `build`."""
    setting = IDFRSetting.from_profile(profile, dataset)
    denoiser, _, meta = trained_denoiser(classifier, setting, device=device)
    return Built(InputDenoising(denoiser), classifier,
                 {"config": setting.config(), "train_seconds": float(meta["train_seconds"]),
                  "cache_key": meta["cache_key"]})
