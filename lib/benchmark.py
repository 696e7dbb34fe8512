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
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.data import load_dataset
from lib import report
from lib.defenses.base import Built, Defense, DefenseFactory
from lib.defenses.registry import LABELS, build_each
from lib.evaluate import AttackSpec, ensemble_accuracy, threat_outcomes
from lib.notebook import Run, setup
from lib.train import trained_classifier

ADAPTIVE_NOTES = {
    "full": "exact gradients through the defense",
    "BPDA": "BPDA (identity backward through non-differentiable steps): an approximation, so white-box "
            "accuracy is an upper bound",
    "BPDA-approx": "BPDA with the defense's own differentiable approximation (e.g. straight-through rounding, "
                   "exact gradients through its network, RegionSparse's projection onto the atoms OMP selected); "
                   "white-box accuracy is an upper bound. Identity BPDA is reported beside it as the threat "
                   "`white-identity`",
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
    defenses' costs, the dataset's budgets {norm: eps} (the leaderboards' threat models), the sanity table and the
    control (`control_table`: our adversarially trained classifier beside published ones)."""

    rows: pd.DataFrame
    examples: pd.DataFrame
    costs: pd.DataFrame
    budgets: dict[str, float]
    sanity: pd.DataFrame
    control: pd.DataFrame


def benchmark_dataset(run: Run, dataset: str, extra: Mapping[str, DefenseFactory] | None = None) -> DatasetBenchmark:
    """Notebook 09 on one dataset. Each defense of the profile section is built through the registry for the profile's
    target classifier; one that cannot be built (no settings for this dataset, a missing dataset) is recorded as
    skipped (lib.defenses.registry.build_each). `extra` {name: factory} adds defenses of one's own, built by the same
    factory signature (an error in one of them is raised, not skipped). The black box transfers from the profile's
    surrogate classifier. Every defense is then checked by lib.sanity.sanity_checks."""
    from lib.sanity import sanity_checks

    cfg, profile = run.config, run.profile
    test = load_dataset(dataset, "test", n=cfg["eval_size"], seed=profile["seed"])
    target, meta = trained_classifier(profile, dataset, "target", device=run.device)
    surrogate = trained_classifier(profile, dataset, "surrogate", device=run.device)[0] if "black" in cfg["threats"] else None
    defenses = build_each(cfg["defenses"], profile, dataset, target, skip=run.skip, device=run.device)
    defenses.update({name: factory(profile, dataset, target, device=run.device) for name, factory in (extra or {}).items()})
    print(f"{dataset}: classifier {meta['test_accuracy']:.1f}% clean; defenses {list(defenses)}")
    x, y = test.x.to(run.device), test.y.to(run.device)
    headline, curve = attack_plan(cfg, dataset)
    rows, examples = evaluate_defenses(defenses, target, x, y, headline + curve, threats=cfg["threats"],
                                       surrogate=surrogate, eot_samples=cfg["eot_samples"], device=run.device)
    budgets = {norm: float(eps) for norm, eps in cfg["budgets"][dataset].items()}
    sanity = sanity_checks(defenses, rows, x, y, budgets=budgets, settings=cfg["sanity"],
                           eot_samples=cfg["eot_samples"], device=run.device)
    control = control_table(rows, dataset, budgets, _trained_here(profile, dataset, "adversarial"))
    for table in (rows, examples, sanity):
        table.insert(0, "dataset", dataset)
    return DatasetBenchmark(rows, examples, defense_costs(defenses, target, x[:cfg["timing_images"]]), budgets, sanity,
                            control)


def _trained_here(profile: Mapping[str, Any], dataset: str, role: str) -> str:
    """'<arch> x<width>, PGD-trained at eps <eps>, <epochs> epochs here': the profile's classifier of `role`."""
    spec = profile["datasets"][dataset].get(role, {})
    eps = spec.get("attack", {}).get("eps")
    return (f"{spec.get('arch', '?')} x{spec.get('width', 1.0):g}, PGD-trained at eps {eps:g}, "
            f"{spec.get('epochs', '?')} epochs here" if eps is not None else f"{spec.get('arch', '?')} trained here")


CONTROL = "adv_training"
CONTROL_NOTE = ("The control (issue 15, item 6): our PGD adversarially trained classifier (`adv_training`) under our "
                "white-box attacks at the dataset's budget, beside published adversarially trained models under "
                "theirs. Model, training recipe and length, training-set size and AutoAttack's version differ, so this "
                "is a stand-in comparison, never agreement: it shows whether our attacks bring a PGD-trained model to "
                "the literature's order of accuracy. Ours far above the published figure would point to weak attacks "
                "(or a gradient problem); ours below it reflects our smaller model and shorter training.")


def control_table(rows: pd.DataFrame, dataset: str, budgets: Mapping[str, float], ours_model: str,
                  defense: str = CONTROL) -> pd.DataFrame:
    """Our adversarially trained classifier's white-box robust accuracy (`ours`, from the benchmark's `rows` at the
    dataset's budget of each norm) beside every published figure for an adversarially trained model on `dataset` in
    that norm (lib.reference.load_controls; its `ours_attack` names our attack it is set beside). The published column
    is labelled a stand-in by lib.reference.stand_in_label (published model and training against `ours_model`) and has
    no difference column, so the reproduction report never counts it as agreement. Beside it: each side's budget,
    attack and clean accuracy, and the source. Empty when nothing is published for the dataset or `defense` was not
    evaluated."""
    from lib.reference import load_controls, stand_in_label

    label = stand_in_label({"model": "published model and training"}, {"model": ours_model})
    published = load_controls()
    published = published[(published.dataset == dataset) & published.norm.isin(list(budgets))]
    ours = rows[(rows.defense == defense) & (rows.threat == "white")]
    out = []
    for r in published.itertuples() if len(ours) else ():
        mine = at_budget(ours, r.norm, budgets[r.norm])
        mine = mine[mine.attack == r.ours_attack]
        out.append({"dataset": dataset, "norm": r.norm, "eps": budgets[r.norm], "attack": r.ours_attack,
                    "ours": float(mine.robust_acc.iloc[0]) if len(mine) else np.nan,
                    label: r.value, "ours_clean": float(ours.clean_acc.iloc[0]), "published_clean": r.clean,
                    "published_eps": r.eps, "published_attack": r.attack, "published_model": r.model,
                    "published_training": r.training, "source": r.source})
    columns = ["dataset", "norm", "eps", "attack", "ours", label, "ours_clean", "published_clean", "published_eps",
               "published_attack", "published_model", "published_training", "source"]
    return pd.DataFrame(out, columns=columns)


def control_notes(control: pd.DataFrame, dataset: str) -> str:
    """Markdown under the control table: the caveat, or why there is no control for `dataset`."""
    if control.empty:
        return (f"No control on {dataset}: lib/reference/controls.csv has no published figure for an adversarially "
                f"trained model on it at the profile's norms, or `{CONTROL}` was not evaluated.")
    return CONTROL_NOTE


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


def leaderboards(res: DatasetBenchmark, labels: Mapping[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """{norm: leaderboard} of one dataset's results, one per fixed threat model (the dataset's budget in each norm)."""
    return {norm: leaderboard(res.rows, res.examples, res.costs, norm=norm, eps=eps, labels=labels)
            for norm, eps in res.budgets.items()}


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


# --------------------------------------------------------------------------- a defense of one's own

NOTEBOOK = "09_cross_defense_benchmark"
SUMMARY_COLUMNS = ("name", "threat_model", "clean_acc", "worst_acc", "worst_black", "worst_gray", "worst_white",
                   "worst_white-identity", "strongest_single", "white_box_gradient", "flags")


@dataclass
class DefenseEvaluation:
    """A defense of one's own evaluated as notebook 09 evaluates the registered ones (`evaluate_defense`): its
    `leaderboards` {norm: table} (beside the registered defenses asked for), every `rows` and `per_example` outcome,
    the `sanity` table and the folder `out` whose tables/ holds them all."""

    name: str
    dataset: str
    leaderboards: dict[str, pd.DataFrame]
    rows: pd.DataFrame
    per_example: pd.DataFrame
    sanity: pd.DataFrame
    out: Path

    def summary(self) -> str:
        """Markdown: each leaderboard's summary columns and notes, the sanity table and its notes, where the files are."""
        parts = []
        for board in self.leaderboards.values():
            columns = [c for c in board.columns if c in SUMMARY_COLUMNS]
            parts += [f"## {self.dataset}, {board.threat_model.iloc[0]}: leaderboard", report.to_markdown(board[columns]),
                      leaderboard_notes(board)]
        checks = self.sanity.pivot(index="defense", columns="check", values="status").reset_index()
        parts += ["## Sanity checks", report.to_markdown(checks), sanity_notes(self.sanity),
                  f"Every table (all attacks, per-example outcomes, sanity with explanations): {self.out / 'tables'}"]
        return "\n\n".join(p for p in parts if p)


def own_factory(defense: Any) -> DefenseFactory:
    """The factory of a defense of one's own: a `Defense` instance or subclass (instantiated without arguments), put in
    front of the given classifier, or a factory of the contract's signature `(profile, dataset, classifier, *, device)`
    returning a `Built` (or a `Defense`, put in front of the given classifier). TypeError for anything else."""
    if isinstance(defense, type) and issubclass(defense, Defense):
        defense = defense()
    if isinstance(defense, Defense):
        instance = defense
        defense = lambda profile, dataset, classifier, *, device=None: instance
    elif not callable(defense) or isinstance(defense, (type, nn.Module)):
        raise TypeError(f"defense must be a lib.defenses.base.Defense (instance or subclass) or a factory "
                        f"(profile, dataset, classifier, *, device) -> Built, got {defense!r}")

    def built_by(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
                 device: torch.device | None = None) -> Built:
        out = defense(profile, dataset, classifier, device=device)
        if isinstance(out, Defense):
            return Built(out, classifier, {"config": {"class": type(out).__name__}})
        if not isinstance(out, Built):
            raise TypeError(f"the defense factory {defense!r} returned {type(out).__name__}, not a Built or a Defense")
        return out

    return built_by


def evaluate_defense(defense: Any, *, profile: str = "smoke", dataset: str | None = None, name: str = "mine",
                     beside: Sequence[str] = ("none",), overrides: Mapping[str, Any] | None = None,
                     out: Path | str | None = None) -> DefenseEvaluation:
    """Evaluate a defense of one's own exactly as notebook 09 evaluates the registered ones, in one call.

    `defense`: a `Defense` instance or subclass, or a factory (see `own_factory`). It runs on `dataset` (default: the
    first of notebook 09's datasets in `profile`) under notebook 09's section of the profile (with dotted-key
    `overrides`, e.g. {"notebooks.09_cross_defense_benchmark.eval_size": 100}): every attack and threat model at the
    dataset's budgets, per-example outcomes, leaderboards per fixed threat model, sanity checks. `beside`: registered
    defenses (lib.defenses.registry) evaluated with it on the same images and attacks (() for none). Tables go to
    `out` (default results/<profile>/own_defenses/<name>/tables), named as notebook 09 names its own.
    """
    factory = own_factory(defense)
    if not name or not isinstance(name, str) or name in LABELS:
        raise ValueError(f"name must be a non-empty string other than a registered defense ({', '.join(LABELS)}), "
                         f"got {name!r}")
    if isinstance(beside, str) or set(beside) - set(LABELS):
        raise ValueError(f"beside must be a list of registered defenses ({', '.join(LABELS)}), got {beside!r}")
    folder = Path(out) if out is not None else report.results_root() / profile / "own_defenses" / name
    run = setup(profile, NOTEBOOK, overrides, out=folder)
    dataset = dataset or run.config["datasets"][0]
    if dataset not in run.profile["datasets"]:
        raise ValueError(f"profile {profile!r} has no settings for dataset {dataset!r}; it has "
                         f"{', '.join(run.profile['datasets'])}")
    run.config["defenses"] = list(beside)
    res = benchmark_dataset(run, dataset, {name: factory})
    boards = leaderboards(res, {**LABELS, name: name})
    for norm, board in boards.items():
        report.save_table(board, f"{dataset}_leaderboard_{norm}", run.out,
                          caption=f"{dataset}, {norm} budget {res.budgets[norm]:g}: ranked by per-example worst case (%)")
    report.save_table(res.rows, f"{dataset}_all_rows", run.out, caption=f"{dataset}: every defense, attack and threat")
    report.save_tidy(res.examples, f"{dataset}_per_example", run.out)
    report.save_table(res.sanity, f"{dataset}_sanity", run.out, caption=f"{dataset}: sanity checks per defense")
    return DefenseEvaluation(name, dataset, boards, res.rows, res.examples, res.sanity, run.out)


def load_defense(spec: str) -> Any:
    """The object `Name` of `path/to/file.py:Name` or `package.module:Name` (a Defense subclass, instance or factory)."""
    import importlib.util
    from importlib import import_module

    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"--defense must be 'path/to/file.py:Name' or 'package.module:Name', got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"defense file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = import_module(where)
    if not hasattr(module, attr):
        raise ValueError(f"{where} defines no {attr!r}")
    return getattr(module, attr)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m lib.benchmark --defense FILE.py:Name [--profile smoke] [--dataset digits] [--name mine]
    [--beside none,jpeg]`: evaluate_defense, its summary printed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lib.benchmark", description=evaluate_defense.__doc__.split("\n")[0])
    parser.add_argument("--defense", required=True, help="path/to/file.py:Name or package.module:Name")
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--dataset", default=None, help="default: the first of notebook 09's datasets in the profile")
    parser.add_argument("--name", default=None, help="its name in the tables (default: Name in lower case)")
    parser.add_argument("--beside", default="none", help="comma-separated registered defenses to rank it beside ('' for none)")
    parser.add_argument("--out", default=None, help="results folder (default results/<profile>/own_defenses/<name>)")
    args = parser.parse_args(argv)
    try:
        defense = load_defense(args.defense)
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.error(str(err))
    beside = [b for b in args.beside.split(",") if b]
    result = evaluate_defense(defense, profile=args.profile, dataset=args.dataset, beside=beside, out=args.out,
                              name=args.name or args.defense.rpartition(":")[2].lower())
    print(result.summary())


if __name__ == "__main__":
    main()
