"""Choosing w1 in the run (the grid search of spec-000 §3.6), and the registry's SFM-Defense built from that choice.

One SFM-Defense (default squeezer) is trained per ratio of the profile's `sweep_ratios` (w1 as a multiple of the
identity threshold, spec-000 §2.5.1); the chosen ratio maximises the paper's criterion, clean + black-box accuracy,
measured on OUR validation split (held out of the training split), never on test data or the paper's numbers.
Models and adversarial sets come from the caches, so a second sweep in the same or a later run takes seconds;
notebook 01, the registry and through it notebooks 06-09 and the explorer all get the same ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from lib.defenses.base import Built
from lib.defenses.sfm.factory import NOTEBOOK, sfm_for, sfm_splits
from lib.defenses.sfm.training import Log, last_masker_epoch
from lib.evaluate import AttackSpec, attack_specs, evaluate_threats
from lib.profiles import notebook_config
from lib.train import trained_classifier

CRITERION = "val clean + black"


@dataclass
class W1Sweep:
    """The sweep's table (one row per ratio), the chosen ratio and the SFM-Defense trained at each ratio."""

    table: pd.DataFrame
    ratio: float
    models: dict[float, Built]

    @property
    def chosen(self) -> Built:
        """The SFM-Defense at the chosen ratio."""
        return self.models[self.ratio]


def sweep_attacks(config: Mapping[str, Any]) -> tuple[AttackSpec, AttackSpec]:
    """(black-box attack of the selection criterion, gray-box attack of Fig. 3) from notebook 01's profile section:
    the last summary attack, and the black-box attack of the same name (else the first black-box attack)."""
    gray = [s for s in attack_specs(config["gray_attacks"]) if s.title in config["summary_attacks"]][-1]
    black = attack_specs(config["black_attacks"])
    return next((s for s in black if s.title == gray.title), black[0]), gray


def choose(table: pd.DataFrame, column: str = CRITERION) -> float:
    """The ratio of the row with the largest `column` (the first such row, i.e. the smallest ratio, on a tie)."""
    return float(table.loc[table[column].idxmax(), "w1 / threshold"])


def w1_sweep(profile: Mapping[str, Any], dataset: str, target: nn.Module, surrogate: nn.Module, *,
             device: torch.device | None = None, log: Log | None = print) -> W1Sweep:
    """One SFM-Defense per ratio of `sweep_ratios`, scored by clean + black-box accuracy on the validation split.

    `target` is the profile's target classifier (F starts from it when the profile says so), `surrogate` the
    independent model the black-box examples are crafted on. Table columns: dataset, 'w1 / threshold', w1,
    'val clean', 'val black <attack>', 'val clean + black', 'mask mean' (last SFM epoch), 'mask status'.
    """
    config = notebook_config(profile, NOTEBOOK)
    black_attack, _ = sweep_attacks(config)
    _, val = sfm_splits(profile, dataset)
    rows, models = [], {}
    for ratio in sorted(set(float(r) for r in config["sweep_ratios"])):
        built = sfm_for(profile, dataset, target, ratio=ratio, device=device, log=log)
        scores = evaluate_threats(built.classifier, {"ours": built.defense}, val.x, val.y, [black_attack],
                                  threats=("black",), surrogate=surrogate, device=device)
        last = last_masker_epoch(built.meta["history"])
        clean, black = float(scores.clean_acc.iloc[0]), float(scores.robust_acc.iloc[0])
        rows.append({"dataset": dataset, "w1 / threshold": ratio, "w1": built.meta["config"]["w1"], "val clean": clean,
                     f"val black {black_attack.title}": black, CRITERION: clean + black,
                     "mask mean": last["mask_mean"] if last else float("nan"), "mask status": built.meta["mask_status"]})
        models[ratio] = built
    table = pd.DataFrame(rows)
    return W1Sweep(table, choose(table), models)


def build(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
          device: torch.device | None = None) -> Built:
    """The registry's SFM-Defense: mask + the profile's default squeezer at the w1 this run's sweep chose, in front
    of SFM's own fine-tuned classifier F (Built.classifier), for the profile's target `classifier`."""
    surrogate, _ = trained_classifier(profile, dataset, "surrogate", device=device)
    sweep = w1_sweep(profile, dataset, classifier, surrogate, device=device, log=None)
    chosen = sweep.chosen
    return Built(chosen.defense, chosen.classifier, {**chosen.meta, "sweep": sweep.table.to_dict("records")})
