"""Every table and figure of notebook 05 (ARN, Zhou et al. 2021): ours beside the paper's, at the profile's scale.

`prepare(run, dataset)` (for `run.per_dataset`) loads the data and classifiers, crafts every attack set and trains
every purifier the profile asks for (all cached) into an `Experiment`; each producer below takes the run and an
experiment (or all of them), saves its table or figure under the run's results folder and returns it.
Error = 100 - accuracy over all test images (clean mistakes included), as the paper reports it. The paper's
numbers come from lib.reference (paper "arn") through `lib.reference.beside_paper`: where our dataset or
classifier is not the paper's, its column says so and there is no difference column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib import report
from lib.defenses.arn.defense import Purifier
from lib.defenses.arn.suite import (
    SEEN,
    arn_subset,
    attack_suite,
    budgets,
    craft,
    craft_seen,
)
from lib.defenses.arn.training import purifier_cfg, purifier_jobs, seen_attacks, trained_variant
from lib.defenses.base import Defended, Defense, NoDefense

if TYPE_CHECKING:
    import matplotlib.figure

    from lib.data import ImageData
    from lib.evaluate import AttackSpec
    from lib.notebook import Run

PIXEL = ["Clean", "PGD_N", "PGD_T", "CW_N", "DDN_N", "AA_N", "JSMA_T", "PGD_Nε'", "AA_Nε'"]   # Table 1's columns
SPATIAL = ["Clean", "STA_N", "STA_T"]                                                    # Table 2's columns
MAIN = ["None", "AT_PGD", "APE-G_PP", "HGD_PP", "Pixel-MSE_PP", "ARN_PP", "ARN_DP"]       # Tables 1-2's rows
ABLATIONS = ["ARN_PP", "ARN w/o L_adv", "ARN w/o L_nor", "ARN w/o L_att"]               # Fig. 4's bars
TABLE5 = ["PGD_N", "PGD_T", "CW_N", "DDN_N", "AA_N", "STA_N", "STA_T"]
HEADLINE = ["Clean", "PGD_N", "PGD_T", "CW_N", "DDN_N", "STA_N"]
# the paper's classifier per dataset, as our model zoo names it (advertorch's LeNet5 is our lenet5)
PAPER_MODELS = {"MNIST": "lenet5", "CIFAR-10": "resnet110"}
TABLE5_PAPER_MODELS = "resnet110, wrn-28-20, vgg19"   # Table 5's f and its two other classifiers
TABLE5_ROLES = {"WRN": "surrogate", "VGG": "transfer"}   # Table 5's other classifiers: our classifier role for each


@dataclass
class Experiment:
    """One dataset's inputs to every table: data, classifiers, attack sets, trained purifiers (all cached)."""

    dataset: str
    budgets: dict[str, Any]
    train: "ImageData"
    test: "ImageData"
    classifier: nn.Module
    others: dict[str, nn.Module]                         # Table 5's column (WRN, VGG) -> our classifier in it
    suite: dict[str, "AttackSpec"]
    adversarial: dict[str, torch.Tensor]                 # attack name -> test set crafted against the classifier
    models: dict[tuple[str, int], Purifier]              # (variant, seed) -> trained purifier
    at: nn.Module | None                                 # the profile's adversarially trained classifier
    classifier_rows: list[dict]
    attack_rows: list[dict]
    train_rows: list[dict]
    craft: Callable[..., tuple[torch.Tensor, float]]     # suite.craft with the run's seed, batch size and device
    batch_size: int
    seed0: int
    errors: pd.DataFrame | None = None                   # Tables 1-2's rows, set by `error_tables`
    seed_table: pd.DataFrame | None = None               # set by `seed_comparison`

    @property
    def n_classes(self) -> int:
        return self.train.info.num_classes

    @property
    def suffix(self) -> str:
        """The paper's classifier tag in Tables 3-4's keys: +L (LeNet, MNIST) or +R (ResNet, CIFAR-10)."""
        return "+L" if self.budgets["paper_dataset"] == "MNIST" else "+R"

    def model(self, variant: str) -> Purifier:
        """The purifier `variant` trained with the first seed."""
        return self.models[(variant, self.seed0)]


def _arch(profile: Mapping[str, Any], dataset: str, role: str) -> str:
    """Our classifier of `role` as the paper names models: arch[-depth][-widen factor] (wrn-28-20), and its width."""
    spec = profile["datasets"][dataset][role]
    width = spec.get("width", 1.0)
    name = "-".join(str(part) for part in (spec["arch"], spec.get("depth"), spec.get("widen_factor")) if part is not None)
    return name + (f" (width {width:g})" if width != 1.0 else "")


# --------------------------------------------------------------------------- setup

def record_skips(run: "Run") -> None:
    """Record what the notebook never reproduces, and the parts the profile switches off."""
    run.skip("dataset lisa (Table 2, LISA block: RP2 patches AP_1-AP_4)",
             "LISA traffic signs are not in lib.data and the RP2 patch definitions are in the paper's missing "
             "appendix; the paper's LISA numbers are not reproduced")
    run.skip("LID detection (§4.3), JSMA_T, FWA_N/FWA_Nε', DOA",
             "not implemented in lib (no JSMA/FWA attack, no DOA/ROA training, no LID detector); "
             "their rows show the paper's number only")
    switches = {"arn_dp": ("ARN_DP, APE-G_DP, HGD_DP", "DDN on the training subset"),
                "at_pgd": ("AT_PGD", "adversarial training of the classifier"),
                "ablations": ("Fig. 4 ablation", "the three ablated ARNs"),
                "table2b": ("Table 2b (ARN trained on PGD_N + STA_N)", "stAdv on the training subset")}
    for key, (what, why) in switches.items():
        if not run.config[key]:
            run.skip(what, f"disabled in profile {run.profile_name!r} ({why})")


def prepare(run: "Run", dataset: str) -> Experiment:
    """Data subsets, the target f and Table 5's other classifiers (those the profile has for the dataset; a missing
    one is recorded as a skip), every attack set (the seen ones on the training subset, the suite on the test
    subset, against f), every purifier of the section and AT_PGD: all cached."""
    from lib.defenses.base import NotBuiltForDataset
    from lib.train import trained_classifier

    profile, cfg, device = run.profile, run.config, run.device
    c = budgets(cfg, dataset)
    train, test = arn_subset(profile, dataset, "train"), arn_subset(profile, dataset, "test")
    clf, meta = trained_classifier(profile, dataset, "target", device=device)
    roles, others = [("target f", "classifier", meta)], {}
    for column, role in TABLE5_ROLES.items():
        try:
            others[column], other_meta = trained_classifier(profile, dataset, role, device=device)
        except NotBuiltForDataset as err:
            run.skip(f"Table 5's {column} column on {dataset}", str(err))
            continue
        roles.append((f"Table 5 {column} column", role, other_meta))
    classifier_rows = [{"dataset": dataset, "role": role, "arch": _arch(profile, dataset, key),
                        "test accuracy (%)": m["test_accuracy"], "from cache": m["cache_hit"],
                        "purifier train images": len(train), "test images": len(test)}
                       for role, key, m in roles]
    batch_size = profile["eval_batch_size"]

    def craft_here(spec: "AttackSpec", model: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        return craft(spec, model, x, y, train.info.num_classes, seed=profile["seed"], batch_size=batch_size,
                     device=device)

    suite = attack_suite(cfg, c)
    crafted = craft_seen(profile, dataset, clf, train, seen_attacks(cfg), device=device)
    train_adv = {name: x_adv for name, (x_adv, _) in crafted.items()}
    attack_rows = [{"dataset": dataset, "split": "train (seen)", "attack": name, "seconds": sec}
                   for name, (_, sec) in crafted.items()]
    adversarial = {"Clean": test.x}
    for name, spec in suite.items():
        adversarial[name], sec = craft_here(spec, clf, test.x, test.y)
        attack_rows.append({"dataset": dataset, "split": "test", "attack": name, "seconds": sec})

    models, train_rows = {}, []
    for name, seed in purifier_jobs(cfg):
        models[(name, seed)], m = trained_variant(cfg, name, seed, train.x, train_adv, clf, dataset=dataset,
                                                  device=device)
        train_rows.append({"dataset": dataset, "defense": name, "seed": seed, "epochs": m["epochs"],
                           "train seconds": m["train_seconds"], "from cache": m["cache_hit"],
                           "L_mse first epoch": m["first_mse"], "L_mse last epoch": m["final_mse"]})
    at = None
    if cfg["at_pgd"]:
        at, at_meta = trained_classifier(profile, dataset, "adversarial", device=device)
        train_rows.append({"dataset": dataset, "defense": "AT_PGD", "seed": None,
                           "train seconds": at_meta["train_seconds"], "from cache": at_meta["cache_hit"],
                           "AT eps": profile["datasets"][dataset]["adversarial"]["attack"]["eps"],
                           "table eps": c["eps"]})
    return Experiment(dataset, c, train, test, clf, others, suite, adversarial, models, at, classifier_rows,
                      attack_rows, train_rows, craft_here, batch_size, cfg["seeds"][0])


def loss_settings_table(run: "Run") -> pd.DataFrame:
    """The loss each purifier of the profile trains with: its preset (spec §2.3: paper_mnist, paper_cifar,
    official_code, tiny) after the section's weight overrides, read through the same PurifierConfig as training, so
    the notebook names the losses that ran (weights, reductions, D_A loss, gradient penalty)."""
    from dataclasses import asdict

    rows = []
    for section in ("arn", "ape", "hgd"):
        if section in run.config:
            weights = purifier_cfg(run.config, section, seed=0).weights
            rows.append({"purifier": section, "preset": run.config[section].get("preset", "tiny"), **asdict(weights)})
    return pd.DataFrame(rows)


def classifiers_table(run: "Run", experiments: Mapping[str, Experiment]) -> pd.DataFrame:
    """The target and Table 5's other classifiers of each dataset, with their test accuracy."""
    table = pd.DataFrame([r for e in experiments.values() for r in e.classifier_rows])
    report.save_table(table, "classifiers", run.out, caption="Classifiers (profile settings)")
    return table


def attack_seconds_table(run: "Run", experiments: Mapping[str, Experiment]) -> pd.DataFrame:
    """Seconds per crafted set (of the run that produced the cached set)."""
    table = pd.DataFrame([r for e in experiments.values() for r in e.attack_rows])
    report.save_table(table, "attack_seconds", run.out,
                      caption="Seconds per attack set (of the run that produced the cached set)")
    return table


def defenses_trained_table(run: "Run", experiments: Mapping[str, Experiment]) -> tuple[pd.DataFrame, str]:
    """The trained purifiers (epochs, seconds, L_mse) and AT_PGD, and a Markdown note for every dataset where
    AT_PGD was trained at a smaller eps than the tables attack at ('' when none)."""
    rows = [r for e in experiments.values() for r in e.train_rows]
    table = pd.DataFrame(rows)
    report.save_table(table, "defenses_trained", run.out,
                      caption="Trained purifiers (L_mse in [-1, 1] space, mean over pixels)")
    notes = [f"**{r['dataset']}: AT_PGD was trained at eps {r['AT eps']} (the profile's shared adversarially "
             f"trained classifier), the tables attack at eps {r['table eps']}**: its rows show how that model fares "
             "at the larger budget, not the paper's AT trained at the table's budget."
             for r in rows if r["defense"] == "AT_PGD" and r["AT eps"] < r["table eps"]]
    return table, "\n\n".join(notes)


# --------------------------------------------------------------------------- shared pieces of the tables

def error_rate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               batch_size: int = 500) -> float:
    """Error (%) over all examples, clean mistakes included (spec §3.6): 100 - accuracy."""
    from lib.evaluate import accuracy

    return 100.0 - accuracy(model, x, y, batch_size)


def error_rows(classifier: nn.Module, defenses: Mapping[str, Defense], adversarial: Mapping[str, torch.Tensor],
               y: torch.Tensor, batch_size: int = 500, **keys: Any) -> list[dict]:
    """One row per (defense, attack): error (%) of classifier(defense(x_adv)) on the true labels, plus `keys`."""
    rows = []
    for name, defense in defenses.items():
        model = Defended(classifier, defense).eval()
        for attack, x_adv in adversarial.items():
            rows.append({**keys, "defense": name, "attack": attack, "error": error_rate(model, x_adv, y, batch_size)})
    return rows


def mark_lowest(df: pd.DataFrame, value_col: str = "error", by: Sequence[str] = ("attack",),
                exclude: Sequence[str] = ("None",)) -> pd.Series:
    """True where `value_col` is lowest within each `by` group among defenses not in `exclude` (computed from data)."""
    keep = ~df["defense"].isin(list(exclude))
    best = pd.Series(False, index=df.index)
    best[keep] = report.mark_best(df[keep], value_col, higher_is_better=False, by=list(by))
    return best


def seen_or_unseen(defense: str, attack: str) -> str:
    """'seen' / 'unseen' for a purifier trained on PP (or DP for *_DP) attacks; '' for no purifier or clean data."""
    if defense in ("None", "AT_PGD") or attack == "Clean":
        return ""
    return "seen" if attack in SEEN["DP" if defense.endswith("_DP") else "PP"] else "unseen"


def beside_paper_rows(run: "Run", e: Experiment, ours: pd.DataFrame, table: str, *,
                      on: Sequence[str] = ("defense", "attack"), cross_model: bool = False) -> pd.DataFrame:
    """Our rows beside the paper's `table` rows (lib.reference.beside_paper), with a `status` column: 'both',
    'paper only (not reproduced)' or 'ours only (no paper number)'. The paper's setting is its dataset and
    classifier (Table 5, `cross_model`: CIFAR-10 with ResNet-110, WRN-28-20 and VGG-19); a different one of ours
    labels the paper column and drops the difference."""
    from lib.reference import beside_paper, load_reference

    paper_dataset = "CIFAR-10" if cross_model else e.budgets["paper_dataset"]
    reference = load_reference("arn", table)
    reference = reference[reference["dataset"] == paper_dataset]
    if cross_model:
        paper_model = TABLE5_PAPER_MODELS
        our_model = ", ".join(_arch(run.profile, e.dataset, role) for role in ("classifier", *TABLE5_ROLES.values())
                              if role in run.profile["datasets"][e.dataset])
    else:
        paper_model, our_model = PAPER_MODELS[paper_dataset], _arch(run.profile, e.dataset, "classifier")
    joined = beside_paper(ours, reference, list(on), value_col="error",
                          paper_setting={"dataset": paper_dataset, "model": paper_model},
                          ours_setting={"dataset": e.dataset, "model": our_model})
    paper_col = joined.columns[len(on) + 1]
    joined["status"] = np.where(joined["ours"].isna(), "paper only (not reproduced)",
                                np.where(joined[paper_col].isna(), "ours only (no paper number)", "both"))
    joined.insert(0, "dataset", e.dataset)
    return joined


# --------------------------------------------------------------------------- Tables 1-2, seeds, Figs. 1, 3, 4

def error_tables(run: "Run", e: Experiment) -> dict[str, pd.DataFrame]:
    """Tables 1 (pixel attacks) and 2 (spatial): error of every main defense against attacks crafted on the
    undefended f (AT_PGD: crafted on and classified by the adversarially trained model), with seen/unseen and the
    lowest error per attack marked. Returns, per table, our wide table and the long one beside the paper's."""
    defenses = {"None": NoDefense(), **{name: m for (name, seed), m in e.models.items()
                                        if name in MAIN and seed == e.seed0}}
    rows = error_rows(e.classifier, defenses, e.adversarial, e.test.y, e.batch_size, dataset=e.dataset)
    if e.at is not None:
        at_adv = {"Clean": e.test.x, **{name: e.craft(spec, e.at, e.test.x, e.test.y)[0]
                                        for name, spec in e.suite.items()}}
        rows += error_rows(e.at, {"AT_PGD": NoDefense()}, at_adv, e.test.y, e.batch_size, dataset=e.dataset)
    ours = pd.DataFrame(rows)
    ours["setting"] = [seen_or_unseen(d, a) for d, a in zip(ours["defense"], ours["attack"])]
    ours["best"] = mark_lowest(ours, exclude=("None",))
    e.errors = ours
    out: dict[str, pd.DataFrame] = {}
    for table, attacks in (("table1", PIXEL), ("table2", SPATIAL)):
        mine = ours[ours["attack"].isin(attacks)]
        joined = beside_paper_rows(run, e, mine, table)
        joined = joined.merge(mine[["defense", "attack", "setting", "best"]], on=["defense", "attack"], how="left")
        report.save_table(joined, f"{table}_{e.dataset}", run.out, caption=f"{table.title()}: error (%), ours on "
                          f"{e.dataset} beside the paper's {e.budgets['paper_dataset']}")
        wide = mine.pivot(index="defense", columns="attack", values="error")
        wide = wide.reindex(index=list(dict.fromkeys(d for d in MAIN + list(wide.index) if d in wide.index)),
                            columns=[a for a in attacks if a in wide.columns])
        out[f"{table.title()}, ours, error (%)"] = wide.round(2)
        out[f"{table.title()} beside the paper"] = joined
    return out


def _sign_of(differences: pd.Series, k: int) -> str:
    if (differences < 0).all():
        return f"ARN lower in all {k} seed(s)"
    return f"Pixel-MSE lower in all {k} seed(s)" if (differences > 0).all() else "mixed / tied"


def seed_comparison(run: "Run", e: Experiment) -> pd.DataFrame:
    """ARN_PP against the pixel-loss denoiser (same network, data, epochs and seeds; only L_att, L_nor, L_adv
    differ): mean and std of the error over seeds per attack, their difference and its sign in every seed."""
    seeds = run.config["seeds"]
    rows = []
    for seed in seeds:
        pair = {name: e.models[(name, seed)] for name in ("ARN_PP", "Pixel-MSE_PP")}
        rows += error_rows(e.classifier, pair, e.adversarial, e.test.y, e.batch_size, dataset=e.dataset, seed=seed)
    per_seed = pd.DataFrame(rows)
    stats = per_seed.groupby(["attack", "defense"], sort=False)["error"].agg(["mean", "std"]).unstack("defense")
    table = pd.DataFrame({
        "attack": stats.index,
        "setting": [seen_or_unseen("ARN_PP", a) for a in stats.index],
        "ARN mean": stats[("mean", "ARN_PP")].values, "ARN std": stats[("std", "ARN_PP")].values,
        "Pixel-MSE mean": stats[("mean", "Pixel-MSE_PP")].values,
        "Pixel-MSE std": stats[("std", "Pixel-MSE_PP")].values,
    })
    table["ARN - Pixel-MSE"] = table["ARN mean"] - table["Pixel-MSE mean"]
    diffs = per_seed.pivot_table(index=["attack", "seed"], columns="defense", values="error").reset_index()
    diffs["d"] = diffs["ARN_PP"] - diffs["Pixel-MSE_PP"]
    sign = {attack: _sign_of(d, len(seeds)) for attack, d in diffs.groupby("attack")["d"]}
    table["per-seed sign"] = table["attack"].map(sign)
    table.insert(0, "dataset", e.dataset)
    e.seed_table = table
    report.save_table(table, f"arn_vs_pixel_mse_{e.dataset}", run.out,
                      caption=f"ARN_PP vs the pixel-loss denoiser, error (%), seeds {seeds}, {e.dataset}")
    return table


def first_relu_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the model's first ReLU module (its first call) on x, on the CPU."""
    from lib.activations import layer_outputs

    first = next(name for name, m in model.named_modules() if isinstance(m, nn.ReLU))
    device = next(model.parameters()).device
    found: dict[str, torch.Tensor] = {}
    layer_outputs(model, x.to(device), [first], lambda name, out: found.setdefault(name, out))
    return found[first].cpu()


def figure1(run: "Run", e: Experiment) -> "matplotlib.figure.Figure":
    """Fig. 1: one test image, its adversarial versions (PGD_N, AA_N or PGD_Nε', STA_N), the channel-mean of f's
    first-ReLU features F(x~) and of the difference F(x~) - F(x) (colour scale per panel)."""
    import matplotlib.pyplot as plt

    from lib.viz import show_image

    shown = ["PGD_N", "AA_N" if "AA_N" in e.adversarial else "PGD_Nε'", "STA_N"]
    x0 = e.test.x[:1]
    f0 = first_relu_features(e.classifier, x0)
    fig, axes = plt.subplots(3, len(shown) + 1, figsize=(2.2 * (len(shown) + 1), 6.6), squeeze=False)
    show_image(axes[0, 0], x0[0], "natural x")
    axes[1, 0].imshow(f0[0].mean(0), cmap="viridis")
    axes[1, 0].set_title("F(x)", fontsize=8)
    axes[2, 0].axis("off")
    for j, a in enumerate(shown, start=1):
        xa = e.adversarial[a][:1]
        fa = first_relu_features(e.classifier, xa)
        show_image(axes[0, j], xa[0], a)
        axes[1, j].imshow(fa[0].mean(0), cmap="viridis")
        axes[1, j].set_title(f"F(x̃), {a}", fontsize=8)
        axes[2, j].imshow((fa - f0)[0].mean(0), cmap="coolwarm")
        axes[2, j].set_title(f"Δ(F, x̃, x), {a}", fontsize=8)
    for ax in axes[1:].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Fig. 1 analogue, {e.dataset}: first-ReLU features of f", fontsize=10)
    fig.tight_layout()
    report.save_figure(fig, f"fig1_attack_specific_features_{e.dataset}", run.out)
    return fig


def figure3(run: "Run", e: Experiment) -> "matplotlib.figure.Figure":
    """Fig. 3: the first test image under every attack (top) and its ARN_PP restoration (bottom), with f's
    prediction on each."""
    import matplotlib.pyplot as plt

    from lib.evaluate import predict
    from lib.viz import show_image

    attacks = [a for a in e.adversarial if a != "Clean"]
    x_row = torch.cat([e.adversarial[a][:1] for a in attacks])
    with torch.no_grad():
        restored = e.model("ARN_PP").purify(x_row.to(run.device)).cpu()
    pred_adv, pred_res = predict(e.classifier, x_row), predict(e.classifier, restored)
    fig, axes = plt.subplots(2, len(attacks), figsize=(1.6 * len(attacks), 3.8), squeeze=False)
    for j, a in enumerate(attacks):
        show_image(axes[0, j], x_row[j], f"{a} ({seen_or_unseen('ARN_PP', a)})\npred {int(pred_adv[j])}")
        show_image(axes[1, j], restored[j], f"pred {int(pred_res[j])}")
    axes[0, 0].set_ylabel("adversarial", fontsize=8)
    axes[1, 0].set_ylabel("ARN restored", fontsize=8)
    fig.suptitle(f"Fig. 3 analogue, {e.dataset}: true label {int(e.test.y[0])}", fontsize=10)
    fig.tight_layout()
    report.save_figure(fig, f"fig3_restorations_{e.dataset}", run.out)
    return fig


def figure4(run: "Run", e: Experiment) -> tuple["matplotlib.figure.Figure", pd.DataFrame] | None:
    """Fig. 4: accuracy (%) of ARN and of ARN without each of L_adv, L_nor, L_att (same seed, seen PGD_N + PGD_T)
    on every attack; None when the profile switches the ablations off."""
    if not run.config["ablations"]:
        return None
    import matplotlib.pyplot as plt

    rows = error_rows(e.classifier, {v: e.model(v) for v in ABLATIONS}, e.adversarial, e.test.y, e.batch_size,
                      dataset=e.dataset)
    ablation = pd.DataFrame(rows)
    ablation["accuracy"] = 100 - ablation["error"]
    report.save_table(ablation, f"fig4_ablation_{e.dataset}", run.out,
                      caption=f"Fig. 4 data: accuracy (%) of ARN variants, {e.dataset}")
    wide = ablation.pivot(index="attack", columns="defense", values="accuracy").reindex(
        index=list(e.adversarial), columns=ABLATIONS)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    wide.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Fig. 4 analogue, {e.dataset}: ablation (seen: PGD_N, PGD_T)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    report.save_figure(fig, f"fig4_ablation_{e.dataset}", run.out)
    return fig, wide.round(2)


# --------------------------------------------------------------------------- Tables 2b, 3, 4, 5

def table2b(run: "Run", e: Experiment) -> pd.DataFrame | None:
    """Table 2b: ARN trained on PGD_N + STA_N, beside ARN_PP's error on the same attack; None when off."""
    if not run.config["table2b"]:
        return None
    attacks = {a: e.adversarial[a] for a in ("STA_N", "STA_T", "PGD_N", "PGD_T")}
    ours = pd.DataFrame(error_rows(e.classifier, {"ARN": e.model("ARN (PGD_N+STA_N)")}, attacks, e.test.y,
                                   e.batch_size))
    joined = beside_paper_rows(run, e, ours, "table2b")
    arn_pp = e.errors.query("defense == 'ARN_PP'").set_index("attack")["error"]
    joined["ARN_PP (ours, same attack)"] = joined["attack"].map(arn_pp)
    report.save_table(joined, f"table2b_{e.dataset}", run.out,
                      caption=f"Table 2b: ARN seen on PGD_N + STA_N, error (%), {e.dataset}")
    return joined


def _subset(e: Experiment, size_key: str, run: "Run") -> tuple[int, torch.Tensor, torch.Tensor]:
    n = min(run.config[size_key], len(e.test))
    return n, e.test.x[:n], e.test.y[:n]


def _leaked_rows(e: Experiment, x_adv: torch.Tensor, y: torch.Tensor, known: str, deployed: Mapping[str, Defense],
                 white: str, **keys: Any) -> list[dict]:
    """Error of each deployed defense on one set crafted through the known one: white-box for the defense named
    `white` (the known one), gray-box for the others."""
    return [{**r, "model": known + e.suffix,
             "setting": "white-box adaptive" if r["defense"] == white else "gray-box adaptive", **keys}
            for r in error_rows(e.classifier, deployed, {"a": x_adv}, y, e.batch_size)]


def _adaptive_table(run: "Run", e: Experiment, rows: list[dict], table: str, keys: list[str], caption: str
                    ) -> pd.DataFrame:
    """Tables 3-4: our rows beside the paper's on `keys`, plus our iteration counts and the subset size n."""
    ours = pd.DataFrame(rows)
    joined = beside_paper_rows(run, e, ours, table, on=keys).merge(ours[[*keys, "iterations"]], on=keys, how="left")
    joined["n"] = min(run.config["adaptive_size"], len(e.test))
    report.save_table(joined, f"{table}_{e.dataset}", run.out, caption=caption)
    return joined


def table3(run: "Run", e: Experiment) -> pd.DataFrame:
    """Table 3, leaked defenses: white-box attacks through each known pre-processor and f (PGD_T at the two
    budgets; CW through APE-G and DDN through HGD, targeted and untargeted), and the same examples fed to ARN_PP
    (gray-box). The paper's iteration label is kept as the key; `iterations` gives ours."""
    from lib.attacks import attack_surface
    from lib.evaluate import AttackSpec

    cfg, c = run.config, e.budgets
    n, x, y = _subset(e, "adaptive_size", run)
    known = {"APE-G": e.model("APE-G_PP"), "HGD": e.model("HGD_PP"), "ARN": e.model("ARN_PP")}
    minimum_norm = {"APE-G": ("cw_l2", "CW", cfg["cw"], "APE"), "HGD": ("ddn", "DDN", cfg["ddn"], "HGD")}
    rows = []
    for name, defense in known.items():
        surface = attack_surface(e.classifier, defense)
        deployed = {name: defense, **({"ARN": known["ARN"]} if name != "ARN" else {})}
        for eps in c["eps_white"]:
            spec = AttackSpec("pgd", {"eps": eps, "alpha": c["alpha"], "steps": cfg["white_steps"], "targeted": True})
            x_adv, _ = e.craft(spec, surface, x, y)
            rows += _leaked_rows(e, x_adv, y, name, deployed, name, attack="PGD_T (ITE-40)", eps=f"{eps:g}",
                                 iterations=cfg["white_steps"])
        if name not in minimum_norm:
            continue
        attack, label, params, printed = minimum_norm[name]
        for targeted, tag in ((True, "TAR"), (False, "NON-TAR")):
            x_adv, _ = e.craft(AttackSpec(attack, {**params, "targeted": targeted}), surface, x, y)
            rows += _leaked_rows(e, x_adv, y, name, {printed: defense, "ARN": known["ARN"]}, printed,
                                 attack=f"{label} ({tag})", eps="", iterations=params["steps"])
    return _adaptive_table(run, e, rows, "table3", ["model", "defense", "setting", "attack", "eps"],
                           f"Table 3: leaked defenses, error (%), {e.dataset}, n={n}")


def table4(run: "Run", e: Experiment) -> pd.DataFrame:
    """Table 4: PGD_N through f(g(x)) with the identity as g's backward pass (BPDA, "P+B"), at the profile's two
    iteration counts (keys: the paper's ITE-40 / ITE-100; `iterations` gives ours)."""
    from lib.attacks import attack_surface
    from lib.evaluate import AttackSpec

    c = e.budgets
    n, x, y = _subset(e, "adaptive_size", run)
    rows = []
    for name, variant in (("APE-G", "APE-G_PP"), ("ARN", "ARN_PP")):
        defense = e.model(variant)
        for steps, paper_label in zip(run.config["bpda_steps"], ("P+B (ITE-40)", "P+B (ITE-100)")):
            spec = AttackSpec("pgd", {"eps": c["eps"], "alpha": c["alpha"], "steps": steps})
            x_adv, _ = e.craft(spec, attack_surface(e.classifier, defense, force_bpda=True), x, y)
            rows += [{**r, "model": name + e.suffix, "attack": paper_label, "iterations": steps}
                     for r in error_rows(e.classifier, {name: defense}, {"a": x_adv}, y, e.batch_size)]
    return _adaptive_table(run, e, rows, "table4", ["model", "defense", "attack"],
                           f"Table 4: BPDA + PGD_N, error (%), {e.dataset}, n={n}")


def table5(run: "Run", e: Experiment) -> pd.DataFrame:
    """Table 5: ARN_PP, trained only on examples crafted against f, unchanged in front of each other classifier
    and attacked through it (keys: our f <-> the paper's ResNet-110, our surrogate <-> its WRN-28-20, our transfer
    classifier <-> its VGG-19; a column without a classifier of ours is left to the paper)."""
    n, x, y = _subset(e, "transfer_size", run)
    rows = []
    for column, other in e.others.items():
        other_adv = {a: e.craft(e.suite[a], other, x, y)[0] for a in TABLE5 if a in e.suite}
        rows += [{**r, "model": column} for r in error_rows(other, {"None": NoDefense(), "ARN": e.model("ARN_PP")},
                                                             other_adv, y, e.batch_size)]
    on_target = e.errors.query("defense == 'ARN_PP' and attack in @TABLE5")
    rows += [{"defense": "ARN", "attack": a, "error": err, "model": "ResNet"}
             for a, err in zip(on_target["attack"], on_target["error"])]
    joined = beside_paper_rows(run, e, pd.DataFrame(rows), "table5", on=("model", "defense", "attack"),
                               cross_model=True)
    ours_name = {"ResNet": f"f ({_arch(run.profile, e.dataset, 'classifier')})",
                 **{column: f"{TABLE5_ROLES[column]} ({_arch(run.profile, e.dataset, TABLE5_ROLES[column])})"
                    for column in e.others}}
    joined["our classifier"] = joined["model"].map(ours_name).fillna("not reproduced")
    report.save_table(joined, f"table5_{e.dataset}", run.out,
                      caption=f"Table 5: cross-model ARN, error (%), ours on {e.dataset} (n={n} for the other "
                              "classifiers) beside the paper's CIFAR-10")
    return joined


# --------------------------------------------------------------------------- closing note

def _headline_wide(e: Experiment) -> pd.DataFrame:
    rows = ["None", "Pixel-MSE_PP", "ARN_PP"]
    pick = e.errors[e.errors["defense"].isin(rows) & e.errors["attack"].isin(HEADLINE)]
    return pick.pivot(index="defense", columns="attack", values="error").reindex(index=rows, columns=HEADLINE)


def headline(run: "Run", e: Experiment) -> pd.DataFrame:
    """Errors of no defense, the pixel-loss denoiser and ARN_PP on the seen and the main unseen attacks."""
    wide = _headline_wide(e)
    report.save_table(wide.reset_index(), f"headline_{e.dataset}", run.out,
                      caption=f"Headline errors (%), {e.dataset}, seed {e.seed0}")
    return wide


def closing_note(run: "Run", experiments: Mapping[str, Experiment]) -> str:
    """The closing note, generated from this run's numbers: per dataset, how often ARN's mean error is below the
    pixel-loss denoiser's on unseen attacks, whether in every seed, the seed spread, clean and seen-PGD errors."""
    seeds = run.config["seeds"]
    lines = []
    for ds, e in experiments.items():
        wide, t = _headline_wide(e), e.seed_table
        unseen = t[t["setting"] == "unseen"]
        wins = int((unseen["ARN - Pixel-MSE"] < 0).sum())
        consistent = int(unseen["per-seed sign"].str.startswith("ARN lower").sum())
        spread = float(np.nanmean(unseen[["ARN std", "Pixel-MSE std"]].to_numpy())) if len(seeds) > 1 else float("nan")
        deltas = ", ".join(f"{a} {d:+.2f}" for a, d in zip(unseen["attack"], unseen["ARN - Pixel-MSE"]))
        lines.append(
            f"- **{ds}**: with {len(seeds)} seed(s), ARN's mean error is lower than the pixel-loss denoiser's on "
            f"{wins} of {len(unseen)} unseen attacks ({deltas} points, ARN − pixel-MSE); lower in every seed on "
            f"{consistent}; mean per-attack seed std {spread:.2f} points (nan with one seed: then no claim about the "
            f"sign can be made). ARN's clean error {wide.loc['ARN_PP', 'Clean']:.2f} % vs "
            f"{wide.loc['None', 'Clean']:.2f} % undefended; under the seen PGD_N {wide.loc['ARN_PP', 'PGD_N']:.2f} % "
            f"vs {wide.loc['None', 'PGD_N']:.2f} %.")
    report.save_table(pd.DataFrame({"note": lines}), "closing_note", run.out,
                      caption="Closing note: ARN vs the pixel-loss denoiser on unseen attacks")
    return "\n".join(lines) if lines else "No dataset of this profile was available."
