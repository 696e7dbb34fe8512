"""Attack registry: every attack by name, and `generate` to run one over a dataset in mini-batches."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

from lib.attacks.autoattack import autoattack
from lib.attacks.cw import cw_l2
from lib.attacks.ddn import ddn
from lib.attacks.deepfool import deepfool
from lib.attacks.gradient import bim, di_fgsm, fgsm, mi_fgsm, pgd, pgd_l2
from lib.attacks.spatial import stadv
from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

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


# the keys of one attack entry in a profile (lib.evaluate.attack_specs turns entries into AttackSpecs)
ATTACK_ENTRY_KEYS = ("name", "label", "params", "l2_budget", "norm")


def get_attack(name: str) -> Callable[..., torch.Tensor]:
    """The attack function registered under `name`; ValueError listing the valid names otherwise."""
    if not isinstance(name, str) or name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def check_attack_params(name: str, params: Mapping[str, Any]) -> None:
    """ValueError unless attack `name` exists and accepts every keyword in `params` (checked before any work)."""
    attack = get_attack(name)
    signature = inspect.signature(attack).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        return   # a thin alias (pgd_l2): its target attack checks the keywords
    allowed = [p.name for p in signature.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(allowed)}")


def check_attack_entry(entry: Any, where: str = "attack") -> None:
    """ValueError naming `where` unless `entry` is a profile's attack entry: a mapping with a registered `name`,
    `params` the attack accepts, an optional string `label`, an optional `l2_budget` >= 0 and nothing else."""
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ValueError(f"{where} must be a mapping with at least 'name' (keys: {', '.join(ATTACK_ENTRY_KEYS)}), "
                         f"got {entry!r}")
    unknown = sorted(set(map(str, entry)) - set(ATTACK_ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ATTACK_ENTRY_KEYS)}")
    params = entry.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.params must be a mapping of keyword arguments, got {params!r}")
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}.label must be a string, got {label!r}")
    if entry.get("l2_budget") is not None:
        check_nonnegative(entry["l2_budget"], f"{where}.l2_budget")
    try:
        check_attack_params(entry["name"], params)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def generate(name: str, model: Model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
             **params) -> torch.Tensor:
    """Run attack `name` with `params` over x in mini-batches of batch_size and concatenate the results."""
    attack = get_attack(name)
    check_attack_params(name, params)
    check_attack_inputs(model, x, y)
    check_positive_int(batch_size, "batch_size")
    return torch.cat([attack(model, xb, yb, **params) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
