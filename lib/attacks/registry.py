"""Attack registry: every attack by name, and `generate` to run one over a dataset in mini-batches."""
from __future__ import annotations

from typing import Callable

import torch

from lib.attacks.autoattack import autoattack
from lib.attacks.cw import cw_l2
from lib.attacks.ddn import ddn
from lib.attacks.deepfool import deepfool
from lib.attacks.gradient import bim, di_fgsm, fgsm, mi_fgsm, pgd, pgd_l2
from lib.attacks.spatial import stadv
from lib.validate import check_images, check_labels, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "pgd_l2": pgd_l2,
    "bim": bim,
    "mi_fgsm": mi_fgsm,
    "di_fgsm": di_fgsm,
    "cw_l2": cw_l2,
    "deepfool": deepfool,
    "ddn": ddn,
    "stadv": stadv,
    "autoattack": autoattack,
}


def get_attack(name: str) -> Callable[..., torch.Tensor]:
    """The attack function registered under `name`; ValueError listing the valid names otherwise."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def generate(name: str, model: Model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
             **params) -> torch.Tensor:
    """Run attack `name` with `params` over x in mini-batches of batch_size and concatenate the results."""
    attack = get_attack(name)
    check_images(x)
    check_labels(y, x.shape[0])
    check_positive_int(batch_size, "batch_size")
    return torch.cat([attack(model, xb, yb, **params) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
