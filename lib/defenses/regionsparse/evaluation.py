"""RegionSparse's evaluation protocol (spec-002 §3): the evaluation and calibration images, adversarial sets at
every strength of the profile's grids, their purification and the accuracy-against-strength tables.

Strengths: FGSM/BIM by L-inf on the 0-255 scale (eps = k / 255), CW-L2/MI-FGSM by Guo et al.'s normalised L2
d = mean_i ||x'_i - x_i||_2 / ||x_i||_2 (lib.attacks.strength). Strength 0 means the clean images. Evaluation
uses only test images the target classifies correctly (the paper's filtered set); the next `n_calibration`
correct ones are the validation split on which K is selected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from lib import cache
from lib.attacks import bim, cw_l2_fixed_c, fgsm, mi_fgsm, mi_fgsm_at_l2, normalized_l2, scale_to_normalized_l2
from lib.data import ImageData, load_dataset, split_size
from lib.defenses.base import Defense
from lib.evaluate import accuracy, in_batches, model_digest, predict, purify_stream
from lib.profiles import dataset_config, notebook_config

Model = Callable[[torch.Tensor], torch.Tensor]
NOTEBOOK = "03_regionsparse"
LINF_ATTACKS = ("FGSM", "BIM")
L2_ATTACKS = ("CW-L2", "MI-FGSM")
ATTACK_ORDER = ("FGSM", "BIM", "CW-L2", "MI-FGSM")
IMAGENET_SIZE = 299  # Inception-v3's input


def load_split(profile: Mapping[str, Any], dataset: str, split: str, n: int | None = None) -> ImageData:
    """The profile's images of `dataset` for this protocol: the dataset's subset, or for ImageNet (paper profile)
    as many as the notebook needs (evaluation + calibration, dictionary + fine-tuning) at 299 px; `n` overrides
    the count."""
    section = notebook_config(profile, NOTEBOOK)
    if dataset == "imagenet":
        n = n or (section["n_eval"] + section["n_calibration"] if split == "test"
                  else section["dictionary_images"] + section["finetune"]["n_train"])
        return load_dataset(dataset, split, n=n, seed=profile["seed"], image_size=IMAGENET_SIZE)
    return load_dataset(dataset, split, n=n or dataset_config(profile, dataset).get(f"{split}_size"),
                        seed=profile["seed"])


def dictionary_images(profile: Mapping[str, Any], dataset: str) -> torch.Tensor:
    """The `dictionary_images` benign training images the global dictionary is learnt on (the last ones)."""
    return load_split(profile, dataset, "train").x[-notebook_config(profile, NOTEBOOK)["dictionary_images"]:]


@dataclass
class EvaluationImages:
    """Correctly classified test images: `x`, `y` for evaluation, `x_cal`, `y_cal` (disjoint) for selecting K."""

    x: torch.Tensor
    y: torch.Tensor
    x_cal: torch.Tensor
    y_cal: torch.Tensor
    test_accuracy: float
    info: Any


def evaluation_images(profile: Mapping[str, Any], dataset: str, classifier: nn.Module,
                      device: torch.device | None = None) -> EvaluationImages:
    """The first `n_eval` test images `classifier` gets right, then the next `n_calibration` ones (on `device`).

    When even the whole test split holds fewer correct images than both need (`scored_test_images`), they are split
    in the profile's n_eval : n_calibration ratio, at least one each, and the shortfall is printed."""
    section = notebook_config(profile, NOTEBOOK)
    test, correct = scored_test_images(profile, dataset, classifier, section["n_eval"] + section["n_calibration"])
    idx = torch.nonzero(correct).flatten()
    n_eval, n_cal = split_counts(len(idx), section["n_eval"], section["n_calibration"])
    if (n_eval, n_cal) != (section["n_eval"], section["n_calibration"]):
        print(f"{dataset}: the classifier gets {len(idx)} of {len(test.y)} test images right, fewer than n_eval "
              f"{section['n_eval']} + n_calibration {section['n_calibration']}: evaluating on {n_eval}, "
              f"selecting K on {n_cal}")
    ev, cal = idx[:n_eval], idx[n_eval:n_eval + n_cal]
    return EvaluationImages(test.x[ev].to(device), test.y[ev].to(device), test.x[cal].to(device),
                            test.y[cal].to(device), 100.0 * float(correct.float().mean()), test.info)


def scored_test_images(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, needed: int
                       ) -> tuple[ImageData, torch.Tensor]:
    """The profile's test subset and which of its images `classifier` gets right. When fewer than `needed` are right
    (a weak classifier, a dry run's few images), the subset is doubled, up to the whole split, and the scan printed."""
    test = load_split(profile, dataset, "test")
    correct = predict(classifier, test.x) == test.y
    total = split_size(dataset, "test") if int(correct.sum()) < needed else len(test)
    while int(correct.sum()) < needed and len(test) < total:
        print(f"{dataset}: the classifier gets {int(correct.sum())} of {len(test)} test images right, fewer than the "
              f"{needed} evaluation and calibration need: scanning {min(2 * len(test), total)} test images")
        test = load_split(profile, dataset, "test", n=min(2 * len(test), total))
        correct = predict(classifier, test.x) == test.y
    return test, correct


def split_counts(available: int, n_eval: int, n_calibration: int) -> tuple[int, int]:
    """(evaluation, calibration) image counts: the profile's when `available` covers both, else `available` split in
    their ratio with at least one each (ValueError below two)."""
    if available >= n_eval + n_calibration:
        return n_eval, n_calibration
    if available < 2:
        raise ValueError(f"the classifier gets {available} test image(s) right: at least 2 are needed, one to "
                         f"evaluate on and one to select K on")
    n_cal = min(max(1, round(available * n_calibration / (n_eval + n_calibration))), available - 1)
    return available - n_cal, n_cal


def attack_grids(linf: Sequence[float], l2: Sequence[float]) -> dict[str, list[float]]:
    """{attack: strengths} for the four attacks of the paper: L-inf levels for FGSM/BIM, d levels for CW/MI."""
    return {"FGSM": list(linf), "BIM": list(linf), "CW-L2": list(l2), "MI-FGSM": list(l2)}


def bim_steps(linf: float) -> int:
    """Kurakin et al.'s BIM schedule: min(L-inf + 4, ceil(1.25 L-inf)) steps of 1/255 (L-inf on the 0-255 scale)."""
    return max(1, int(min(linf + 4, math.ceil(1.25 * linf))))


def craft_strength_sets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grids: Mapping[str, Sequence[float]],
                        params: Mapping[str, Any], *, batch_size: int = 500, use_cache: bool = True
                        ) -> tuple[dict[tuple[str, float], torch.Tensor], pd.DataFrame]:
    """Gray-box adversarial sets on `model` for every (attack, strength) of `grids` (keys in ATTACK_ORDER).

    params: {"mi_steps", "mi_refine", "cw_c", "cw_steps", "cw_lr"}. Cached per (attack, strength, params, model
    weights, inputs). Returns ({(attack, strength): x_adv}, a table of nominal and achieved strengths).
    """
    unknown = set(grids) - set(ATTACK_ORDER)
    if unknown:
        raise ValueError(f"unknown attack(s) {sorted(unknown)}; valid: {', '.join(ATTACK_ORDER)}")
    digest, inputs = model_digest(model), cache.tensor_digest(x, y)
    code = cache.source_fingerprint([craft_strength_sets, bim, mi_fgsm, mi_fgsm_at_l2, cw_l2_fixed_c])
    sets, rows = {}, []
    cw_base: torch.Tensor | None = None
    for attack in [a for a in ATTACK_ORDER if a in grids]:
        for level in grids[attack]:
            def compute(attack=attack, level=level) -> dict[str, torch.Tensor]:
                nonlocal cw_base
                if attack == "FGSM":
                    out = in_batches(lambda xb, yb: fgsm(model, xb, yb, eps=level / 255), x, y, batch_size=batch_size)
                    return {"x_adv": out, "knob": torch.tensor(level / 255)}
                if attack == "BIM":
                    out = in_batches(lambda xb, yb: bim(model, xb, yb, eps=level / 255, alpha=1 / 255,
                                                        steps=bim_steps(level)), x, y, batch_size=batch_size)
                    return {"x_adv": out, "knob": torch.tensor(level / 255)}
                if attack == "MI-FGSM":
                    out, eps, _ = mi_fgsm_at_l2(model, x, y, level, steps=params.get("mi_steps", 10),
                                                refine=params.get("mi_refine", 2), batch_size=batch_size)
                    return {"x_adv": out, "knob": torch.tensor(eps)}
                if cw_base is None:
                    cw_base = in_batches(lambda xb, yb: cw_l2_fixed_c(model, xb, yb, c=params.get("cw_c", 0.1),
                                                                      steps=params.get("cw_steps", 50),
                                                                      lr=params.get("cw_lr", 0.01)),
                                         x, y, batch_size=batch_size).to(x.device)
                out, tau, _ = scale_to_normalized_l2(x, cw_base, level)
                return {"x_adv": out, "knob": torch.tensor(tau)}

            config = {"attack": attack, "level": level, "params": dict(params), "model": digest, "inputs": inputs}
            res = cache.cached_tensors("regionsparse/adversarial", config, compute, code=code) if use_cache \
                else compute()
            x_adv = res["x_adv"].to(x.device)
            sets[(attack, float(level))] = x_adv
            rows.append({"attack": attack, "strength": float(level),
                         "knob": {"FGSM": "eps", "BIM": "eps", "MI-FGSM": "eps", "CW-L2": "tau"}[attack],
                         "knob value": float(res["knob"]), "achieved d": normalized_l2(x, x_adv),
                         "achieved Linf (x255)": float((x_adv - x).abs().flatten(1).amax(1).mean()) * 255})
    return sets, pd.DataFrame(rows)


def purify_sets(defense: Defense, x: torch.Tensor, sets: Mapping[tuple[str, float], torch.Tensor]
                ) -> tuple[torch.Tensor, dict[tuple[str, float], torch.Tensor]]:
    """defense.purify of the clean images and of every adversarial set, streamed through the defense in batches of
    its `max_batch` images (the profile's purify_batch_sizes; all in one call when it has none) without stacking.
    A defense with `last_stats` (RegionSparse) is left with their image-weighted mean over all batches."""
    keys, tensors = list(sets), [x, *sets.values()]
    weighted: list[tuple[int, dict[str, float]]] = []

    def collect(n: int) -> None:
        if hasattr(defense, "last_stats"):
            weighted.append((n, dict(defense.last_stats)))

    clean, *purified = purify_stream(defense, tensors, sum(len(t) for t in tensors), after_batch=collect)
    if weighted:
        total = sum(n for n, _ in weighted)
        defense.last_stats = {k: sum(n * stats[k] for n, stats in weighted) / total for k in weighted[0][1]}
    return clean, dict(zip(keys, purified))


def accuracy_curves(classifiers: Mapping[str, Model] | Model, purified: Mapping[str, tuple[torch.Tensor, Mapping]],
                    y: torch.Tensor, setting: str, batch_size: int = 500) -> pd.DataFrame:
    """Tidy accuracy (%) for every defense, attack and strength, strength 0 = clean, from purified sets.

    purified[defense] = (purified clean images, {(attack, strength): purified x_adv}); classifiers is one
    model for all defenses or one per defense name.
    """
    rows = []
    y = y.cpu()
    for name, (clean, sets) in purified.items():
        model = classifiers[name] if isinstance(classifiers, Mapping) else classifiers
        clean_acc = accuracy(model, clean, y, batch_size)
        for attack in [a for a in ATTACK_ORDER if any(k[0] == a for k in sets)]:
            rows.append({"setting": setting, "defense": name, "attack": attack, "strength": 0.0, "accuracy": clean_acc})
            for (a, level), xa in sets.items():
                if a == attack:
                    rows.append({"setting": setting, "defense": name, "attack": attack, "strength": level,
                                 "accuracy": accuracy(model, xa, y, batch_size)})
    return pd.DataFrame(rows)


@torch.no_grad()
def eliminated_share(model: Model, x_adv: torch.Tensor, x_defended: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 500) -> tuple[float, int]:
    """Share (%) of successful attacks a defense undoes: among images whose x_adv fools the undefended model,
    the fraction classified correctly after the defense. Returns (share, number of successful attacks)."""
    y = y.cpu()
    fooled = predict(model, x_adv, batch_size) != y
    fixed = predict(model, x_defended, batch_size) == y
    n = int(fooled.sum())
    return (100.0 * float((fooled & fixed).sum()) / n if n else float("nan")), n
