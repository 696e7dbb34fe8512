"""Cross-defense benchmark: every defense under the same attacks, summarised as a leaderboard.

Every defense comes from `lib.defenses.registry.build` as a `Built` and is evaluated as the defended model
`built.classifier(built.defense.purify(x))` (lib.evaluate.threat_outcomes, one call per classifier the defenses sit
in front of). Black box: transferred from the profile's independently trained surrogate. Gray box: adversarial
examples crafted on the profile's undefended target classifier, also for the defenses with their own classifier
(SFM's fine-tuned one, the adversarially trained one, IDFR's feature-restored one), whose gray box is thus a transfer
from the target. White box: through the whole defended model. Attacks run at each dataset's budgets (profile
`budgets`); a leaderboard per fixed threat model (norm and budget) ranks defenses by the per-example worst case over
every attack and threat. This module adds costs (purification time, training time, parameters) and the two figures
(accuracy against epsilon, clean against robust accuracy); lib.sanity checks each evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.data import load_dataset
from lib.defenses.base import Built
from lib.defenses.registry import build_each
from lib.evaluate import AttackSpec, ensemble_accuracy, threat_outcomes
from lib.notebook import Run
from lib.train import trained_classifier

ADAPTIVE_NOTES = {
    "full": "exact gradients through the defense",
    "BPDA": "BPDA (identity backward through non-differentiable steps): an approximation, so white-box "
            "accuracy is an upper bound",
    "BPDA-approx": "BPDA with the defense's own differentiable approximation (e.g. straight-through rounding, "
                   "exact gradients through its network); white-box accuracy is an upper bound. Identity BPDA is "
                   "reported beside it as the threat `white-identity`",
}


def evaluate_defenses(defenses: Mapping[str, Built], target: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      attacks: Sequence[AttackSpec], *, threats: Sequence[str] = ("gray", "white"),
                      surrogate: nn.Module | None = None, eot_samples: int = 1, batch_size: int = 256,
                      device: torch.device | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """threat_outcomes' (rows, examples) for every built defense: defenses sharing a classifier are evaluated together,
    and a defense whose classifier is not `target` is attacked in the gray box through `target` (a transfer)."""
    groups: dict[int, list[str]] = {}
    for name, built in defenses.items():
        groups.setdefault(id(built.classifier), []).append(name)
    rows, examples = [], []
    for names in groups.values():
        classifier = defenses[names[0]].classifier
        gray = None if classifier is target else {name: target for name in names}
        r, e = threat_outcomes(classifier, {name: defenses[name].defense for name in names}, x, y, attacks,
                               threats=threats, surrogate=surrogate, gray_box_models=gray, eot_samples=eot_samples,
                               batch_size=batch_size, device=device)
        rows.append(r)
        examples.append(e)
    return pd.concat(rows, ignore_index=True), pd.concat(examples, ignore_index=True)


MINIMAL_NORM = ("cw_l2", "deepfool", "ddn")   # no eps parameter: a success counts only within the L2 budget


def attack_plan(cfg: Mapping[str, Any], dataset: str) -> tuple[list[AttackSpec], list[AttackSpec]]:
    """(headline attacks, curve attacks) of notebook 09's profile section `cfg` for `dataset`.

    Each entry of `attacks` names its threat model's norm (`linf` or `l2`) and runs at the dataset's budget for it
    (`budgets[dataset]`); a minimal-norm attack counts within the L2 budget. The curve runs the `curve_attacks`
    (labels of headline attacks) at each of `curve_factors` times their budget.
    """
    if dataset not in cfg["budgets"]:
        raise ValueError(f"notebook 09 has no budgets for {dataset!r}; budgets are set for {sorted(cfg['budgets'])}")
    budgets = cfg["budgets"][dataset]

    def at(entry: Mapping[str, Any], eps: float) -> AttackSpec:
        params = dict(entry.get("params", {}))
        if entry["name"] in MINIMAL_NORM:
            spec = AttackSpec(entry["name"], params, entry.get("label"), l2_budget=eps)
        else:
            spec = AttackSpec(entry["name"], {**params, "eps": eps}, entry.get("label"))
        if spec.norm != entry["norm"]:
            raise ValueError(f"attack {spec.title!r} is declared {entry['norm']!r} but its parameters make it "
                             f"{spec.norm!r} (set params.norm for pgd / autoattack in L2)")
        return spec

    headline = [at(e, float(budgets[e["norm"]])) for e in cfg["attacks"]]
    by_label = {e.get("label", e["name"]): e for e in cfg["attacks"]}
    unknown = set(cfg["curve_attacks"]) - set(by_label)
    if unknown:
        raise ValueError(f"curve_attacks {sorted(unknown)} are not labels of the headline attacks {sorted(by_label)}")
    curve = [at(by_label[label], f * float(budgets[by_label[label]["norm"]]))
             for label in cfg["curve_attacks"] for f in cfg["curve_factors"]]
    return headline, curve


@dataclass
class DatasetBenchmark:
    """Notebook 09's results on one dataset: every row and per-example outcome (with a dataset column), the
    defenses' costs, the dataset's budgets {norm: eps} (the leaderboards' threat models) and the sanity table."""

    rows: pd.DataFrame
    examples: pd.DataFrame
    costs: pd.DataFrame
    budgets: dict[str, float]
    sanity: pd.DataFrame


def benchmark_dataset(run: Run, dataset: str) -> DatasetBenchmark:
    """Notebook 09 on one dataset. Each defense of the profile section is built through the registry for the profile's
    target classifier; one that cannot be built (no settings for this dataset, a missing dataset) is recorded as
    skipped (lib.defenses.registry.build_each). The black box transfers from the profile's surrogate classifier.
    Every defense is then checked by lib.sanity.sanity_checks."""
    from lib.sanity import sanity_checks

    cfg, profile = run.config, run.profile
    test = load_dataset(dataset, "test", n=cfg["eval_size"], seed=profile["seed"])
    target, meta = trained_classifier(profile, dataset, "target", device=run.device)
    surrogate = trained_classifier(profile, dataset, "surrogate", device=run.device)[0] if "black" in cfg["threats"] else None
    defenses = build_each(cfg["defenses"], profile, dataset, target, skip=run.skip, device=run.device)
    print(f"{dataset}: classifier {meta['test_accuracy']:.1f}% clean; defenses {list(defenses)}")
    x, y = test.x.to(run.device), test.y.to(run.device)
    headline, curve = attack_plan(cfg, dataset)
    rows, examples = evaluate_defenses(defenses, target, x, y, headline + curve, threats=cfg["threats"],
                                       surrogate=surrogate, eot_samples=cfg["eot_samples"], device=run.device)
    budgets = {norm: float(eps) for norm, eps in cfg["budgets"][dataset].items()}
    sanity = sanity_checks(defenses, rows, x, y, budgets=budgets, settings=cfg["sanity"],
                           eot_samples=cfg["eot_samples"], device=run.device)
    for table in (rows, examples, sanity):
        table.insert(0, "dataset", dataset)
    return DatasetBenchmark(rows, examples, defense_costs(defenses, target, x[:cfg["timing_images"]]), budgets, sanity)


def at_budget(table: pd.DataFrame, norm: str, eps: float) -> pd.DataFrame:
    """The rows (or per-example outcomes) of one fixed threat model: attacks in `norm` at budget `eps`."""
    return table[(table["norm"] == norm) & np.isclose(table["eps"].astype(float), eps)]


def at_budgets(table: pd.DataFrame, budgets: Mapping[str, float]) -> pd.DataFrame:
    """The rows (or per-example outcomes) at any of the dataset's `budgets` {norm: eps} (the curve's others left out)."""
    return pd.concat([at_budget(table, norm, eps) for norm, eps in budgets.items()])


def sanity_notes(sanity: pd.DataFrame) -> str:
    """Markdown under the sanity table: every WARN with what was measured and what it means, or that all passed."""
    warned = sanity[sanity.status == "WARN"]
    if warned.empty:
        return f"All {int((sanity.status == 'PASS').sum())} applicable checks PASS."
    return "\n".join(f"* **WARN** {r.defense}, {r.check}: {r.measured}. {r.explanation[0].upper()}{r.explanation[1:]}."
                      for r in warned.itertuples())


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


def leaderboard(rows: pd.DataFrame, examples: pd.DataFrame, costs: pd.DataFrame, *, norm: str, eps: float,
                labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One line per defense for one fixed threat model (`norm`, budget `eps`), ranked by `worst_acc`: the share of
    test images that survived every attack of that threat model under every threat (transfer, gray and white box),
    the per-example worst case. Beside it: each threat's ensemble accuracy (`worst_<threat>`), the strongest single
    attack, every attack's own accuracy (`<threat>: <attack>`), the white-box gradient route, AutoAttack's flags
    and the costs."""
    rows, examples = at_budget(rows, norm, eps), at_budget(examples, norm, eps)
    if rows.empty:
        raise ValueError(f"no attacks at {norm} budget {eps}; budgets present: "
                         f"{sorted(set(zip(rows.norm, rows.eps)))}")
    table = pd.DataFrame({"clean_acc": rows.groupby("defense")["clean_acc"].first()})
    table["worst_acc"] = ensemble_accuracy(examples, ("defense",))
    table = table.join(ensemble_accuracy(examples, ("defense", "threat")).unstack("threat").add_prefix("worst_"))
    single = rows.loc[rows.groupby("defense")["robust_acc"].idxmin()].set_index("defense")
    table["strongest_single"] = single["attack"] + " (" + single["threat"] + "): " + single["robust_acc"].round(1).astype(str)
    table["white_box_gradient"] = rows[rows.threat == "white"].groupby("defense")["gradient"].first()
    flags = rows[rows["flags"].astype(bool)].groupby("defense")["flags"].agg(lambda f: "; ".join(dict.fromkeys(f)))
    table["flags"] = flags.reindex(table.index).fillna("")
    per_attack = rows.pivot_table(index="defense", columns=["threat", "attack"], values="robust_acc", sort=False)
    per_attack.columns = [f"{threat}: {attack}" for threat, attack in per_attack.columns]
    table = table.join(per_attack).join(costs.set_index("defense"))
    table = table.sort_values(["worst_acc", "clean_acc"], ascending=False).reset_index()
    table.insert(1, "threat_model", f"{norm} {eps:g}")
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
    names = board["name"] if "name" in board else board["defense"]
    if {"worst_white", "worst_gray"} <= set(board.columns):
        masked = names[board.worst_white > board.worst_gray]
        if len(masked):
            lines.append("\nAdaptive attacks found fewer errors than transfer from the bare classifier against "
                         + ", ".join(masked) + ": a sign of obfuscated gradients (Athalye et al. 2018). "
                         "The worst case above already counts the gray-box errors for them.")
    flagged = names[board["flags"].astype(bool)]
    if len(flagged):
        lines.append("\nAutoAttack's own checks failed for " + ", ".join(flagged) + " (the `flags` column).")
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
        norms = sorted(set(data.norm.dropna())) if "norm" in data else ["linf"]
        ax.set(xlabel=f"epsilon ({', '.join(norms)})", ylabel="robust accuracy (%)", title=f"{title}: {attack}, {threat} box",
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
