"""ARN (Zhou et al., ICML 2021): an adversarial-noise-removing autoencoder built on attack-invariant features.

The encoder E learns a latent code that an attack discriminator D_A cannot attribute to any attack (L_att) and
whose posterior is pulled to N(0, I) (the VAE-style normalisation term L_nor); the decoder G reconstructs the
natural image (L_mse) and fools an image discriminator D_I (L_adv). The defended model is f(G(E(x))).
The same trainer, with other weights or generator networks, gives the baselines of the paper's tables:
a pixel-loss (MSE-only) denoiser, an APE-GAN-style purifier, an HGD-style (logit-guided) denoiser.
Spec: shared/papers/spec-004-attack-invariant.md.

Modules: networks (E/G, D_A, D_I, the baselines' generator), losses (Eqs. 1-8, presets), training (Algorithm 1
through lib.train.fit, caching, the tables' variants), suite (the attacks of the tables as configuration),
defense (Purifier), tables (every table and figure of notebook 05).
"""
from __future__ import annotations

import torch
from torch import nn

from lib.defenses.arn import tables
from lib.defenses.arn.defense import Purifier
from lib.defenses.arn.training import trained_profile_variant
from lib.defenses.base import Built, Profile

__all__ = ["Purifier", "build", "tables", "trained_profile_variant"]


def build(profile: Profile, dataset: str, classifier: nn.Module, *, device: torch.device | None = None) -> Built:
    """The profile's main purifier, ARN_PP (seen attacks PGD_N + PGD_T, first seed), trained against `classifier`
    (cached) and sitting in front of it."""
    defense, meta = trained_profile_variant(profile, dataset, classifier, variant="ARN_PP", device=device)
    return Built(defense, classifier, {"config": meta["config"], "train_seconds": float(meta["train_seconds"]),
                                       "cache_key": meta["cache_key"], "cache_hit": meta["cache_hit"]})
