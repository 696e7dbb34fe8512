"""SFM-Defense (Yu et al. 2022): a sparse feature masker in front of a feature-squeezing preprocessor.

An Attention U-Net G predicts one mask channel m = G(x) in [0, 1]; the defended prediction is F(T(x * m)) (mask
first, then the squeezer T), with F SFM's own classifier. G is trained with Eq. 2 alternating with cross-entropy
epochs of F (Algorithm 1); w1 is chosen in the run on a validation split.

    networks   the mask generator (Attention U-Net), F(x * G(x)), the cached (F, G) pair
    losses     Eqs. 2-5 and the loss scale (identity threshold, w1 as a ratio of it)
    training   Algorithm 1 (train_sfm) and its cache (trained_sfm)
    defense    SFMDefense: purify, flags, BPDA approximation, stages
    factory    the profile's splits and settings, one SFM at a given ratio (sfm_for)
    selection  the w1 sweep and `build`, the one factory the registry calls
    tables     every table and figure of notebook 01
"""
from lib.defenses.sfm.defense import SFMDefense
from lib.defenses.sfm.factory import NOTEBOOK, sfm_config, sfm_for, sfm_splits
from lib.defenses.sfm.losses import paper_threshold_ratio, w1_for_ratio
from lib.defenses.sfm.networks import AttentionUNet, MaskedClassifier
from lib.defenses.sfm.selection import W1Sweep, build, sweep_attacks, w1_sweep
from lib.defenses.sfm.training import SFMConfig, mask_statistics, train_sfm, trained_sfm

__all__ = ["AttentionUNet", "MaskedClassifier", "NOTEBOOK", "SFMConfig", "SFMDefense", "W1Sweep", "build",
           "mask_statistics", "paper_threshold_ratio", "sfm_config", "sfm_for", "sfm_splits", "sweep_attacks",
           "train_sfm", "trained_sfm", "w1_for_ratio", "w1_sweep"]
