"""Cross-defense benchmark: every defense under the same attacks, summarised as a leaderboard.

Every defense comes from `lib.defenses.registry.build` as a `Built` and is evaluated as the defended model
`built.classifier(built.defense.purify(x))` (lib.evaluate.evaluate_threats, one call per classifier the defenses sit
in front of). Gray box: adversarial examples crafted on the profile's undefended target classifier, also for the
defenses with their own classifier (SFM's fine-tuned one, the adversarially trained one, IDFR's feature-restored
one), whose gray box is thus a transfer from the target. White box: through the whole defended model. This module
adds costs (purification time, training time, parameters), the worst case over attacks, and the two figures
(accuracy against epsilon, clean against robust accuracy).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from lib.data import DatasetUnavailable, load_dataset
from lib.defenses.base import Built
from lib.defenses.registry import build
from lib.evaluate import AttackSpec, attack_specs, evaluate_threats
from lib.notebook import Run
from lib.train import trained_classifier

ADAPTIVE_NOTES = {
    "full": "exact gradients through the defense",
    "BPDA": "BPDA (identity backward through non-differentiable steps): an approximation, so white-box "
            "accuracy is an upper bound",
    "BPDA-approx": "BPDA with the defense's own differentiable approximation (e.g. straight-through rounding, "
                   "exact gradients through its network); white-box accuracy is an upper bound",
}


def evaluate_defenses(defenses: Mapping[str, Built], target: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      attacks: Sequence[AttackSpec], *, threats: Sequence[str] = ("gray", "white"),
                      eot_samples: int = 1, batch_size: int = 256, device: torch.device | None = None) -> pd.DataFrame:
    """evaluate_threats' rows for every built defense: defenses sharing a classifier are evaluated together, and a
    defense whose classifier is not `target` is attacked in the gray box through `target` (a transfer)."""
    groups: dict[int, list[str]] = {}
    for name, built in defenses.items():
        groups.setdefault(id(built.classifier), []).append(name)
    frames = []
    for names in groups.values():
        classifier = defenses[names[0]].classifier
        gray = None if classifier is target else {name: target for name in names}
        frames.append(evaluate_threats(classifier, {name: defenses[name].defense for name in names}, x, y, attacks,
                                       threats=threats, gray_box_models=gray, eot_samples=eot_samples,
                                       batch_size=batch_size, device=device))
    return pd.concat(frames, ignore_index=True)


def benchmark_dataset(run: Run, dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Notebook 09 on one dataset: (every row of evaluate_defenses for the headline and curve attacks, with a dataset
    column; defense_costs). Each defense of the profile section is built through the registry for the profile's
    target classifier; one that cannot be built (no settings for this dataset, a missing dataset) is recorded as
    skipped."""
    cfg, profile = run.config, run.profile
    test = load_dataset(dataset, "test", n=cfg["eval_size"], seed=profile["seed"])
    target, meta = trained_classifier(profile, dataset, "target", device=run.device)
    defenses: dict[str, Built] = {}
    for name in cfg["defenses"]:
        try:
            defenses[name] = build(name, profile, dataset, target, device=run.device)
        except (DatasetUnavailable, ValueError) as err:   # ValueError: no settings for this dataset
            run.skip(f"{name} on {dataset}", str(err))
    print(f"{dataset}: classifier {meta['test_accuracy']:.1f}% clean; defenses {list(defenses)}")
    x, y = test.x.to(run.device), test.y.to(run.device)
    rows = evaluate_defenses(defenses, target, x, y, attack_specs(cfg["attacks"]) + attack_specs(cfg["curve"]),
                             threats=cfg["threats"], eot_samples=cfg["eot_samples"], device=run.device)
    rows.insert(0, "dataset", dataset)
    return rows, defense_costs(defenses, target, x[:cfg["timing_images"]])


def headline_rows(rows: pd.DataFrame, attacks: Sequence[AttackSpec]) -> pd.DataFrame:
    """The rows of the headline `attacks` (the curve's other budgets left out)."""
    return rows[rows.attack.isin([a.title for a in attacks])]


@torch.no_grad()
def _ms_per_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> float:
    """Wall-clock milliseconds per image of fn over x in batches (after one warm-up batch)."""
    fn(x[:min(len(x), 8)])
    start = time.perf_counter()
    for xb in x.split(batch_size):
        fn(xb)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return 1000.0 * (time.perf_counter() - start) / len(x)


def defense_costs(defenses: Mapping[str, Built], target: nn.Module, x: torch.Tensor,
                  batch_size: int = 256) -> pd.DataFrame:
    """Per defense: milliseconds per image it adds to the target classifier, learned parameters, training seconds.

    Time: `purify`, plus (for a defense with its own classifier) that classifier's forward pass beyond the target's.
    Parameters: the defense's, plus those of its classifier beyond the target's when that classifier wraps the target
    (IDFR's feature restorer); a classifier that replaces the target (fine-tuned or retrained) adds none.
    Training seconds: `Built.meta["train_seconds"]`, of the run that trained it (also on a cache hit).
    """
    own = {id(p) for p in target.parameters()}
    bare_ms = None
    rows = []
    for name, built in defenses.items():
        ms = _ms_per_image(built.defense.purify, x, batch_size)
        learned = {id(p): p for p in built.defense.parameters()}
        if built.classifier is not target:
            bare_ms = _ms_per_image(target, x, batch_size) if bare_ms is None else bare_ms
            ms += max(_ms_per_image(built.classifier, x, batch_size) - bare_ms, 0.0)
            if any(id(p) in own for p in built.classifier.parameters()):
                learned.update({id(p): p for p in built.classifier.parameters()})
        rows.append({"defense": name, "purify_ms_per_image": ms,
                     "parameters": sum(p.numel() for i, p in learned.items() if i not in own),
                     "train_seconds": float(built.meta["train_seconds"])})
    return pd.DataFrame(rows)


def worst_case(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (defense, threat): the lowest robust accuracy over all attacks and budgets, and which attack gave it."""
    idx = rows.groupby(["defense", "threat"])["robust_acc"].idxmin()
    worst = rows.loc[idx, ["defense", "threat", "robust_acc", "attack", "eps"]]
    return worst.rename(columns={"robust_acc": "worst_acc", "attack": "worst_attack", "eps": "worst_eps"})


def leaderboard(rows: pd.DataFrame, costs: pd.DataFrame, labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One line per defense, sorted by worst-case robust accuracy over every attack and threat model."""
    worst = worst_case(rows)
    by_threat = worst.pivot(index="defense", columns="threat", values="worst_acc").add_prefix("worst_")
    overall = worst.loc[worst.groupby("defense")["worst_acc"].idxmin()].set_index("defense")
    clean = rows.groupby("defense")["clean_acc"].first()
    routes = rows[rows.threat == "white"].groupby("defense")["gradient"].first()
    table = pd.DataFrame({"clean_acc": clean}).join(by_threat)
    table["worst_acc"] = overall["worst_acc"]
    table["worst_attack"] = overall["worst_attack"] + " (" + overall["threat"] + ")"
    table["white_box_gradient"] = routes
    table = table.join(costs.set_index("defense"))
    table = table.sort_values(["worst_acc", "clean_acc"], ascending=False).reset_index()
    if labels:
        table.insert(1, "name", table["defense"].map(lambda d: labels.get(d, d)))
    return table


def leaderboard_notes(board: pd.DataFrame) -> str:
    """Markdown under a leaderboard: what each white-box gradient route means, and the defenses whose adaptive attack
    found fewer errors than the gray-box transfer (a sign of obfuscated gradients)."""
    lines = []
    for route in sorted(set(board.white_box_gradient.dropna())):
        key = route.split("+")[0]
        lines.append(f"* `{route}`: {ADAPTIVE_NOTES.get(key, key)}")
    if {"worst_white", "worst_gray"} <= set(board.columns):
        masked = board[board.worst_white > board.worst_gray]
        if len(masked):
            names = masked["name"] if "name" in masked else masked["defense"]
            lines.append("\nAdaptive attacks found fewer errors than transfer from the bare classifier against "
                         + ", ".join(names) + ": a sign of obfuscated gradients (Athalye et al. 2018). "
                         "The worst case above already takes the gray-box number for them.")
    return "\n".join(lines)


def defense_styles(defenses: Sequence[str]) -> dict[str, dict]:
    """A distinct colour and marker per defense, so that a dozen lines or points stay distinguishable; assigned in
    sorted name order, so that a defense looks the same in every figure that shows the same defenses."""
    colours = plt.get_cmap("tab20").colors
    colours = colours[0::2] + colours[1::2]           # the ten strong shades first, then their light partners
    markers = "osD^vP*Xh<>p"
    return {d: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)]}
            for i, d in enumerate(sorted(set(defenses)))}


def accuracy_curves(rows: pd.DataFrame, attack: str, title: str, labels: Mapping[str, str] | None = None):
    """Robust accuracy against epsilon for one attack, one panel per threat model, one line per defense.

    Each line starts at epsilon 0 with the defense's clean accuracy.
    """
    data = rows[rows.attack == attack]
    threats = list(dict.fromkeys(data.threat))
    if not threats:
        raise ValueError(f"no rows for attack {attack!r}; attacks present: {sorted(set(rows.attack))}")
    styles = defense_styles(data.defense)
    fig, axes = plt.subplots(1, len(threats), figsize=(5.0 * len(threats) + 3.0, 4), sharey=True, squeeze=False)
    for ax, threat in zip(axes[0], threats):
        for defense, group in data[data.threat == threat].groupby("defense", sort=False):
            group = group.sort_values("eps")
            eps = [0.0, *group.eps]
            acc = [group.clean_acc.iloc[0], *group.robust_acc]
            ax.plot(eps, acc, label=(labels or {}).get(defense, defense), **styles[defense])
        ax.set(xlabel="epsilon (L-inf)", ylabel="robust accuracy (%)", title=f"{title}: {attack}, {threat} box",
               ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def clean_vs_robust(board: pd.DataFrame, title: str):
    """Scatter of clean against worst-case robust accuracy, one point per defense, named in the legend."""
    fig, ax = plt.subplots(figsize=(9, 5))
    names = board["name"] if "name" in board else board["defense"]
    styles = defense_styles(board.defense)
    for defense, name, cx, ry in zip(board.defense, names, board.clean_acc, board.worst_acc):
        ax.scatter(cx, ry, s=50, label=f"{name} ({cx:.0f}, {ry:.0f})", **styles[defense])
    ax.set(xlabel="clean accuracy (%)", ylabel="worst-case robust accuracy (%)", title=title,
           xlim=(-2, 102), ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="defense (clean, worst)")
    fig.tight_layout()
    return fig
