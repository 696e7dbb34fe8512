"""Every table and figure of notebook 02 (IDFR, spec-001): the evaluation of the IDFR ablation pipelines and the
baselines per dataset, Tables 1-5 ours beside the paper's (lib.reference.beside_paper), the adaptive white box
(ours), Figure 2 (the FR's convex hull, from data), Figure 3 with the text's aggregates, and the closing note.

Our budgets map onto the paper's epsilon columns by position (`paper_eps` of the profile); our classifiers stand
for the paper's models (`PAPER_MODELS`, overridden per dataset by the profile's `paper_models`). Where our
dataset or model is not the paper's, the paper column says so and there is no difference column.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from lib.data import load_dataset
from lib.defenses.base import Compose, Defense, NoDefense
from lib.defenses.baselines import JPEGCompression, TotalVariationMinimization
from lib.defenses.idfr.defense import InputDenoising
from lib.defenses.idfr.training import (ConvexHullSampler, FeaturePool, IDFRFit, IDFRSetting, attack_grid,
                                        trained_denoiser, trained_idfr)
from lib.defenses.squeeze import BitDepthReduction, MedianFilter
from lib.evaluate import AttackSpec, evaluate_threats
from lib.notebook import Run
from lib.profiles import dataset_config
from lib.reference import beside_paper, load_reference, stand_in_label
from lib.train import trained_classifier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THREAT_LABELS = {"black": "black-box", "gray": "white-box (oblivious)", "white": "adaptive (ours)"}
PAPER_TABLES = {"cifar10": ("table1", "CIFAR-10"), "cifar100": ("table2", "CIFAR-100"), "imagenet": ("table3", "ImageNet")}
PAPER_MODELS = {"table1": ("VGG16", "ResNet18"), "table2": ("VGG16", "ResNet18"), "table3": ("ResNet50", "InceptionV3")}
TABLE4_MODEL = "VGG16"      # Table 4's single target is not named; VGG16 by its clean accuracy (spec-001 Table 4)
TABLE5_MODEL = "ResNet50"
ROLES = {"target": "classifier", "surrogate": "surrogate"}   # role -> its section in the profile's dataset settings
OTHER_ROLE = {"target": "surrogate", "surrogate": "target"}
DENOISER_LABELS = {"pixel_l1": "Pixel-L1 denoiser (ours)", "feature_l1": "HGD-style denoiser (ours)"}
ABLATION = ("No Defense", "ID", "FR", "ID+FR")
KEYS = ["model", "defense", "attack", "eps"]


# ----------------------------------------------------------------------------------------- evaluation

def evaluate_models(target: nn.Module, models: Mapping[str, nn.Module], purifiers: Mapping[str, Defense],
                    x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec], *, threats: Sequence[str],
                    surrogate: nn.Module | None = None, batch_size: int = 256,
                    device: torch.device | None = None) -> pd.DataFrame:
    """Accuracy of whole defended models (e.g. IDFRClassifier pipelines) and of purifiers in front of `target`.

    Uses lib.evaluate.evaluate_threats: a model is passed as the classifier with NoDefense and its gray box is the
    bare target (the paper's defense-oblivious white box); "white" attacks the model end to end (adaptive).
    Threats are relabelled with THREAT_LABELS. Adversarial sets of the black and gray box are shared (cached).
    """
    frames = []
    common = dict(surrogate=surrogate, batch_size=batch_size, device=device)
    for name, model in models.items():
        frames.append(evaluate_threats(model, {name: NoDefense()}, x, y, specs, threats=threats,
                                       gray_box_models={name: target}, **common))
    if purifiers:
        frames.append(evaluate_threats(target, dict(purifiers), x, y, specs, threats=threats, **common))
    out = pd.concat(frames, ignore_index=True)
    out["threat"] = out["threat"].map(THREAT_LABELS)
    return out


def baseline_purifiers(config: Mapping[str, Any], seed: int) -> dict[str, Defense]:
    """The paper's input-transformation baselines we can run: Feature Squeezing, JPEG at each quality, TVM."""
    sq = config["squeeze"]
    purifiers: dict[str, Defense] = {"Feature Squeezing": Compose(BitDepthReduction(sq["bits"]), MedianFilter(sq["median"]))}
    purifiers.update({f"JPEG(q={q})": JPEGCompression(q) for q in config["jpeg_qualities"]})
    purifiers["TVM"] = TotalVariationMinimization(**config["tvm"], seed=seed)
    return purifiers


@dataclass
class DatasetRun:
    """One dataset's IDFR run: per target role the classifier, its trained IDFR, the evaluation rows (black box
    and oblivious white box) and a training-summary row."""

    dataset: str
    targets: dict[str, nn.Module]
    fits: dict[str, IDFRFit]
    rows: dict[str, pd.DataFrame]
    summary: list[dict[str, Any]]


def evaluate_dataset(run: Run, dataset: str) -> DatasetRun:
    """For each role of the notebook's `targets`: train (or load) ID and FR and the learned-denoiser baselines
    (same U-Net, data and budget, another loss; no FR), then clean and attacked accuracy of the ablation pipelines
    and the baselines, black box (crafted on the other role) and white box oblivious (crafted on the bare target)."""
    cfg, profile, device = run.config, run.profile, run.device
    section = dataset_config(profile, dataset)
    test = load_dataset(dataset, "test", n=cfg["eval_size"], seed=profile["seed"] + 1)
    models = {role: trained_classifier(profile, dataset, role, device=device) for role in ROLES}
    setting = IDFRSetting.from_profile(profile, dataset)
    out = DatasetRun(dataset, {}, {}, {}, [])
    for role in cfg["targets"]:
        t0 = time.perf_counter()
        (target, meta), other = models[role], models[OTHER_ROLE[role]][0]
        fit = trained_idfr(target, setting, device=device)
        learned = {DENOISER_LABELS.get(loss, loss): InputDenoising(trained_denoiser(target, setting, loss=loss, device=device)[0])
                   for loss in cfg["baseline_denoisers"]}
        out.rows[role] = evaluate_models(target, fit.pipelines(target), {**baseline_purifiers(cfg, profile["seed"]), **learned},
                                         test.x, test.y, setting.specs, threats=("black", "gray"), surrogate=other,
                                         batch_size=profile["eval_batch_size"], device=device)
        out.targets[role], out.fits[role] = target, fit
        out.summary.append({
            "dataset": dataset, "role": role, "arch": section[ROLES[role]]["arch"],
            "target clean acc (%)": meta["test_accuracy"], "ID train s": round(fit.meta["id_seconds"], 1),
            "ID cached": fit.meta["id_cache_hit"], "ID final loss": fit.meta["id_history"][-1]["loss"],
            "FR train s": round(fit.meta["fr_seconds"], 1), "FR final loss": fit.meta["fr_history"][-1]["loss"],
            "pool size": fit.meta["pool_size"], "p2 fraction (%)": 100 * fit.meta["p2_fraction"],
            "classes without p2": len(fit.meta["fallback_classes"]), "seconds": round(time.perf_counter() - t0, 1)})
    return out


def training_summary(results: Mapping[str, DatasetRun]) -> pd.DataFrame:
    """One row per (dataset, role): target accuracy, ID / FR training time and final loss, the FR pool."""
    return pd.DataFrame([row for result in results.values() for row in result.summary])


def adaptive_table(run: Run, results: Mapping[str, DatasetRun]) -> pd.DataFrame | None:
    """Ours, beyond the paper: the white box differentiating the whole pipeline end to end (ID and FR are
    differentiable, so plain gradients), beside the oblivious white box, on the profile's `adaptive_size` test
    images, for the pipelines in `adaptive_models`. None when no dataset has a 'target' role."""
    cfg, profile = run.config, run.profile
    frames = []
    for name, result in results.items():
        if "target" not in result.fits:
            continue
        target = result.targets["target"]
        test = load_dataset(name, "test", n=cfg["adaptive_size"], seed=profile["seed"] + 2)
        pipes = {k: v for k, v in result.fits["target"].pipelines(target).items() if k in cfg["adaptive_models"]}
        rows = evaluate_models(target, pipes, {}, test.x, test.y, attack_grid(cfg["attacks"], cfg["eps"][name]),
                               threats=("white", "gray"), batch_size=profile["eval_batch_size"], device=run.device)
        frames.append(rows.assign(dataset=name))
    return pd.concat(frames, ignore_index=True) if frames else None


# ----------------------------------------------------------------------------------------- ours beside the paper

def paper_long(rows: pd.DataFrame, model: str, eps_labels: Sequence[str]) -> pd.DataFrame:
    """Our tidy rows (one threat) as the reference schema: a Clean row per defense and one row per (attack, eps),
    with eps relabelled by position to the paper's values (ours are kept in 'our_eps')."""
    eps_values = sorted({float(e) for e in rows["eps"].dropna()})
    if len(eps_values) != len(eps_labels):
        raise ValueError(f"{len(eps_values)} epsilons {eps_values} cannot map onto the paper's {list(eps_labels)}")
    label = dict(zip(eps_values, eps_labels))
    clean = rows.groupby("defense", sort=False)["clean_acc"].first().reset_index()
    clean = clean.rename(columns={"clean_acc": "value"}).assign(attack="Clean", eps="", our_eps=float("nan"))
    attacked = rows.assign(value=rows["robust_acc"], our_eps=rows["eps"].astype(float),
                           eps=rows["eps"].astype(float).map(label))[["defense", "attack", "eps", "our_eps", "value"]]
    return pd.concat([clean, attacked], ignore_index=True).assign(model=model)


def our_model(profile: Mapping[str, Any], dataset: str, role: str, paper_model: str) -> str:
    """Our classifier of `role` as named in a comparison with `paper_model`: the paper's name when it is that
    architecture at full width, else our architecture (and width), e.g. 'resnet18 x0.25'."""
    spec = dataset_config(profile, dataset)[ROLES[role]]
    width = float(spec.get("width", 1.0))
    if width == 1.0 and stand_in_label({"model": paper_model}, {"model": spec["arch"]}) is None:
        return paper_model
    return spec["arch"] if width == 1.0 else f"{spec['arch']} x{width:g}"


def beside_reference(ours: pd.DataFrame, table: str, *, paper_setting: Mapping[str, str],
                     ours_setting: Mapping[str, str], dataset: str | None = None) -> pd.DataFrame:
    """Ours (paper_long frames) beside lib.reference's idfr `table` (its rows for our models, and for one of its
    datasets when given) through lib.reference.beside_paper; adds our epsilon ('our_eps') and 'ran_here' (False:
    a row only the paper has, e.g. a baseline we do not run)."""
    ref = load_reference("idfr", table)
    if dataset is not None:
        ref = ref[ref["dataset"] == dataset]
    ref = ref[ref["model"].isin(ours["model"].unique())]
    out = beside_paper(ours, ref, KEYS, value_col="value", paper_setting=paper_setting, ours_setting=ours_setting)
    our_eps = ours.drop_duplicates(KEYS).set_index(KEYS)["our_eps"]
    out["our_eps"] = [our_eps.get(tuple(k), float("nan")) for k in out[KEYS].itertuples(index=False)]
    out["ran_here"] = out["ours"].notna()
    return out


def paper_table(dataset: str) -> tuple[str, str]:
    """(reference table, paper dataset) the black-box results on `dataset` compare with (CIFAR-10's for stand-ins)."""
    return PAPER_TABLES.get(dataset, ("table1", "CIFAR-10"))


def _idfr_named(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.assign(defense=rows["defense"].replace({"ID+FR": "IDFR(Ours)"}))


def blackbox_long(run: Run, results: Mapping[str, DatasetRun]) -> dict[str, pd.DataFrame]:
    """Tables 1-3, ours: per dataset the black-box rows of every target role in the reference schema, each role
    under the paper model it stands for; IDFR as 'IDFR(Ours)', the ablation parts (ID, FR) left out."""
    cfg = run.config
    out = {}
    for name, result in results.items():
        models = _paper_models(cfg, name)
        longs = [paper_long(_idfr_named(result.rows[role].query("threat == 'black-box'")), models[role],
                            cfg["paper_eps"][name]) for role in cfg["targets"] if role in result.rows]
        ours = pd.concat(longs, ignore_index=True)
        out[name] = ours[~ours["defense"].isin(["ID", "FR"])]
    return out


def _paper_models(config: Mapping[str, Any], dataset: str) -> dict[str, str]:
    """Role -> the paper model it stands for in the dataset's black-box table."""
    table = paper_table(dataset)[0]
    return {**dict(zip(("target", "surrogate"), PAPER_MODELS[table])), **config.get("paper_models", {}).get(dataset, {})}


def blackbox_table(run: Run, dataset: str, ours: pd.DataFrame) -> pd.DataFrame:
    """Tables 1-3: black-box accuracy (%) on `dataset` (a blackbox_long frame) beside the paper's table for it."""
    table, paper_dataset = paper_table(dataset)
    models = _paper_models(run.config, dataset)
    roles = [role for role in run.config["targets"] if models[role] in set(ours["model"])]
    paper_setting = {"dataset": paper_dataset, "model": ", ".join(models[r] for r in roles)}
    ours_setting = {"dataset": dataset, "model": ", ".join(our_model(run.profile, dataset, r, models[r]) for r in roles)}
    side = beside_reference(ours, table, paper_setting=paper_setting, ours_setting=ours_setting)
    return side.assign(our_dataset=dataset, paper_dataset=paper_dataset)


def whitebox_tables(run: Run, results: Mapping[str, DatasetRun]) -> dict[str, pd.DataFrame]:
    """Table 4: white-box (defense-oblivious: AEs crafted on the bare target) accuracy (%) beside the paper's
    (CIFAR-10), per dataset with a 'target' role."""
    out = {}
    for name, result in results.items():
        if "target" not in result.rows:
            continue
        rows = _idfr_named(result.rows["target"].query("threat == 'white-box (oblivious)'"))
        ours = paper_long(rows, "", run.config["paper_eps"][name])
        ours = ours[~ours["defense"].isin(["ID", "FR"])]
        side = beside_reference(ours, "table4", paper_setting={"dataset": "CIFAR-10", "model": TABLE4_MODEL},
                                ours_setting={"dataset": name, "model": our_model(run.profile, name, "target", TABLE4_MODEL)})
        out[name] = side.assign(our_dataset=name, paper_dataset="CIFAR-10")
    return out


def ablation_tables(run: Run, results: Mapping[str, DatasetRun]) -> dict[str, pd.DataFrame]:
    """Table 5: none / ID / FR / ID+FR under both protocols (the caption says black box, the undefended CW numbers
    look white-box: spec §8 item 16), beside the paper's ResNet-50 column (SVHN's for SVHN, else CIFAR-10's).
    "FR" alone (trained on post-ID features, applied without the ID) is ours; the paper has no such row."""
    out = {}
    for name, result in results.items():
        if "target" not in result.rows:
            continue
        rows = result.rows["target"]
        rows = rows[rows["defense"].isin(ABLATION)]
        paper_dataset = "SVHN" if name == "svhn" else "CIFAR10"
        settings = dict(paper_setting={"dataset": paper_dataset, "model": TABLE5_MODEL},
                        ours_setting={"dataset": name, "model": our_model(run.profile, name, "target", TABLE5_MODEL)})
        parts = [beside_reference(paper_long(rows[rows["threat"] == threat], TABLE5_MODEL, run.config["paper_eps"][name]),
                                  "table5", dataset=paper_dataset, **settings).assign(threat=threat)
                 for threat in ("black-box", "white-box (oblivious)")]
        out[name] = pd.concat(parts, ignore_index=True).assign(our_dataset=name)
    return out


def wide(side: pd.DataFrame, index: str | Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """A comparison table pivoted for reading: ours and the paper's column (whatever its label) side by side."""
    values = ["ours", *[c for c in side.columns if c == "paper" or str(c).startswith("paper (")]]
    return side.pivot_table(index=index, columns=list(columns), values=values, sort=False).round(1)


# ----------------------------------------------------------------------------------------- figures and aggregates

def average_accuracy(long: pd.DataFrame, value_col: str = "value") -> pd.Series:
    """Fig. 3: mean over every cell (clean + attacks, all models) of a table, per defense (table order)."""
    return long.groupby("defense", sort=False)[value_col].mean()


def aggregate_claims(long: pd.DataFrame, value_col: str = "value", idfr: str = "IDFR(Ours)",
                     undefended: str = "No Defense") -> dict[str, float]:
    """Spec §6 item 7: gap of IDFR's and of the (uniformly averaged) baselines' mean accuracy to the mean undefended
    clean accuracy, and IDFR's margin over the baselines. Reproduces the text's 4.2/17.7 (CIFAR-10) and 2.4/11.8/9.4
    (CIFAR-100) from Tables 1-2."""
    avg = average_accuracy(long, value_col)
    clean_ref = long[(long["defense"] == undefended) & (long["attack"] == "Clean")][value_col].mean()
    baselines = avg.drop([undefended, idfr], errors="ignore")
    if idfr not in avg or baselines.empty:
        raise ValueError(f"aggregate_claims needs rows for {idfr!r} and at least one baseline")
    return {"idfr_clean_gap": float(clean_ref - avg[idfr]), "baseline_clean_gap": float(clean_ref - baselines.mean()),
            "idfr_margin": float(avg[idfr] - baselines.mean())}


def average_accuracy_figure(black: Mapping[str, pd.DataFrame]) -> tuple[Figure, pd.DataFrame]:
    """Fig. 3 and the text's aggregates: average accuracy per method over every cell of the paper's Tables 1-3
    and of our black-box tables (blackbox_long frames). Returns (figure, aggregates table)."""
    import matplotlib.pyplot as plt

    panels = [(f"paper {t} ({d})", load_reference("idfr", t)) for t, d in
              [("table1", "CIFAR-10"), ("table2", "CIFAR-100"), ("table3", "ImageNet")]]
    panels += [(f"ours, black-box ({name})", ours.dropna(subset=["value"])) for name, ours in black.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    rows = []
    for ax, (title, frame) in zip(axes[0], panels):
        avg = average_accuracy(frame)
        clean = frame[(frame["defense"] == "No Defense") & (frame["attack"] == "Clean")]["value"].mean()
        ax.bar(range(len(avg)), avg.values, color=["tab:red" if d == "IDFR(Ours)" else "tab:blue" for d in avg.index])
        ax.axhline(clean, color="k", ls="--", lw=1, label="undefended clean")
        ax.set_xticks(range(len(avg)), avg.index, rotation=75, fontsize=7)
        ax.set(title=title, ylabel="average accuracy (%)")
        ax.legend(fontsize=7)
        rows.append({"source": title, **{k: round(v, 2) for k, v in aggregate_claims(frame).items()}})
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def hull_figure(pool: FeaturePool, pairing: str = "paper", klass: int | None = None, n_mix: int = 200,
                seed: int = 0) -> Figure:
    """Fig. 2 made from data: 2-D PCA of one class's post-ID embeddings (p1 / p2), the convex hull of the points
    and mixtures sampled as the FR's training distribution (`pairing`). `klass` None: the class with the most
    misclassified embeddings among those the sampler draws mixtures of."""
    import matplotlib.pyplot as plt
    from scipy.spatial import ConvexHull

    sampler = ConvexHullSampler(pool, pairing)
    drawn = sampler.classes.tolist()
    if klass is None:
        misclassified = torch.bincount(pool.y[~pool.correct], minlength=int(pool.y.max()) + 1)
        klass = max(drawn, key=lambda c: int(misclassified[c]))   # the first such class on a tie
    mask = pool.y == klass
    if not mask.any():
        raise ValueError(f"class {klass} has no embedding in the pool")
    if klass not in drawn:   # pairing 'paper' draws only classes with a correctly classified embedding
        raise ValueError(f"class {klass} has no mixture to show: the sampler ({pairing!r} pairing) draws only "
                         f"classes {drawn}")
    h = pool.h[mask]
    mean = h.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(h - mean, q=2, center=False)
    gen = torch.Generator().manual_seed(seed)
    mixes = []
    while sum(len(m) for m in mixes) < n_mix:
        batch = sampler.sample(max(n_mix, 64), gen)
        mixes.append(batch["h"][batch["y"] == klass])
    mix = ((torch.cat(mixes)[:n_mix] - mean) @ v[:, :2]).numpy()
    pts, ok = ((h - mean) @ v[:, :2]).numpy(), pool.correct[mask].numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(*pts[ok].T, s=6, c="tab:blue", alpha=0.4, label=f"p1: classified correctly ({ok.sum()})")
    ax.scatter(*pts[~ok].T, s=14, c="tab:red", marker="x", label=f"p2: misclassified ({(~ok).sum()})")
    ax.scatter(*mix.T, s=5, c="tab:green", alpha=0.5, label=f"sampled mixtures ({len(mix)})")
    if len(pts) >= 3:
        hull = ConvexHull(pts)
        for simplex in hull.simplices:
            ax.plot(*pts[simplex].T, c="grey", lw=0.8)
    ax.set(title=f"class {klass}: post-ID embeddings (PCA) and the FR's convex-hull samples",
           xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=7)
    return fig


def closing_note(results: Mapping[str, DatasetRun], ablation: Mapping[str, pd.DataFrame],
                 adaptive: pd.DataFrame | None, config: Mapping[str, Any], wall_seconds: float) -> str:
    """Markdown computed from this run: per dataset and protocol the ablation's mean attacked (and clean) accuracy
    and whether ID+FR beats each part alone, the adaptive white box against the oblivious one, the variant run."""
    lines = []
    for name, table5 in ablation.items():
        for threat, part in table5[table5["ours"].notna()].groupby("threat", sort=False):
            attacked = part[part["attack"] != "Clean"].groupby("defense")["ours"].mean()
            clean = part[part["attack"] == "Clean"].set_index("defense")["ours"]
            holds = attacked["ID+FR"] > max(attacked["ID"], attacked["FR"])
            lines.append(f"* **{name}, {threat}**: mean attacked accuracy none {attacked['No Defense']:.1f}, ID {attacked['ID']:.1f}, "
                         f"FR {attacked['FR']:.1f}, ID+FR {attacked['ID+FR']:.1f} (clean: none {clean['No Defense']:.1f}, ID {clean['ID']:.1f}, "
                         f"FR {clean['FR']:.1f}, ID+FR {clean['ID+FR']:.1f}). ID+FR beats each part alone: **{'yes' if holds else 'no'}** "
                         f"(ID+FR - ID = {attacked['ID+FR'] - attacked['ID']:+.1f} points).")
    if adaptive is not None:
        for (name, defense), part in adaptive.groupby(["dataset", "defense"], sort=False):
            means = part.groupby("threat")["robust_acc"].mean()
            lines.append(f"* **{name}, {defense}, adaptive white box (ours)**: mean {means['adaptive (ours)']:.1f} vs "
                         f"{means['white-box (oblivious)']:.1f} oblivious on the same images.")
    lines.append(f"* FR variant: pool `{config['fr_pool']}`, pairing `{config['fr']['pairing']}`; ID loss "
                 f"`{config['id']['loss']}`, width {config['denoiser']['width']}.")
    timings = ", ".join(f"{row['dataset']}/{row['role']} {row['seconds']:.0f} s" for r in results.values() for row in r.summary)
    lines.append(f"* Wall time of this notebook: {wall_seconds:.0f} s ({timings}).")
    return "\n".join(lines)
