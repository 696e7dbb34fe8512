"""IDFR (anonymous ICLR-2022 submission, spec-001): a U-Net input denoiser (ID) and an MLP feature restorer (FR)
around a frozen classifier f = f_cls o f_enc. Prediction: f_cls(F_pi(f_enc(I_w(x)))).

- networks: InputDenoiser (Table 6), FeatureRestorer (Table 7), IDFRClassifier (the pipeline, ablations by leaving
  ID or FR out).
- losses: id_loss (Eq. 3 and two variants), fr_loss (Eq. 6).
- training: train_denoiser / train_feature_restorer (Alg. 1 / 2 through lib.train.fit), the convex-hull sampler,
  trained_denoiser / trained_idfr (cached) from an IDFRSetting (IDFRSetting.from_profile reads the profile).
- defense: InputDenoising (the ID as a lib Defense) and the factories `build` (ID + FR: the ID in front of the
  feature-restored classifier) and `build_denoiser` (ID alone).
- tables: every table and figure of notebook 02.
"""
from lib.defenses.idfr import tables
from lib.defenses.idfr.defense import InputDenoising, build, build_denoiser
from lib.defenses.idfr.losses import ID_LOSSES, fr_loss, id_loss
from lib.defenses.idfr.networks import FeatureRestorer, IDFRClassifier, InputDenoiser, restorer_dims
from lib.defenses.idfr.training import (ConvexHullSampler, FeaturePool, FRConfig, IDConfig, IDFRFit, IDFRSetting,
                                        attack_grid, feature_pool, mixture_adversarial, train_denoiser,
                                        train_feature_restorer, trained_denoiser, trained_idfr)

__all__ = ["tables", "InputDenoising", "build", "build_denoiser", "ID_LOSSES", "fr_loss", "id_loss",
           "FeatureRestorer", "IDFRClassifier", "InputDenoiser", "restorer_dims", "ConvexHullSampler", "FeaturePool",
           "FRConfig", "IDConfig", "IDFRFit", "IDFRSetting", "attack_grid", "feature_pool",
           "mixture_adversarial", "train_denoiser", "train_feature_restorer", "trained_denoiser", "trained_idfr"]
