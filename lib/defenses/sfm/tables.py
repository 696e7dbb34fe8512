"""Every table and figure of notebook 01 (paper 000, SFM-Defense, Yu et al. 2022), ours beside the paper's.

`prepare` loads one dataset's splits and the profile's target and surrogate classifiers; each producer below takes
the notebook's `Run` and {dataset: Prepared}, computes its table or figure as spec-000 §4-5 describes, saves it under
the run's results folder and returns it. Paper numbers come from `lib.reference` (paper 'sfm') and are joined with
`lib.reference.beside_paper`: CIFAR10, SVHN and Tiny-ImageNet are the paper's datasets (like for like, with a diff
column); any other dataset (Fashion-MNIST, the smoke digits) is compared with the paper's CIFAR10 numbers as a
labelled stand-in, without a diff column.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr
from torch import nn

from lib import report, viz
from lib.attacks import attack_surface
from lib.data import ImageData, load_dataset
from lib.defenses.base import Built, Defended, Defense, NoDefense
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.sfm.factory import sfm_for, sfm_splits
from lib.defenses.sfm.losses import paper_threshold_ratio
from lib.defenses.sfm.selection import CRITERION, W1Sweep, sweep_attacks, w1_sweep
from lib.defenses.sfm.training import last_masker_epoch, mask_statistics
from lib.defenses.squeeze import squeezer
from lib.evaluate import AttackSpec, adversarial_set, attack_specs, evaluate_threats
from lib.notebook import Run
from lib.reference import beside_paper, load_reference
from lib.train import trained_classifier

PAPER_ID = "sfm"
PAPER_DATASET = {"cifar10": "CIFAR10", "svhn": "SVHN", "tiny_imagenet": "Tiny-ImageNet"}
STAND_IN_DATASET = "CIFAR10"   # the paper's table shown beside a dataset it did not use
PAPER_TABLES = {"CIFAR10": ("table1", "table2"), "SVHN": ("table3", "table4"), "Tiny-ImageNet": ("table5", "table6")}
PAPER_KEYS = ["defense", "attack", "eps"]


@dataclass
class Prepared:
    """One dataset of the run: splits, the profile's classifiers, then the w1 sweep and the SFM per squeezer."""

    dataset: str
    target: nn.Module
    target_meta: dict[str, Any]
    surrogate: nn.Module
    surrogate_meta: dict[str, Any]
    val: ImageData                            # held out of the training split, only to choose w1
    test: ImageData                           # class-balanced test subset every table is measured on
    sweep: W1Sweep | None = None              # set by w1_sweep_table
    sfm: dict[str, Built] = field(default_factory=dict)   # squeezer spec -> SFM at the chosen w1 (sfm_models_table)

    @property
    def ratio(self) -> float:
        """w1 / identity threshold chosen by this run's sweep."""
        if self.sweep is None:
            raise RuntimeError(f"{self.dataset}: run w1_sweep_table first")
        return self.sweep.ratio


@dataclass(frozen=True)
class Attacks:
    """Notebook 01's attack lists from the profile: black box (transfer), gray / white box, and the summary subset."""

    black: list[AttackSpec]
    gray: list[AttackSpec]
    summary: list[AttackSpec]

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "Attacks":
        gray = attack_specs(config["gray_attacks"])
        return cls(attack_specs(config["black_attacks"]), gray, [s for s in gray if s.title in config["summary_attacks"]])

    @property
    def first_pgd(self) -> str:
        return next(s.title for s in self.gray if s.name == "pgd")


def label_fs(spec: str) -> str:
    """Row label of a squeezer alone in front of the vanilla target."""
    return f"FS ({spec})"


def label_ours(spec: str) -> str:
    """Row label of SFM-Defense with squeezer `spec`."""
    return f"Ours (SFM+{spec})"


def _default_t(run: Run) -> str:
    return run.config["default_preprocess"]


def prepare(run: Run, dataset: str) -> Prepared:
    """The validation and test splits of `dataset` and the profile's target and surrogate classifiers (cached)."""
    sfm_data, val = sfm_splits(run.profile, dataset)
    test = load_dataset(dataset, "test", n=run.config["eval_size"], seed=run.profile["seed"])
    target, tmeta = trained_classifier(run.profile, dataset, "target", device=run.device)
    surrogate, smeta = trained_classifier(run.profile, dataset, "surrogate", device=run.device)
    print(f"{dataset}: SFM training {len(sfm_data)}, validation {len(val)}, test {len(test)} images; "
          f"target {tmeta['test_accuracy']:.1f}%, surrogate {smeta['test_accuracy']:.1f}% test accuracy")
    return Prepared(dataset, target, tmeta, surrogate, smeta, val, test)


# --------------------------------------------------------------------------- section 1: w1 and the models


def w1_sweep_table(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Fig. 3's data: the w1 sweep of `lib.defenses.sfm.w1_sweep` (chosen on validation) with each sweep model's
    clean, black-box and gray-box accuracy on the test subset; records the sweep in each Prepared."""
    black_attack, gray_attack = sweep_attacks(run.config)
    print(f"the paper's CIFAR10/SVHN weights sit at {paper_threshold_ratio('cifar'):.2f} x the identity threshold "
          "(batch-tensor reading, B = 128)")
    parts = []
    for ds, p in runs.items():
        p.sweep = w1_sweep(run.profile, ds, p.target, p.surrogate, device=run.device)
        tests = []
        for built in p.sweep.models.values():
            model = {"ours": built.defense}
            common = dict(surrogate=p.surrogate, device=run.device)
            black = evaluate_threats(built.classifier, model, p.test.x, p.test.y, [black_attack], threats=("black",),
                                     **common)
            gray = evaluate_threats(built.classifier, model, p.test.x, p.test.y, [gray_attack], threats=("gray",),
                                    gray_box_models={"ours": built.defense.gray_box_model(built.classifier)}, **common)
            tests.append({"clean": black.clean_acc.iloc[0], f"black {black_attack.title}": black.robust_acc.iloc[0],
                          f"gray {gray_attack.title}": gray.robust_acc.iloc[0]})
        table = p.sweep.table
        parts.append(pd.concat([table[["dataset", "w1 / threshold", "w1", CRITERION]], pd.DataFrame(tests),
                                table[["mask mean", "mask status"]]], axis=1))
        print(f"{ds}: chosen w1 = {p.ratio} x threshold (max of validation clean + black-box {black_attack.title})")
    sweep = pd.concat(parts, ignore_index=True)
    report.save_table(sweep, "fig3_w1_sweep", run.out, floatfmt=".4g",
                      caption=f"w1 sweep (T = {_default_t(run)}): validation criterion and test accuracy (%)")
    return sweep


def sfm_models_table(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Trains (or loads) SFM-Defense with every squeezer at the chosen w1; the classifiers and SFM models with their
    training time and the mask statistics of the last SFM epoch."""
    rows = []
    for ds, p in runs.items():
        p.sfm = {spec: sfm_for(run.profile, ds, p.target, preprocess=spec, ratio=p.ratio, device=run.device)
                 for spec in run.config["preprocessors"]}
        rows += [{"dataset": ds, "model": "vanilla target", "test accuracy (%)": p.target_meta["test_accuracy"],
                  "train (s)": p.target_meta["train_seconds"]},
                 {"dataset": ds, "model": "surrogate (black box source)",
                  "test accuracy (%)": p.surrogate_meta["test_accuracy"], "train (s)": p.surrogate_meta["train_seconds"]}]
        for spec, built in p.sfm.items():
            last = last_masker_epoch(built.meta["history"]) or {}
            rows.append({"dataset": ds, "model": f"SFM-Defense, T = {spec}", "w1": built.meta["config"]["w1"],
                         "w1 / threshold": p.ratio, "train (s)": built.meta["train_seconds"],
                         "mask mean": last.get("mask_mean"), "mask < 0.01": last.get("mask_frac_zero"),
                         "mask > 0.99": last.get("mask_frac_one"), "mask status": built.meta["mask_status"]})
    models = pd.DataFrame(rows)
    report.save_table(models, "models", run.out, floatfmt=".4g",
                      caption="Classifiers and SFM-Defense models (mask statistics of the last SFM epoch)")
    return models


# --------------------------------------------------------------------------- section 2: threat models


def baselines(run: Run) -> dict[str, Defense]:
    """The defenses in front of the vanilla target: none, each squeezer alone, and TVM / JPEG when configured."""
    out: dict[str, Defense] = {"Vanilla": NoDefense(), **{label_fs(s): squeezer(s) for s in run.config["preprocessors"]}}
    settings = run.config["baselines"]
    if "TVM" in settings:
        out["TVM"] = TotalVariationMinimization(**settings["TVM"])
    if "JPEG" in settings:
        out["JPEG"] = JPEGCompression(**settings["JPEG"])
    return out


def evaluate_all(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Every (dataset, threat, defense, attack) evaluation on the test subset, tidy.

    Baselines sit in front of the vanilla target (black and gray box; white box for none and the squeezers); Ours
    uses its own F: black box, gray box on F(x * G(x)) and white box through the whole pipeline, with every attack
    for the default squeezer and the summary attacks for the others.
    """
    attacks = Attacks.of(run.config)
    tidy = []
    for ds, p in runs.items():
        x, y = p.test.x, p.test.y
        common = dict(surrogate=p.surrogate, batch_size=run.profile["eval_batch_size"], device=run.device)
        base = baselines(run)
        white = {k: v for k, v in base.items() if k not in ("TVM", "JPEG")}
        parts = [evaluate_threats(p.target, base, x, y, attacks.black, threats=("black",), **common),
                 evaluate_threats(p.target, base, x, y, attacks.gray, threats=("gray",), **common),
                 evaluate_threats(p.target, white, x, y, attacks.gray, threats=("white",), **common)]
        for spec, built in p.sfm.items():
            name = label_ours(spec)
            chosen = attacks.gray if spec == _default_t(run) else attacks.summary
            parts.append(evaluate_threats(built.classifier, {name: built.defense}, x, y, attacks.black,
                                          threats=("black",), **common))
            parts.append(evaluate_threats(built.classifier, {name: built.defense}, x, y, chosen, threats=("gray", "white"),
                                          gray_box_models={name: built.defense.gray_box_model(built.classifier)},
                                          **common))
        table = pd.concat(parts, ignore_index=True)
        table.insert(0, "dataset", ds)
        tidy.append(table)
        print(f"{ds}: {len(table)} evaluations")
    tidy_all = pd.concat(tidy, ignore_index=True)
    report.save_table(tidy_all, "all_evaluations", run.out, floatfmt=".4g",
                      caption="Every (threat, defense, attack) evaluation (tidy)")
    return tidy_all


def overview_table(run: Run, tidy: pd.DataFrame) -> pd.DataFrame:
    """Clean accuracy and accuracy under the summary attacks in all three threat models, for no defence, each
    squeezer alone and SFM + each squeezer."""
    summary = [s.title for s in Attacks.of(run.config).summary]
    part = tidy[tidy.attack.isin(summary) & ~tidy.defense.isin(["TVM", "JPEG"])]
    part = part.assign(column=part.threat + " " + part.attack)
    wide = part.pivot_table(index=["dataset", "defense"], columns="column", values="robust_acc",
                            sort=False).reset_index()
    clean = tidy.drop_duplicates(["dataset", "defense"])[["dataset", "defense", "clean_acc"]]
    wide = clean.merge(wide, on=["dataset", "defense"], how="right").rename(columns={"clean_acc": "clean"})
    report.save_table(wide, "overview", run.out, caption="Accuracy (%) of no defence, each squeezer and SFM + each squeezer")
    return wide


def paper_key(label: str) -> tuple[str, str]:
    """An attack label in the paper's (attack, eps) form: 'PGD-8' -> ('PGD', '8/255'); 'CW' -> ('CW', '')."""
    name, _, k = label.partition("-")
    return name, (f"{k}/255" if k else "")


def paper_layout(frame: pd.DataFrame, attacks: Sequence[AttackSpec], index: str = "defense") -> pd.DataFrame:
    """Rows = `index` values, columns = Clean + the attacks' labels (accuracy %), in the paper's order."""
    wide = frame.pivot_table(index=index, columns="attack", values="robust_acc", sort=False)
    wide.insert(0, "Clean", frame.groupby(index, sort=False).clean_acc.first())
    return wide[["Clean"] + [a.title for a in attacks if a.title in wide.columns]].reset_index()


def long_form(wide: pd.DataFrame, rename: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A paper_layout table as one row per (row label, attack, eps), value column `ours`; row labels are mapped
    through `rename` (ours -> the paper's names) where listed."""
    key = wide.columns[0]
    rows = []
    for _, row in wide.iterrows():
        for col in wide.columns[1:]:
            attack, eps = ("Clean", "") if col == "Clean" else paper_key(col)
            rows.append({key: (rename or {}).get(row[key], row[key]), "attack": attack, "eps": eps, "ours": row[col]})
    return pd.DataFrame(rows)


def paper_dataset(dataset: str) -> str:
    """The paper's dataset our `dataset` is compared with: itself when the paper used it, else CIFAR10 (stand-in)."""
    return PAPER_DATASET.get(dataset, STAND_IN_DATASET)


def versus_paper(ours: pd.DataFrame, reference: pd.DataFrame, on: Sequence[str], dataset: str) -> pd.DataFrame:
    """`lib.reference.beside_paper` for our `dataset` against the paper's `paper_dataset(dataset)` table."""
    return beside_paper(ours, reference, on, value_col="ours", paper_setting={"dataset": paper_dataset(dataset)},
                        ours_setting={"dataset": dataset})


def tables_1_to_6(run: Run, tidy: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables 1/3/5 (black box) and 2/4/6 (gray box) per dataset: ours in the paper's layout, and ours beside the
    paper's (rows Vanilla, FS = the default squeezer, TVM, Ours = SFM + the default squeezer; other rows ours only).
    Returns {table name: frame}."""
    attacks = Attacks.of(run.config)
    default_t = _default_t(run)
    rename = {"Vanilla": "Vanilla", label_fs(default_t): "FS", "TVM": "TVM", label_ours(default_t): "Ours"}
    out = {}
    for ds in tidy.dataset.unique():
        for threat, specs, number in (("black", attacks.black, "1/3/5"), ("gray", attacks.gray, "2/4/6")):
            ours = paper_layout(tidy[(tidy.dataset == ds) & (tidy.threat == threat)], specs)
            table = PAPER_TABLES[paper_dataset(ds)][0 if threat == "black" else 1]
            joined = versus_paper(long_form(ours, rename), load_reference(PAPER_ID, table), PAPER_KEYS, ds)
            name = f"{threat}_box_{ds}"
            report.save_table(ours, name, run.out,
                              caption=f"Table {number} analogue ({threat} box), {ds}: accuracy (%). "
                                      f"{run.config['eps_note']}")
            report.save_table(joined, name + "_vs_paper", run.out, caption=f"{threat} box, {ds}: ours beside the paper's "
                              f"(Table {number}). {run.config['eps_note']}")
            out[name], out[name + "_vs_paper"] = ours, joined
    return out


def table7(run: Run, tidy: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Table 7: Ours (SFM + the default squeezer) under adaptive white-box attacks, rows = datasets; and per dataset
    ours beside the paper's row of the same (or the stand-in) dataset. Returns {table name: frame}."""
    attacks = Attacks.of(run.config)
    white = tidy[(tidy.threat == "white") & (tidy.defense == label_ours(_default_t(run)))]
    ours = paper_layout(white, attacks.gray, index="dataset")
    report.save_table(ours, "table7_white_ours", run.out,
                      caption=f"Table 7 analogue: Ours (SFM+{_default_t(run)}) under adaptive white-box attacks (%)")
    out = {"table7_white_ours": ours}
    reference = load_reference(PAPER_ID, "table7")
    for ds in ours.dataset:
        long = long_form(ours[ours.dataset == ds]).drop(columns="dataset")
        joined = versus_paper(long, reference[reference.dataset == paper_dataset(ds)], ["attack", "eps"], ds)
        joined.insert(0, "dataset", ds)
        name = f"table7_white_{ds}_vs_paper"
        report.save_table(joined, name, run.out, caption=f"Table 7, {ds}: ours beside the paper's")
        out[name] = joined
    return out


# --------------------------------------------------------------------------- Table 8: time cost


def time_pipeline(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of one batched pass of `model` over x (inference only)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for xb in x.split(batch_size):
                model(xb.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def paper_time_ratios() -> pd.DataFrame:
    """The paper's Table 8 as ratios to the undefended model: defending and training cost per defense."""
    ref = load_reference(PAPER_ID, "table8")
    defend = ref[ref.setting.str.startswith("Defending")].set_index("defense").value
    train = ref[ref.setting.str.startswith("Training")].set_index("defense").value
    return pd.DataFrame({"defense": defend.index, "paper defending ratio to None": (defend / defend["None"]).values,
                         "paper training ratio to None": (train / train["None"]).reindex(defend.index).values})


def table8(run: Run, runs: Mapping[str, Prepared]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 8 measured here: training seconds (from the run that produced each cache entry) and one timed inference
    pass of each pipeline over the test subset, per image and as a ratio to the undefended classifier; and those
    ratios (first dataset) beside the paper's (CIFAR10). Returns (times, ratios)."""
    batch = run.profile["eval_batch_size"]
    default_t = _default_t(run)
    rows = []
    for ds, p in runs.items():
        x, train_target = p.test.x, p.target_meta["train_seconds"]
        base = time_pipeline(p.target.eval(), x, batch, run.device)
        entries = [("None", p.target.eval(), train_target)]
        entries += [(label_fs(s), Defended(p.target, squeezer(s).to(run.device)).eval(), train_target)
                    for s in run.config["preprocessors"]]
        own_f = train_target * run.config["init_from_target"]   # F starts from the target: its training counts
        entries += [(label_ours(s), b.model().eval(), own_f + b.meta["train_seconds"]) for s, b in p.sfm.items()]
        for name, model, train_s in entries:
            sec = base if name == "None" else time_pipeline(model, x, batch, run.device)
            rows.append({"dataset": ds, "defense": name, "training (s)": train_s, "ms per image": 1000 * sec / len(x),
                         "defending ratio to None": sec / base})
    times = pd.DataFrame(rows)
    report.save_table(times, "table8_time", run.out, floatfmt=".4g", caption=f"Table 8 analogue: time cost on this "
                      f"machine ({run.device}); training of Ours includes the target when F starts from it")
    ours = times.groupby("defense", sort=False)[["defending ratio to None", "training (s)"]].first().reset_index()
    ours["training ratio to None"] = ours["training (s)"] / ours.loc[ours.defense == "None", "training (s)"].iloc[0]
    ours["paper row"] = ours.defense.map({"None": "None", label_fs(default_t): "FS(Baseline)", label_ours(default_t): "Ours"})
    ratios = ours.merge(paper_time_ratios(), left_on="paper row", right_on="defense", how="outer",
                        suffixes=("", " (paper)"))
    report.save_table(ratios, "table8_ratios_vs_paper", run.out, floatfmt=".3g",
                      caption="Table 8 as ratios to the undefended model: ours (first dataset) and the paper's (CIFAR10)")
    return times, ratios


# --------------------------------------------------------------------------- figures


def _perturbation_image(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """delta / (2 eps) + 0.5 in [0, 1], on CPU."""
    return ((x_adv - x).cpu() / (2 * eps) + 0.5).clamp(0, 1)


def fig1_perturbations(run: Run, runs: Mapping[str, Prepared]) -> list[Figure]:
    """Fig. 1: clean test images, the PGD perturbation on the undefended target, and the adaptive PGD perturbation
    through target o default squeezer (its exact gradient, BPDA where it has none)."""
    k = run.config["figure_images"]
    pgd = next(s for s in Attacks.of(run.config).gray if s.name == "pgd")
    default_t = _default_t(run)
    figures = []
    for ds, p in runs.items():
        x, y = p.test.x[:k].to(run.device), p.test.y[:k].to(run.device)
        adv_plain, _ = adversarial_set(pgd, p.target, x, y, use_cache=False)
        adv_squeezed, _ = adversarial_set(pgd, attack_surface(p.target, squeezer(default_t).to(run.device)), x, y,
                                          use_cache=False)
        images = torch.cat([x.cpu(), _perturbation_image(x, adv_plain, pgd.eps),
                            _perturbation_image(x, adv_squeezed, pgd.eps)])
        titles = ["clean"] * k + ["δ, no defence"] * k + [f"δ through {default_t}"] * k
        fig = viz.image_grid(images, titles, ncols=k, suptitle=f"Fig. 1 ({ds}): {pgd.title} perturbations")
        report.save_figure(fig, f"fig1_perturbations_{ds}", run.out)
        figures.append(fig)
    return figures


def fig2_framework(run: Run) -> Figure:
    """Fig. 2: the inference pipeline F(T(x * G(x))) as a box diagram."""
    fig, ax = plt.subplots(figsize=(11, 1.8))
    steps = ["input x", "mask generator G\n(Attention U-Net)", "mask m\n(1 channel)", "x ⊙ m",
             "preprocessor T\n(feature squeezing)", "classifier F", "label"]
    for i, text in enumerate(steps):
        ax.text(i * 1.6, 0, text, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="#e8eef7" if i % 2 else "#f7efe8"))
        if i:
            ax.annotate("", xy=(i * 1.6 - 0.62, 0), xytext=((i - 1) * 1.6 + 0.62, 0), arrowprops=dict(arrowstyle="->"))
    ax.set_xlim(-0.8, 1.6 * (len(steps) - 1) + 0.8)
    ax.set_ylim(-0.6, 0.6)
    ax.axis("off")
    ax.set_title("Fig. 2: SFM-Defense at inference, F(T(x ⊙ G(x)))", fontsize=10)
    report.save_figure(fig, "fig2_framework", run.out)
    return fig


def fig3_w1_plots(run: Run, runs: Mapping[str, Prepared], sweep: pd.DataFrame) -> list[Figure]:
    """Fig. 3: the sweep models' clean, black-box and gray-box test accuracy against w1, the chosen w1 marked."""
    black_attack, gray_attack = sweep_attacks(run.config)
    figures = []
    for ds, grp in sweep.groupby("dataset", sort=False):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for col, style in (("clean", "o-"), (f"black {black_attack.title}", "s--"), (f"gray {gray_attack.title}", "^-.")):
            ax.plot(grp.w1, grp[col], style, label=col)
        chosen = runs[ds].sweep.chosen.meta["config"]["w1"]
        ax.axvline(chosen, color="grey", lw=0.8, ls=":", label="chosen w1")
        ax.set_xlabel("w1")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Fig. 3 ({ds}): accuracy vs w1 (w2 = {run.config['sfm']['w2']}, w3 = {run.config['sfm']['w3']})",
                     fontsize=9)
        ax.legend(fontsize=8)
        report.save_figure(fig, f"fig3_w1_sweep_{ds}", run.out)
        figures.append(fig)
    return figures


def fig4_defended(run: Run, runs: Mapping[str, Prepared]) -> list[Figure]:
    """Fig. 4: clean input x, mask m = G(x), masked x * m and defended T(x * m) (default squeezer), from `stages`."""
    k = run.config["figure_images"]
    default_t = _default_t(run)
    figures = []
    for ds, p in runs.items():
        x = p.test.x[:k].to(run.device)
        with torch.no_grad():
            defense = p.sfm[default_t].defense
            stages = defense.stages(x)
            squeezed = defense.purify(x)
        images = torch.cat([x, stages["mask"], stages["masked"], squeezed]).cpu()
        titles = ["x"] * k + ["mask"] * k + ["x ⊙ m"] * k + [f"T(x ⊙ m), T={default_t}"] * k
        fig = viz.image_grid(images, titles, ncols=k, suptitle=f"Fig. 4 ({ds}): defended samples")
        report.save_figure(fig, f"fig4_defended_{ds}", run.out)
        figures.append(fig)
    return figures


def fig5_ablation(run: Run, runs: Mapping[str, Prepared]) -> pd.DataFrame:
    """Fig. 5: SFM trained with one loss term dropped (the profile's `ablations`) beside the complete loss; defended
    samples per variant, and a supplementary table (not in the paper) of clean and gray-box test accuracy and mask
    statistics on up to 256 test images."""
    k = run.config["figure_images"]
    _, gray_attack = sweep_attacks(run.config)
    default_t = _default_t(run)
    rows = []
    for ds, p in runs.items():
        x, y = p.test.x, p.test.y
        variants = {"Complete": p.sfm[default_t],
                    **{name: sfm_for(run.profile, ds, p.target, preprocess=default_t, ratio=p.ratio, overrides=over,
                                     device=run.device) for name, over in run.config["ablations"].items()}}
        images = []
        for name, built in variants.items():
            res = evaluate_threats(built.classifier, {name: built.defense}, x, y, [gray_attack], threats=("gray",),
                                   surrogate=p.surrogate, device=run.device,
                                   gray_box_models={name: built.defense.gray_box_model(built.classifier)})
            with torch.no_grad():
                stats = mask_statistics(built.defense.mask(x[:256].to(run.device)))
                images.append(built.defense.purify(x[:k].to(run.device)).cpu())
            cfg = built.meta["config"]
            rows.append({"dataset": ds, "variant": name, "w1": cfg["w1"], "w2": cfg["w2"], "w3": cfg["w3"],
                         "clean": res.clean_acc.iloc[0], f"gray {gray_attack.title}": res.robust_acc.iloc[0],
                         **stats, "mask status (training)": built.meta["mask_status"]})
        fig = viz.image_grid(torch.cat(images), [n for n in variants for _ in range(k)], ncols=k,
                             suptitle=f"Fig. 5 ({ds}): defended samples per loss variant")
        report.save_figure(fig, f"fig5_ablation_{ds}", run.out)
    ablation = pd.DataFrame(rows)
    report.save_table(ablation, "fig5_ablation", run.out, floatfmt=".4g",
                      caption="Loss ablations (not in the paper's tables): accuracy (%) and mask statistics on test images")
    return ablation


# --------------------------------------------------------------------------- section 4: checks and closing note


def accuracy_of(tidy: pd.DataFrame, dataset: str, defense: str, threat: str | None = None,
                attack: str | None = None) -> float:
    """Clean accuracy of `defense` (attack None), else its robust accuracy under (threat, attack); NaN if not run."""
    sel = tidy[(tidy.dataset == dataset) & (tidy.defense == defense)]
    if attack is None:
        return float(sel.clean_acc.iloc[0])
    sel = sel[(sel.threat == threat) & (sel.attack == attack)]
    return float(sel.robust_acc.iloc[0]) if len(sel) else float("nan")


def _spearman(a: pd.Series, b: pd.Series) -> float:
    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def qualitative_checks(run: Run, tidy: pd.DataFrame, sweep: pd.DataFrame, ablation: pd.DataFrame) -> pd.DataFrame:
    """spec-000 §7(b)'s qualitative checks Q1-Q8 per dataset, PASS or WARN, computed from the tables above."""
    attacks = Attacks.of(run.config)
    first_pgd = attacks.first_pgd
    _, gray_attack = sweep_attacks(run.config)
    ours, fs = label_ours(_default_t(run)), label_fs(_default_t(run))
    rows = []
    for ds in tidy.dataset.unique():
        acc = partial(accuracy_of, tidy, ds)
        g_o, g_f, g_v = (acc(d, "gray", first_pgd) for d in (ours, fs, "Vanilla"))
        b_o, b_f, b_v = (acc(d, "black", first_pgd) for d in (ours, fs, "Vanilla"))
        cw_o, cw_v = acc(ours, "gray", "CW"), acc("Vanilla", "gray", "CW")
        w_o = acc(ours, "white", first_pgd)
        sw = sweep[sweep.dataset == ds]
        rho_c, rho_g = _spearman(sw.w1, sw.clean), _spearman(sw.w1, sw[f"gray {gray_attack.title}"])
        ab = ablation[(ablation.dataset == ds) & ablation.variant.isin(["No_Seg", "No_Recon"])]
        mean_mask = float(ablation[(ablation.dataset == ds) & (ablation.variant == "Complete")].mask_mean.iloc[0])
        checks = [
            ("Q1", "Ours clean >= Vanilla clean - 5", acc(ours) >= acc("Vanilla") - 5),
            ("Q2", f"gray {first_pgd}: Ours > FS >= Vanilla - 2, margin >= 10 ({g_o:.1f} / {g_f:.1f} / {g_v:.1f})",
             g_o >= g_f + 10 and g_f >= g_v - 2),
            ("Q3", f"black {first_pgd}: Ours > FS > Vanilla ({b_o:.1f} / {b_f:.1f} / {b_v:.1f})", b_o > b_f > b_v),
            ("Q4", f"gray CW: Ours >> Vanilla ({cw_o:.1f} vs {cw_v:.1f}; >= +20)", cw_o >= cw_v + 20),
            ("Q5", f"white {first_pgd} below gray by >= 15 ({w_o:.1f} vs {g_o:.1f})", w_o <= g_o - 15),
            ("Q6", f"sweep: Spearman rho(w1, clean) < 0 and rho(w1, gray) > 0 ({rho_c:.2f}, {rho_g:.2f})",
             rho_c < 0 and rho_g > 0),
            ("Q7", "No_Seg / No_Recon: mean mask < 0.05 and clean <= 20%",
             bool(((ab.mask_mean < 0.05) & (ab.clean <= 20)).all())),
            ("Q8", f"Complete model's mean mask in (0.05, 0.95) ({mean_mask:.3f})", 0.05 < mean_mask < 0.95)]
        rows += [{"dataset": ds, "check": q, "what": what, "result": "PASS" if ok else "WARN"} for q, what, ok in checks]
    table = pd.DataFrame(rows)
    report.save_table(table, "qualitative_checks", run.out, caption="Qualitative checks of spec-000 §7(b)")
    return table


def closing_note(run: Run, runs: Mapping[str, Prepared], overview: pd.DataFrame, models: pd.DataFrame,
                 times: pd.DataFrame) -> str:
    """Markdown closing note: per dataset the headline accuracies, the mask, whether SFM + squeezer beats the
    squeezer alone under gray-box PGD, and the inference cost against the paper's ratio; then the skips."""
    first_pgd = Attacks.of(run.config).first_pgd
    default_t = _default_t(run)
    ours = label_ours(default_t)
    paper_defend = paper_time_ratios().set_index("defense")["paper defending ratio to None"]
    pgd_col = f"gray {first_pgd}"
    lines = []
    for ds, p in runs.items():
        o = overview[overview.dataset == ds].set_index("defense")
        claim = [s for s in run.config["preprocessors"]
                 if label_ours(s) in o.index and o.loc[label_ours(s), pgd_col] > o.loc[label_fs(s), pgd_col]]
        t8 = times[times.dataset == ds].set_index("defense")
        last = models[(models.dataset == ds) & models.model.str.endswith(f"T = {default_t}")].iloc[0]
        lines.append(
            f"**{ds}** (n = {len(p.test)} test images). Clean / black / gray / white {first_pgd} accuracy (%): "
            + "; ".join(f"{d}: {o.loc[d, 'clean']:.1f} / {o.loc[d, 'black ' + first_pgd]:.1f} / {o.loc[d, pgd_col]:.1f} / "
                        f"{o.loc[d, 'white ' + first_pgd]:.1f}" for d in o.index)
            + f". Mask of Ours (T = {default_t}): mean {last['mask mean']:.3f}, {100 * last['mask < 0.01']:.1f}% of "
            f"entries < 0.01 ({last['mask status']}). The central claim (SFM + squeezer beats the squeezer alone under "
            f"gray-box {first_pgd}) holds here for {len(claim)} of {len(run.config['preprocessors'])} squeezers "
            f"({', '.join(claim) or 'none'}). Inference: {t8.loc[ours, 'ms per image']:.3f} ms per image for Ours "
            f"against {t8.loc['None', 'ms per image']:.3f} for the classifier alone "
            f"({t8.loc[ours, 'defending ratio to None']:.1f}x; paper {paper_defend['Ours']:.1f}x).")
    skipped = report.read_skips(run.out)
    if skipped:
        lines.append("Skipped: " + "; ".join(f"{s['what']} ({s['reason'].split('.')[0]})" for s in skipped) + ".")
    return "### Closing note (numbers from this run)\n\n" + "\n\n".join(lines)
