"""Cross-defense benchmark: every defense under the same attacks, summarised as a leaderboard.

The rows come from lib.evaluate.evaluate_threats; this module adds costs (purification time, training
time, parameters), the worst case over attacks, and the two figures (accuracy against epsilon, clean
against robust accuracy).
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from lib.defenses.base import Defense

ADAPTIVE_NOTES = {
    "full": "exact gradients through the defense",
    "BPDA": "BPDA (identity backward through non-differentiable steps): an approximation, so white-box "
            "accuracy is an upper bound",
    "BPDA-approx": "BPDA with the defense's own differentiable approximation (e.g. straight-through rounding, "
                   "exact gradients through its network); white-box accuracy is an upper bound",
}


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


def purification_ms(defense: Defense, x: torch.Tensor, batch_size: int = 256) -> float:
    """Wall-clock milliseconds per image of defense.purify on x (after one warm-up batch)."""
    return _ms_per_image(defense.purify, x, batch_size)


def defense_costs(defenses: Mapping[str, Defense], x: torch.Tensor, batch_size: int = 256) -> pd.DataFrame:
    """Per defense: purification ms per image, learned parameters, and training seconds (0 if nothing is learned).

    Training seconds come from the defense's `train_seconds` attribute, which the registry sets from the
    cache metadata of the run that trained it (a cached defense reports its original training time).
    """
    rows = []
    for name, defense in defenses.items():
        rows.append({"defense": name, "purify_ms_per_image": purification_ms(defense, x, batch_size),
                     "parameters": sum(p.numel() for p in defense.parameters()),
                     "train_seconds": float(getattr(defense, "train_seconds", 0.0))})
    return pd.DataFrame(rows)


@torch.no_grad()
def model_costs(name: str, model: nn.Module, classifier: nn.Module, x: torch.Tensor, train_seconds: float,
                batch_size: int = 256) -> dict:
    """defense_costs' row for a defense that replaces the classifier: its extra milliseconds per image over the
    bare classifier's forward pass, and its parameters beyond the classifier's (0 for a retrained classifier)."""
    own = {id(p) for p in classifier.parameters()}
    extra = sum(p.numel() for p in model.parameters() if id(p) not in own)
    shares_classifier = any(id(p) in own for p in model.parameters())
    extra_ms = _ms_per_image(model, x, batch_size) - _ms_per_image(classifier, x, batch_size)
    return {"defense": name, "purify_ms_per_image": max(extra_ms, 0.0),
            "parameters": extra if shares_classifier else 0, "train_seconds": float(train_seconds)}


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
