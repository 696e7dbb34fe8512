"""The choice of the sparsity K, made in the run on our own validation data (the paper gives no K).

Every candidate K of the profile's `k_selection` is put in front of the target classifier and scored on the
calibration images (correctly classified test images disjoint from the evaluation set): clean accuracy plus
the mean accuracy under the profile's selection attacks, crafted gray box on the classifier alone. The highest
score wins, the smaller K on a tie. The paper's clean accuracy plays no part; notebook 03 only compares with it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from lib import cache
from lib.defenses.regionsparse.config import RegionSparseConfig
from lib.defenses.regionsparse.defense import RegionSparse
from lib.defenses.regionsparse.evaluation import (NOTEBOOK, accuracy_curves, craft_strength_sets,
                                                  dictionary_images, evaluation_images, purify_sets)
from lib.defenses.regionsparse.training import trained_dictionary
from lib.defenses.registry import purify_batch_size
from lib.evaluate import model_digest
from lib.profiles import notebook_config

COLUMNS = ("K", "clean accuracy (%)", "robust accuracy (%)", "score", "fallback_rate", "mean_region_area")


@dataclass
class SparsitySelection:
    """The candidates' scores (one row per K, `chosen` marks the winner) and the chosen K."""

    table: pd.DataFrame
    chosen: int


def profile_config(profile: Mapping[str, Any]) -> RegionSparseConfig:
    """RegionSparse's settings from the profile's notebook-03 section; K is left at its default until selected."""
    return RegionSparseConfig.from_mapping({**notebook_config(profile, NOTEBOOK)["regionsparse"],
                                            "seed": profile.get("seed", 0)})


def score_candidates(cfg: RegionSparseConfig, atoms: torch.Tensor, classifier: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, sets: Mapping[tuple[str, float], torch.Tensor],
                     candidates: list[int], max_batch: int | None = None) -> pd.DataFrame:
    """Clean and mean robust accuracy (%) and their sum for RegionSparse with each candidate K (purifying at most
    `max_batch` images per call; None: all at once)."""
    rows = []
    for k in candidates:
        defense = RegionSparse(replace(cfg, sparsity=int(k)), dictionary=atoms)
        defense.max_batch = max_batch
        curves = accuracy_curves(classifier, {"RegionSparse": purify_sets(defense, x, sets)}, y, "selection")
        clean = float(curves[curves["strength"] == 0]["accuracy"].iloc[0])
        robust = float(curves[curves["strength"] > 0]["accuracy"].mean())
        rows.append({"K": int(k), "clean accuracy (%)": clean, "robust accuracy (%)": robust,
                     "score": clean + robust, **defense.last_stats})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def choose(table: pd.DataFrame) -> int:
    """The K of the highest score; the smallest such K on a tie (cheaper, and closer to the image)."""
    best = table[table["score"] == table["score"].max()]
    return int(best["K"].min())


def select_sparsity(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
                    device: torch.device | None = None) -> SparsitySelection:
    """Score every candidate K (profile `k_selection.candidates`) on the calibration images of `dataset` under
    the selection attacks (`k_selection.attacks`, {attack: strengths}) and pick one (see the module docstring).

    The adversarial sets and the dictionary are cached; the scores are cached under both and the candidates.
    """
    section = notebook_config(profile, NOTEBOOK)
    spec = section["k_selection"]
    candidates = sorted(int(k) for k in spec["candidates"])
    cfg = profile_config(profile)
    atoms, _ = trained_dictionary(dictionary_images(profile, dataset).to(device), cfg)
    images = evaluation_images(profile, dataset, classifier, device)
    x, y = images.x_cal, images.y_cal
    sets, _ = craft_strength_sets(classifier, x, y, spec["attacks"], section["attack_params"],
                                  batch_size=profile["eval_batch_size"])

    def compute() -> dict[str, torch.Tensor]:
        table = score_candidates(cfg, atoms, classifier, x, y, sets, candidates,
                                 max_batch=purify_batch_size(profile, "regionsparse"))
        return {c: torch.tensor(table[c].to_numpy(dtype=float)) for c in COLUMNS}

    config = {"cfg": dict(cfg.__dict__, sparsity=None), "atoms": cache.tensor_digest(atoms),
              "classifier": model_digest(classifier), "inputs": cache.tensor_digest(x, y),
              "attacks": {a: list(map(float, v)) for a, v in spec["attacks"].items()},
              "params": dict(section["attack_params"]), "candidates": candidates}
    code = cache.source_fingerprint([score_candidates, RegionSparse, craft_strength_sets])
    scores = cache.cached_tensors("regionsparse/sparsity", config, compute, code=code)
    table = pd.DataFrame({c: scores[c].numpy() for c in COLUMNS}).astype({"K": int})
    chosen = choose(table)
    return SparsitySelection(table.assign(chosen=table["K"] == chosen), chosen)
