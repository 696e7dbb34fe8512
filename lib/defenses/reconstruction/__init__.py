"""Paper 003 (Zhang et al., PeerJ CS 2021): pixel-depth compression Q_k followed by an EDSR-style restorer R_θ.

The defense is D(x) = clamp(R_θ(Q_k(x)), 0, 1) in front of an unchanged classifier (spec-003 §2.1).

- `networks`: R_θ (EDSRRestorer) and its closed-form parameter count.
- `losses`: eq. (4).
- `defense`: Q_k (`quantize`, its straight-through BPDA version) and the Defense classes.
- `training`: `train_edsr`, `trained_reconstruction`, `trained_paper_classifier`, and `build`, the factory.
- `protocol`: the paper's attacks (BIM step rule, DeepFool/CW clipped to the ε-ball) and evaluation rows.
- `tables`: every table and figure of notebook 04 (Figs. 1, 3-8, Tables 1-4, the BPDA extension).
"""
from lib.defenses.reconstruction.defense import (
    PixelDepthCompression, ReconstructionDefense, quantize, straight_through_quantize,
)
from lib.defenses.reconstruction.losses import restorer_loss
from lib.defenses.reconstruction.networks import EDSRRestorer, edsr_parameter_count
from lib.defenses.reconstruction.protocol import bim_schedule, clip_to_linf_ball, paper_attacks, robustness_rows
from lib.defenses.reconstruction.training import (
    RestorerConfig, build, edsr_lr_factor, fgsm_examples, train_edsr, trained_paper_classifier,
    trained_reconstruction,
)

__all__ = [
    "EDSRRestorer", "PixelDepthCompression", "ReconstructionDefense", "RestorerConfig", "bim_schedule", "build",
    "clip_to_linf_ball", "edsr_lr_factor", "edsr_parameter_count", "fgsm_examples", "paper_attacks", "quantize",
    "restorer_loss", "robustness_rows", "straight_through_quantize", "train_edsr", "trained_paper_classifier",
    "trained_reconstruction",
]
