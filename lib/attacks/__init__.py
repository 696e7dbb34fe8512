"""Attacks in pixel space [0, 1]: gradient, optimisation, spatial and AutoAttack, plus adaptive wrappers.

Every attack is `attack(model, x, y, *, <params>, targeted=False) -> x_adv`; `ATTACKS` maps names to them
and `generate(name, model, x, y, **params)` runs one over a dataset in mini-batches.
"""
from lib.attacks.adaptive import BPDA, EOT, attack_surface, bpda
from lib.attacks.autoattack import autoattack
from lib.attacks.cw import cw_l2, cw_l2_fixed_c
from lib.attacks.ddn import ddn
from lib.attacks.deepfool import deepfool
from lib.attacks.gradient import bim, di_fgsm, fgsm, input_diversity, mi_fgsm, pgd, pgd_l2
from lib.attacks.registry import ATTACKS, generate, get_attack
from lib.attacks.spatial import stadv
from lib.attacks.strength import mi_fgsm_at_l2, normalized_l2, scale_to_normalized_l2

__all__ = [
    "ATTACKS", "BPDA", "EOT", "attack_surface", "autoattack", "bim", "bpda", "cw_l2", "cw_l2_fixed_c", "ddn", "deepfool",
    "di_fgsm", "fgsm", "generate", "get_attack", "input_diversity", "mi_fgsm", "mi_fgsm_at_l2", "normalized_l2",
    "pgd", "pgd_l2", "scale_to_normalized_l2", "stadv",
]
