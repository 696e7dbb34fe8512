"""Every table and figure of notebook 04 (paper 003, Zhang et al., PeerJ CS 2021), ours beside the paper's.

`prepare` trains (or loads) one dataset's classifiers and its defense; each producer below takes the notebook's
`Run` and {dataset: Prepared}, computes its table or figure the way the paper does (spec-003 §3-5), saves it
under the run's results folder and returns it. Paper numbers come from `lib.reference` (paper
'reconstruction') and are joined with `lib.reference.beside_paper`: MNIST, Fashion-MNIST ('F-MNIST') and
CIFAR-10 are the paper's own datasets (like for like, with a diff column); any other dataset has no paper
table (Tables 1-3) or is labelled a stand-in without a diff (Table 4, published for F-MNIST only). Tables 1-4 are
made under both readings of DeepFool / CW (protocol.READINGS); the undefended control rows choose which one takes
the paper's table names (`choose_reading`), and every accuracy carries its 95% Wilson interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from lib import report, viz
from lib.attacks import attack_surface
from lib.data import ImageData, load_dataset
from lib.defenses.base import Built, Compose, Defended
from lib.defenses.reconstruction.defense import ReconstructionDefense, quantize
from lib.defenses.reconstruction.networks import edsr_parameter_count
from lib.defenses.reconstruction.protocol import (DEFAULT_READING, ITERATIONS, READINGS, as_read, paper_attacks,
                                                  reading_rows)
from lib.defenses.reconstruction.training import build, trained_paper_classifier
from lib.defenses.squeeze import BitDepthReduction, MedianFilter
from lib.evaluate import AttackSpec, accuracy, accuracy_interval, adversarial_set, predict
from lib.notebook import Run
from lib.reference import beside_paper, load_reference
from lib.reproduction import CLOSE, IN_INTERVAL
from lib.train import TrainConfig

PAPER_ID = "reconstruction"
# our dataset -> the paper's table, figure and dataset name (the smoke data, digits, has none)
PAPER: dict[str, tuple[str, str, str]] = {"mnist": ("table1", "fig6", "MNIST"),
                                          "fashion_mnist": ("table2", "fig7", "F-MNIST"),
                                          "cifar10": ("table3", "fig8", "CIFAR-10")}
TABLE4_DATASET = "F-MNIST"            # the paper's Table 4 is on Fashion-MNIST only
TABLE_KEYS = ["model", "defense", "attack"]
TABLE4_KEYS = ["defense", "setting", "attack"]
MAIN = "ResNet50"                     # the attacked classifier of the figures and of Table 4
CONTROL = "no defense"                # Tables 1-3's undefended rows: the control that chooses the reading
MINIMUM_NORM = ("DeepFool", "CW")     # the attacks whose meaning in an ε-headed table depends on the reading
CHOICE_GAP = "mean |ours − paper| (control cells)"
WITHIN = f"within {CLOSE:g} points (%)"
AGREEMENT_COLUMNS = ["table", "cells compared", "mean |diff| (points)", "max |diff| (points)", WITHIN,
                     "paper in our 95% interval (%)"]


@dataclass
class Prepared:
    """One dataset of the run: data, the paper's classifiers (trained, cached), the defense and their settings."""

    dataset: str
    train: ImageData
    test: ImageData
    settings: dict[str, Any]                 # the profile's per_dataset section for this dataset
    classifiers: dict[str, nn.Module]
    train_configs: dict[str, TrainConfig]
    built: Built                             # Q_k + R_θ trained on FGSM examples of the ResNet-50
    models: pd.DataFrame                     # one row per trained network

    @property
    def defense(self) -> ReconstructionDefense:
        return self.built.defense

    @property
    def main(self) -> nn.Module:
        return self.classifiers[MAIN]


def prepare(run: Run, dataset: str) -> Prepared:
    """Load the dataset's subsets, train (or load) its classifiers and R_θ (on FGSM(eps_max) of the ResNet-50)."""
    cfg, seed = run.config, run.profile["seed"]
    settings = cfg["per_dataset"][dataset]
    train = load_dataset(dataset, "train", n=settings.get("train_size", cfg["train_size"]), seed=seed)
    test = load_dataset(dataset, "test", n=settings.get("test_size", cfg["test_size"]), seed=seed)
    classifiers, train_configs, rows = {}, {}, []
    for label, entry in settings["classifiers"].items():
        tcfg = TrainConfig.from_mapping({**cfg["classifier_train"], **settings.get("classifier_train", {}),
                                         **{k: v for k, v in entry.items() if k not in ("arch", "width")},
                                         "seed": seed})
        classifiers[label], meta = trained_paper_classifier(entry["arch"], train, test, tcfg, width=entry["width"],
                                                            device=run.device)
        train_configs[label] = tcfg
        rows.append({"dataset": dataset, "network": label, "arch": entry["arch"], "width": entry["width"],
                     "epochs": tcfg.epochs, "test accuracy (%)": meta["test_accuracy"],
                     "train time (s)": meta["train_seconds"], "from cache": meta["cache_hit"]})
    built = build(run.profile, dataset, classifiers[MAIN], device=run.device)
    rcfg = built.meta["config"]
    rows.append({"dataset": dataset, "network": "R_θ (reconstruction)",
                 "arch": f"EDSR F={rcfg['n_feats']} B={rcfg['n_blocks']}", "width": None, "epochs": rcfg["epochs"],
                 "test accuracy (%)": None, "train time (s)": built.meta["train_seconds"],
                 "from cache": built.meta["cache_hit"]})
    print(f"{dataset}: {len(train)} train / {len(test)} test images")
    return Prepared(dataset, train, test, settings, classifiers, train_configs, built, pd.DataFrame(rows))


def _on_device(run: Run, p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    return p.test.x.to(run.device), p.test.y.to(run.device)


def _batch(run: Run) -> int:
    return run.profile["eval_batch_size"]


def models_table(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """The classifiers and reconstruction networks of the run, with test accuracy and training time."""
    models = pd.concat([p.models for p in runs.values()], ignore_index=True)
    report.save_table(models, "models", run.out,
                      caption="Classifiers and reconstruction networks (test accuracy on the test subset)")
    return models


def restorer_layers(p: Prepared) -> pd.DataFrame:
    """Fig. 4 as a table: R_θ's layers and its parameter count beside the closed form of spec §2.3."""
    rc, net, c = p.built.meta["config"], p.defense.restorer, p.train.info.channels
    feats, blocks = rc["n_feats"], rc["n_blocks"]
    counted, formula = sum(q.numel() for q in net.parameters()), edsr_parameter_count(c, feats, blocks)
    layers = [("head: Conv3x3", f"{c} -> {feats}"),
              (f"{blocks} x ResBlock: Conv3x3-ReLU-Conv3x3 (+x, res_scale {rc['res_scale']:g})", f"{feats} -> {feats}"),
              ("body tail: Conv3x3, + head output (global skip)", f"{feats} -> {feats}"),
              ("tail: Conv3x3, clamp [0, 1]", f"{feats} -> {c}"),
              ("parameters (counted / formula)", f"{counted:,} / {formula:,}")]
    return pd.DataFrame([{"dataset": p.dataset, "layer": layer, "channels": ch} for layer, ch in layers])


def restorer_tables(run: Run, runs: Mapping[str, Prepared]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fig. 4 as a table for every dataset, and R_θ's eq.-(4) training loss per epoch."""
    arch = pd.concat([restorer_layers(p) for p in runs.values()], ignore_index=True)
    history = pd.DataFrame([{"dataset": name, **h} for name, p in runs.items() for h in p.built.meta["history"]])
    report.save_table(arch, "fig4_restorer_layers", run.out, caption="Fig. 4 as a table: layers of R_θ")
    report.save_table(history, "restorer_training", run.out, caption="R_θ training: eq. (4) loss per epoch",
                      floatfmt=".4f")
    return arch, history


def fig1_adversarial_example(run: Run, runs: Mapping[str, Prepared]) -> list[Figure]:
    """Fig. 1: a clean image the ResNet-50 gets right, FGSM's perturbation (magnified) and the fooling image."""
    figures = []
    for name, p in runs.items():
        x, y = _on_device(run, p)
        eps = p.settings["table_eps"]
        x_adv, _ = adversarial_set(AttackSpec("fgsm", {"eps": eps}), p.main, x, y, batch_size=_batch(run))
        with torch.no_grad():
            p_clean, p_adv = torch.softmax(p.main(x), 1).cpu(), torch.softmax(p.main(x_adv), 1).cpu()
        fooled = ((p_clean.argmax(1) == p.test.y) & (p_adv.argmax(1) != p.test.y)).nonzero().flatten()
        i = int(fooled[0]) if len(fooled) else 0
        names = p.test.info.classes
        fig, axes = plt.subplots(1, 3, figsize=(6.5, 2.6))
        viz.show_image(axes[0], p.test.x[i], f"clean: {names[int(p_clean[i].argmax())]} "
                                             f"({100 * float(p_clean[i].max()):.0f}%)")
        viz.show_image(axes[1], viz.perturbation_image(p.test.x[i:i + 1], x_adv[i:i + 1].cpu())[0],
                       f"perturbation (ε={eps:g}, magnified)")
        viz.show_image(axes[2], x_adv[i].cpu(), f"adversarial: {names[int(p_adv[i].argmax())]} "
                                                f"({100 * float(p_adv[i].max()):.0f}%)")
        fig.suptitle(f"Fig. 1 ({name}): FGSM on ResNet-50", fontsize=10)
        fig.tight_layout()
        report.save_figure(fig, f"fig1_adversarial_example_{name}", run.out)
        figures.append(fig)
    return figures


def fig3_compression_only(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Fig. 3: ResNet-50 accuracy on Q_k(FGSM(x)) over the ε grid for each k of the profile (256 = none)."""
    rows = []
    for name, p in runs.items():
        x, y = _on_device(run, p)
        for eps in p.settings["eps_grid"]:
            x_adv = x if eps == 0 else adversarial_set(AttackSpec("fgsm", {"eps": eps}), p.main, x, y,
                                                       batch_size=_batch(run))[0]
            rows += [{"dataset": name, "eps": eps, "k": k,
                      "accuracy": accuracy(p.main, quantize(x_adv, k), y, _batch(run), run.device)}
                     for k in run.config["compression_levels"]]
    fig3 = pd.DataFrame(rows)
    report.save_table(fig3, "fig3_compression_only", run.out,
                      caption="Fig. 3: ResNet-50 accuracy (%) on Q_k(FGSM(x)); k = 256 is no compression")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.3), squeeze=False)
    for ax, (name, part) in zip(axes[0], fig3.groupby("dataset", sort=False)):
        for k, line in part.groupby("k"):
            ax.plot(line["eps"], line["accuracy"], marker="o", label=f"k = {k}" + (" (none)" if k == 256 else ""))
        ax.set(title=f"Fig. 3: {name}", xlabel="FGSM ε", ylabel="accuracy (%)", ylim=(0, 100))
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.save_figure(fig, "fig3_compression_only", run.out)
    return fig3


def _minimum_norm_params(config: Mapping[str, Any], attack: str, steps: int) -> dict[str, Any]:
    """DeepFool's or CW's keyword arguments from the profile, at `steps` iterations."""
    if attack == "deepfool":
        return {"steps": steps, "overshoot": config["deepfool"]["overshoot"]}
    return {**{k: v for k, v in config["cw"].items() if k != "steps_grid"}, "steps": steps}


def table_attacks(config: Mapping[str, Any], eps: float) -> dict[str, AttackSpec]:
    """The four attacks of the tables at ε; DeepFool and CW at the largest iteration count of the profile."""
    return paper_attacks(eps, bim_steps=config["bim_steps"],
                         deepfool=_minimum_norm_params(config, "deepfool", max(config["deepfool"]["steps_grid"])),
                         cw=_minimum_norm_params(config, "cw_l2", max(config["cw"]["steps_grid"])))


def strength_grid(config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, list[tuple[AttackSpec, float]]]:
    """Figs. 6-8's x axes: FGSM and BIM over the ε grid; DeepFool and CW over their iteration counts (unclipped)."""
    eps_grid = [e for e in settings["eps_grid"] if e > 0]
    return {"FGSM": [(AttackSpec("fgsm", {"eps": e}), e) for e in eps_grid],
            "BIM": [(paper_attacks(e, bim_steps=config["bim_steps"])["BIM"], e) for e in eps_grid],
            "DeepFool": [(AttackSpec("deepfool", _minimum_norm_params(config, "deepfool", t)), t)
                         for t in config["deepfool"]["steps_grid"]],
            "CW": [(AttackSpec("cw_l2", _minimum_norm_params(config, "cw_l2", t)), t)
                   for t in config["cw"]["steps_grid"]]}


def _strength_figure(name: str, part: pd.DataFrame, claims: pd.DataFrame, fig_id: str) -> Figure:
    """One dataset's Figs. 6-8 panel per attack, with the paper's stated end points as hollow markers."""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, (attack, sub) in zip(axes, part.groupby("attack", sort=False)):
        for m, line in sub.groupby("model", sort=False):
            ax.plot(line["strength"], line["accuracy"], marker="o", label=f"ours: {m}")
        if name in PAPER:
            ref = claims[(claims["dataset"] == PAPER[name][2]) & (claims["attack"] == attack)]
            for _, r in ref.iterrows():
                defended = r["defense"] == "defense"
                ax.scatter([sub["strength"].max()], [r["value"]], facecolors="none", s=70,
                           edgecolors="C1" if defended else "C0", marker="o" if defended else "s",
                           label=f"paper: {r['defense']} (at its strongest)")
        ax.set(title=attack, xlabel="ε" if attack in ("FGSM", "BIM") else "max iterations", ylabel="accuracy (%)",
               ylim=(0, 100))
        ax.legend(fontsize=6)
    fig.suptitle(f"{fig_id} ({name}): ResNet-50 with and without compression + reconstruction", fontsize=10)
    fig.tight_layout()
    return fig


def strength_curves(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Figs. 6-8: ResNet-50 accuracy with and without D against attack strength (attacks see the classifier)."""
    rows = []
    for name, p in runs.items():
        x, y = _on_device(run, p)
        models = {"no defense": p.main, "defense": Defended(p.main, p.defense).eval()}
        for attack, points in strength_grid(run.config, p.settings).items():
            rows += [{"dataset": name, "attack": attack, "strength": 0, "model": m,
                      "accuracy": accuracy(model, x, y, _batch(run), run.device)} for m, model in models.items()]
            for spec, strength in points:
                x_adv, _ = adversarial_set(spec, p.main, x, y, batch_size=_batch(run))
                rows += [{"dataset": name, "attack": attack, "strength": strength, "model": m,
                          "accuracy": accuracy(model, x_adv, y, _batch(run), run.device)}
                         for m, model in models.items()]
    curves = pd.DataFrame(rows)
    claims = load_reference(PAPER_ID, "claims")
    for name, part in curves.groupby("dataset", sort=False):
        fig_id = PAPER[name][1] if name in PAPER else "fig6-8_style"
        report.save_table(part, f"{fig_id}_strength_curves_{name}", run.out,
                          caption=f"{fig_id}: ResNet-50 accuracy (%) vs attack strength, {name}")
        report.save_figure(_strength_figure(name, part, claims, fig_id), f"{fig_id}_strength_curves_{name}", run.out)
    return curves


def fig5_examples(run: Run, runs: Mapping[str, Prepared], reading: str) -> list[Figure]:
    """Fig. 5: normal, adversarial, compressed and reconstructed images for each attack at the table's ε, DeepFool
    and CW under `reading` (Tables 1-3's); titles give ResNet-50's prediction, green when correct."""
    figures, n_ex = [], run.config["examples"]
    for name, p in runs.items():
        x, y = _on_device(run, p)
        eps = p.settings["table_eps"]
        fig, axes = plt.subplots(4, 4 * n_ex, figsize=(1.25 * 4 * n_ex, 5.6), squeeze=False)
        for col, (attack, spec) in enumerate(table_attacks(run.config, eps).items()):
            x_adv, _ = adversarial_set(spec, p.main, x, y, batch_size=_batch(run))
            x_adv = as_read(x[:n_ex], x_adv[:n_ex], spec, eps, reading)
            with torch.no_grad():
                stages = p.defense.stages(x_adv)
            for row, imgs in enumerate([x[:n_ex], x_adv, stages["compressed"], stages["restored"]]):
                pred = predict(p.main, imgs)
                for j in range(n_ex):
                    ax = axes[row, col * n_ex + j]
                    viz.show_image(ax, imgs[j].cpu(), p.test.info.classes[int(pred[j])][:10])
                    ax.title.set_color("green" if int(pred[j]) == int(p.test.y[j]) else "red")
                    if j == 0 and row == 0:
                        ax.set_title(f"{attack}\n{ax.get_title()}", fontsize=8, color=ax.title.get_color())
        for row, label in enumerate(["normal", "adversarial", f"compressed (k={p.defense.levels})", "reconstructed"]):
            axes[row, 0].set_ylabel(label, fontsize=8)
        fig.suptitle(f"Fig. 5 ({name}): ε = {eps:g}; DeepFool / CW read as '{reading}'", fontsize=10)
        fig.tight_layout()
        report.save_figure(fig, f"fig5_examples_{name}", run.out)
        figures.append(fig)
    return figures


def _no_reference(keys: list[str]) -> pd.DataFrame:
    """An empty published table: beside_paper then gives our rows with an empty paper column."""
    return pd.DataFrame(columns=[*keys, "value"])


def with_interval(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """Adds our accuracy's 95% Wilson interval on the n test images and whether the paper's number lies in it
    (None without a like-for-like paper number): the sampling error against which each diff is judged."""
    low, high = accuracy_interval(table["ours"], n)
    paper = table["paper"] if "diff" in table.columns else pd.Series(np.nan, index=table.index)
    inside = [None if np.isnan(lo) or pd.isna(pv) else bool(lo <= pv <= hi) for lo, hi, pv in zip(low, high, paper)]
    return table.assign(**{"ours 95% low": low, "ours 95% high": high, IN_INTERVAL: inside})


def paper_table(ours: pd.DataFrame, dataset: str, eps: float, reading: str, n: int) -> tuple[str, pd.DataFrame]:
    """(table id, table) for Tables 1-3: our accuracy rows (model, defense, attack, accuracy) on n test images,
    DeepFool / CW in `reading`, beside the paper's table for `dataset` (like for like, with diff); a dataset the
    paper has no table for keeps an empty paper column. Columns: dataset, model, defense, attack, eps (None for
    Clean), reading, ours, paper, diff, ours 95% low, ours 95% high, paper in interval."""
    if dataset in PAPER:
        table_id, _, paper_dataset = PAPER[dataset]
        reference, paper_setting = load_reference(PAPER_ID, table_id), {"dataset": paper_dataset}
    else:
        table_id, reference, paper_setting = f"table_{dataset}", _no_reference(TABLE_KEYS), {}
    table = beside_paper(ours, reference, TABLE_KEYS, value_col="accuracy", paper_setting=paper_setting,
                         ours_setting={"dataset": dataset})
    table.insert(0, "dataset", dataset)
    table.insert(4, "eps", [None if a == "Clean" else eps for a in table["attack"]])
    table.insert(5, "reading", reading)
    return table_id, with_interval(table, n)


def other_reading(reading: str) -> str:
    """The reading of READINGS that is not `reading` (there are two)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; one of {list(READINGS)}")
    return next(r for r in READINGS if r != reading)


def _reading_caption(reading: str, chosen: bool) -> str:
    """What a saved table's DeepFool / CW are, and whether the control rows chose that reading."""
    status = "chosen by the undefended control rows" if chosen else "the reading not chosen, for comparison"
    return f"DeepFool / CW read as '{reading}', {status}: {READINGS[reading]}"


@dataclass
class Tables13:
    """Tables 1-3 under the reading of DeepFool / CW chosen by the undefended control rows, and under the other."""

    reading: str
    chosen: dict[str, pd.DataFrame]     # {dataset: table}, saved as {table_id}_{dataset}
    other: dict[str, pd.DataFrame]      # the other reading's, saved as {table_id}_{dataset}_other_reading
    choice: pd.DataFrame                # choose_reading's table: why this reading

    @property
    def other_reading(self) -> str:
        """The reading of the `other` tables."""
        return other_reading(self.reading)


def control_cells(table: pd.DataFrame) -> pd.DataFrame:
    """A like-for-like Tables 1-3 table's control cells: undefended DeepFool / CW rows with ours and a paper number."""
    control = (table["defense"] == CONTROL) & table["attack"].isin(MINIMUM_NORM)
    return table[control].dropna(subset=["ours", "paper"])


def choose_reading(tables_by_reading: Mapping[str, Mapping[str, pd.DataFrame]]) -> tuple[str, pd.DataFrame]:
    """(reading, choice table) from {reading: {dataset: table}}: the reading whose undefended DeepFool / CW cells,
    pooled over datasets, are closest to the paper's on average (spec §2.7 [REVISED]). Defended rows never enter;
    no control cell, or a tie, keeps the spec's default."""
    rows = []
    for reading, by_dataset in tables_by_reading.items():
        gaps = pd.concat([control_cells(t)["diff"].abs() for t in by_dataset.values() if "diff" in t.columns]
                         or [pd.Series(dtype=float)])
        rows.append({"reading": reading, "control cells": len(gaps), CHOICE_GAP: gaps.mean()})
    choice = pd.DataFrame(rows, columns=["reading", "control cells", CHOICE_GAP])
    gap = choice.set_index("reading")[CHOICE_GAP]
    best = gap[gap == gap.min()].index
    if best.empty:
        reading, why, why_not = DEFAULT_READING, "no control cells; spec default", "no control cells"
    elif len(best) > 1:
        reading, why, why_not = DEFAULT_READING, "tie on the control cells; spec default", "tie on the control cells"
    else:
        reading, why, why_not = (best[0], "smallest mean |ours − paper| on the control cells",
                                 "larger mean |ours − paper| on the control cells")
    choice["chosen"] = choice["reading"] == reading
    choice["why"] = np.where(choice["chosen"], why, why_not)
    return reading, choice


def tables_1_3(run: Run, runs: Mapping[str, Prepared]) -> Tables13:
    """Tables 1-3: the one R_θ (trained on ResNet-50's FGSM examples) in front of every classifier, each attacked on
    its own at the table's ε, under both readings of DeepFool / CW; the undefended control rows choose the reading
    (choose_reading), whose tables take the paper's names, the other's are saved as `<name>_other_reading`."""
    ids, by_reading = {}, {r: {} for r in READINGS}
    for name, p in runs.items():
        eps, rows = p.settings["table_eps"], {r: [] for r in READINGS}
        attacks = table_attacks(run.config, eps)
        for label, clf in p.classifiers.items():
            evaluated = {"no defense": clf, "defense": Defended(clf, p.defense).eval()}
            read = reading_rows(clf, evaluated, p.test.x, p.test.y, attacks, eps, batch_size=_batch(run),
                                device=run.device)
            for reading, part in read.items():
                rows[reading] += [{"model": label, "defense": r["model"], "attack": r["attack"],
                                   "accuracy": r["accuracy"]} for r in part]
        for reading, part in rows.items():
            ids[name], by_reading[reading][name] = paper_table(pd.DataFrame(part), name, eps, reading, len(p.test.y))
    reading, choice = choose_reading(by_reading)
    report.save_table(choice, "deepfool_cw_reading", run.out,
                      caption="Which reading of DeepFool / CW the tables use, chosen by the undefended DeepFool / CW "
                              "cells with a paper number (spec-003 §2.7), never by the defended rows")
    other = other_reading(reading)
    for name, p in runs.items():
        head = (f"{ids[name]} ({name}, ε = {p.settings['table_eps']:g}): accuracy (%) on {len(p.test.y)} images, "
                f"ours vs paper (diff = ours − paper; 95% Wilson interval of ours)")
        report.save_table(by_reading[reading][name], f"{ids[name]}_{name}", run.out,
                          caption=f"{head}; {_reading_caption(reading, True)}")
        report.save_table(by_reading[other][name], f"{ids[name]}_{name}{report.OTHER_READING}", run.out,
                          caption=f"{head}; {_reading_caption(other, False)}")
    return Tables13(reading, by_reading[reading], by_reading[other], choice)


def table4_layout(ours: pd.DataFrame, dataset: str, eps: list[float], reading: str, n: int) -> pd.DataFrame:
    """Table 4 from our rows (defense, setting 'strength i', attack, accuracy) on n test images, DeepFool / CW in
    `reading`, beside the paper's F-MNIST table: like for like on fashion_mnist (with diff and whether the paper
    lies in our 95% interval), a labelled stand-in without diff on any other dataset. Adds each setting's eps, a
    note on rows only the paper has, and our best per (setting, attack)."""
    table = beside_paper(ours, load_reference(PAPER_ID, "table4"), TABLE4_KEYS, value_col="accuracy",
                         paper_setting={"dataset": TABLE4_DATASET}, ours_setting={"dataset": dataset})
    eps_of = {f"strength {i}": e for i, e in enumerate(eps, start=1)}
    table.insert(2, "eps", table["setting"].map(eps_of))
    table.insert(4, "reading", reading)
    table = with_interval(table, n)
    table["note"] = np.where(table["ours"].isna(), "paper only: not reproduced here", "")
    table["best (ours)"] = report.mark_best(table, "ours", by=["setting", "attack"])
    return table


@dataclass
class Table4:
    """Table 4 under the reading of DeepFool / CW chosen for Tables 1-3, and under the other."""

    reading: str
    chosen: pd.DataFrame                # saved as table4_comparison_{dataset}
    other: pd.DataFrame                 # saved as table4_comparison_{dataset}_other_reading


def table4(run: Run, runs: Mapping[str, Prepared], reading: str) -> Table4 | None:
    """Table 4 on the profile's Table 4 dataset: ResNet-50 normal, with feature squeezing and with D (attacks on
    the normal ResNet-50), and Kurakin-style FGSM / BIM adversarially trained ResNet-50s (attacked white box), with
    DeepFool / CW in `reading` (Tables 1-3's choice) and in the other. None, with a recorded skip, when that
    dataset is not in this run."""
    other = other_reading(reading)
    t4 = run.config["table4"]
    name = t4["dataset"]
    if name not in runs:
        run.skip("Table 4", f"dataset {name} is not available in this run")
        return None
    p = runs[name]
    entry = p.settings["classifiers"][MAIN]
    adv_models = {}
    for kind, label in (("fgsm", "Adversarial FGSM"), ("bim", "Adversarial BIM")):
        adv_models[label], meta = trained_paper_classifier(entry["arch"], p.train, p.test, p.train_configs[MAIN],
                                                           width=entry["width"], adversarial=kind,
                                                           adv_max_steps=t4["adv_max_steps"], device=run.device)
        print(f"{label}: clean test accuracy {meta['test_accuracy']:.1f}% "
              f"(train {meta['train_seconds']:.0f}s, cache {meta['cache_hit']})")
    squeeze = Compose(BitDepthReduction(3), MedianFilter(2))
    groups = [(p.main, {"Normal": p.main, "Feature Squeezing": Defended(p.main, squeeze).eval(),
                        "Our Method": Defended(p.main, p.defense).eval()})]
    groups += [(m, {label: m}) for label, m in adv_models.items()]
    table_params = table_attacks(run.config, p.settings["table_eps"])
    rows = {r: [] for r in READINGS}
    for strength, eps in enumerate(t4["eps"], start=1):
        attacks = paper_attacks(eps, bim_steps=run.config["bim_steps"], deepfool=table_params["DeepFool"].params,
                                cw=table_params["CW"].params)
        for attacked, evaluated in groups:
            read = reading_rows(attacked, evaluated, p.test.x, p.test.y, attacks, eps, batch_size=_batch(run),
                                device=run.device)
            for r_name, part in read.items():
                rows[r_name] += [{"defense": r["model"], "setting": f"strength {strength}", "eps": eps,
                                  "attack": r["attack"], "accuracy": r["accuracy"]} for r in part]
    layouts = {r: table4_layout(pd.DataFrame(part), name, t4["eps"], r, len(p.test.y)) for r, part in rows.items()}
    for r, suffix in ((reading, ""), (other, report.OTHER_READING)):
        shared = "; both strengths use the same unclipped DeepFool / CW examples" if r == ITERATIONS else ""
        report.save_table(layouts[r], f"table4_comparison_{name}{suffix}", run.out,
                          caption=f"Table 4 ({name}, ResNet-50): accuracy (%) on {len(p.test.y)} images, ours vs "
                                  f"paper (95% Wilson interval of ours); eps of strength 1/2 = {t4['eps']}; "
                                  f"{_reading_caption(r, r == reading)}{shared}")
    return Table4(reading, layouts[reading], layouts[other])


def adaptive_bpda(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Ours, not in the paper: BIM through f(clamp(R_θ(Q_k(x)))) with a straight-through Q_k (BPDA), beside the
    paper-protocol BIM on the classifier alone, at the table's ε and at eps_max."""
    rows = []
    for name, p in runs.items():
        x, y = _on_device(run, p)
        defended = Defended(p.main, p.defense).eval()
        surface = attack_surface(p.main, p.defense).eval()
        for eps in sorted({p.settings["table_eps"], p.settings["eps_max"]}):
            spec = paper_attacks(eps, bim_steps=run.config["adaptive"]["steps"])["BIM"]
            x_gray, _ = adversarial_set(spec, p.main, x, y, batch_size=_batch(run))
            x_bpda, _ = adversarial_set(spec, surface, x, y, batch_size=_batch(run))
            attack = f"BIM-{spec.params['steps']}"
            rows += [{"dataset": name, "eps": eps, "attack": attack,
                      "threat": "gray box (paper protocol: attack sees the classifier only)",
                      "no defense": accuracy(p.main, x_gray, y, _batch(run), run.device),
                      "defense": accuracy(defended, x_gray, y, _batch(run), run.device)},
                     {"dataset": name, "eps": eps, "attack": attack,
                      "threat": "adaptive BPDA through Q_k and R_θ (ours, not in the paper)",
                      "no defense": None, "defense": accuracy(defended, x_bpda, y, _batch(run), run.device)}]
    adaptive = pd.DataFrame(rows)
    report.save_table(adaptive, "adaptive_bpda_ours", run.out,
                      caption="Ours (not in the paper): ResNet-50 accuracy (%) with the defense under an adaptive "
                              "BPDA attack")
    return adaptive


def agreement_summary(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per table, over like-for-like comparisons only (tables with a diff column) and cells both sides have: mean and
    max |ours - paper|, the share within CLOSE points and the share whose paper number lies in our 95% interval
    (NaN for a table without that column); stand-ins and tables without paper numbers are left out."""
    rows = []
    for label, table in tables.items():
        both = table.dropna(subset=["ours", "paper"]) if "diff" in table.columns else table.iloc[:0]
        if len(both):
            gap = both["diff"].abs()
            inside = 100 * both[IN_INTERVAL].astype(bool).mean() if IN_INTERVAL in both else np.nan
            rows.append({"table": label, "cells compared": len(both), "mean |diff| (points)": gap.mean(),
                         "max |diff| (points)": gap.max(), WITHIN: 100 * (gap <= CLOSE).mean(),
                         "paper in our 95% interval (%)": inside})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def summary_vs_paper(run: Run, tables: Tables13, table4_readings: Table4 | None) -> pd.DataFrame:
    """How far our numbers are from the paper's: Tables 1-3 per dataset and Table 4 under the chosen reading of
    DeepFool / CW, like for like only."""
    labelled = {f"{name} (Tables 1-3)": t for name, t in tables.chosen.items()}
    if table4_readings is not None:
        labelled["Table 4"] = table4_readings.chosen
    summary = agreement_summary(labelled)
    report.save_table(summary, "summary_vs_paper", run.out,
                      caption=f"How far our numbers are from the paper's (DeepFool / CW: '{tables.reading}' reading)")
    return summary
