"""Notebook 00 (setup and data): the tables and figures that show what every paper notebook stands on.

Sample grids of the profile's datasets, the classifier zoo with parameter counts, the profile's target classifier
and black-box surrogate on its primary dataset, and every attack of the profile on that classifier (gray box) and
by transfer from the surrogate (black box), with one clean-vs-adversarial figure per attack.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from lib import data, report, viz
from lib.defenses.base import NoDefense
from lib.evaluate import (
    AttackSpec,
    adversarial_set,
    attack_specs,
    evaluate_threats,
    predict,
)
from lib.models import ARCHITECTURES, build_classifier, count_parameters
from lib.train import trained_classifier

if TYPE_CHECKING:
    from lib.notebook import Run

IMAGENET_ARCHITECTURES = {"resnet50_imagenet": 224, "inception_v3": 299}  # counted at their native input size


def dataset_samples(run: Run) -> dict[str, Figure]:
    """{dataset: figure} with the first 16 images (sorted by class) of a class-balanced test subset of each of the
    notebook's datasets, saved as figures/samples_<dataset>.png. A dataset not on this machine is recorded as
    skipped, never replaced by another; unlike `run.per_dataset` a dataset needs no settings in the profile."""
    figures = {}
    for name in run.config["datasets"]:
        try:
            sample = data.load_dataset(name, "test", n=10 * min(data.dataset_info(name).num_classes, 10),
                                       seed=run.profile["seed"])
        except data.DatasetUnavailable as err:
            run.skip(f"dataset {name}", str(err))
            continue
        info = sample.info
        order = torch.argsort(sample.y, stable=True)[:16]
        figures[name] = viz.image_grid(sample.x[order], class_names(info, sample.y[order]), ncols=8,
                                       suptitle=f"{name}: test images ({info.channels}x{info.image_size}x{info.image_size})")
        report.save_figure(figures[name], f"samples_{name}", run.out)
    return figures


def class_names(info: data.DatasetInfo, labels: torch.Tensor) -> list[str]:
    """The class name of each label (its number when the dataset has no names)."""
    return [info.classes[int(c)] if info.classes else str(int(c)) for c in labels]


def zoo_table(image_size: int, width: float) -> pd.DataFrame:
    """Every architecture of lib.models built for 3-channel inputs (the ImageNet models at their native size and
    width, 1000 classes; the others at `image_size` and `width`, 10 classes), with its parameter count."""
    rows = []
    for arch in ARCHITECTURES:
        native = IMAGENET_ARCHITECTURES.get(arch)
        size, scale = (native, 1.0) if native else (image_size, width)
        model = build_classifier(arch, num_classes=1000 if native else 10, in_channels=3, image_size=size,
                                 mean=(0.5,) * 3, std=(0.5,) * 3, width=scale)
        rows.append({"architecture": arch, "input": f"3x{size}x{size}", "width": scale,
                     "parameters": count_parameters(model), "feature dim": model.feat_dim})
    return pd.DataFrame(rows)


def primary_dataset(run: Run, usable: list[str]) -> str:
    """The first of the `usable` datasets that has classifier settings in the profile (RuntimeError if none)."""
    primary = next((d for d in usable if d in run.profile["datasets"]), None)
    if primary is None:
        raise RuntimeError(f"none of {run.config['datasets']} is available with classifier settings in profile "
                           f"{run.profile_name!r}")
    return primary


def profile_classifiers(run: Run, dataset: str) -> tuple[nn.Module, nn.Module, pd.DataFrame]:
    """(target, surrogate, table): the profile's classifier and its independent black-box surrogate on `dataset`
    (trained once, then loaded from the cache), and a table of their test accuracy, training time and size."""
    section = run.profile["datasets"][dataset]
    rows, models = [], []
    for role, key in (("target", "classifier"), ("surrogate", "surrogate")):
        model, meta = trained_classifier(run.profile, dataset, role, device=run.device)
        models.append(model)
        rows.append({"role": role, "dataset": dataset, "arch": section[key]["arch"],
                     "test accuracy (%)": meta["test_accuracy"], "train time (s)": meta["train_seconds"],
                     "from cache": meta["cache_hit"], "parameters": count_parameters(model)})
    return models[0], models[1], pd.DataFrame(rows)


@dataclass
class AttackResults:
    """Accuracy under every attack of the profile, and what the figures need: the test subset and the specs."""

    table: pd.DataFrame
    test: data.ImageData
    specs: list[AttackSpec]


def attack_accuracy(run: Run, dataset: str, classifier: nn.Module, surrogate: nn.Module) -> AttackResults:
    """Accuracy of the undefended classifier under each attack of the notebook's list on a class-balanced test
    subset: crafted on the classifier (gray box), and for the norm-bounded attacks on the surrogate (black box,
    transfer; minimum-norm attacks stop at the surrogate's boundary, so their transfer says little)."""
    test = data.load_dataset(dataset, "test", n=run.config["attack_eval_size"], seed=run.profile["seed"])
    specs = attack_specs(run.config["attacks"])
    common = {"surrogate": surrogate, "batch_size": run.profile["eval_batch_size"], "device": run.device}
    gray = evaluate_threats(classifier, {"none": NoDefense()}, test.x, test.y, specs, threats=("gray",), **common)
    black = evaluate_threats(classifier, {"none": NoDefense()}, test.x, test.y, [s for s in specs if s.eps is not None],
                             threats=("black",), **common)
    table = pd.concat([gray, black], ignore_index=True).drop(columns=["defense", "gradient"])
    return AttackResults(table, test, specs)


def attack_figures(run: Run, dataset: str, classifier: nn.Module, attacks: AttackResults) -> dict[str, Figure]:
    """{attack: figure} of the first `attack_examples` images: clean with the classifier's prediction, adversarial
    (the table's cached gray-box set) with the new prediction, and the magnified perturbation; each saved as
    figures/attack_<name>.png."""
    k, test = run.config["attack_examples"], attacks.test
    clean_pred = predict(classifier, test.x[:k])
    figures = {}
    for spec in attacks.specs:
        x_adv, _ = adversarial_set(spec, classifier, test.x.to(run.device), test.y.to(run.device))
        adv_pred = predict(classifier, x_adv[:k])
        eps = f", eps={spec.eps:g}" if spec.eps is not None else ""
        figures[spec.name] = viz.clean_vs_adversarial(
            test.x[:k], x_adv[:k].cpu(), class_names(test.info, test.y[:k]), class_names(test.info, clean_pred),
            class_names(test.info, adv_pred), f"{dataset}: {spec.title}{eps} (gray box)")
        report.save_figure(figures[spec.name], f"attack_{spec.name}", run.out)
    return figures
