"""Restoration figures and the interactive explorer (ipywidgets) for every registered defense.

The explorer lets one choose a dataset, an image (index or random), an attack, its epsilon and a defense, and shows
the clean image, the adversarial image, the perturbation magnified, the defense's intermediate images, the purified
image, and the top predictions of the classifier on the clean and adversarial inputs and of the defended model
(`Built.classifier`, SFM's own or the adversarially trained one where the defense has its own) on the purified input.
It retrains nothing: classifiers (lib.train.trained_classifier), adversarial examples (lib.evaluate.adversarial_set)
and defenses (lib.defenses.registry.build) come from the caches (computed once on a cold cache), each loaded at most
once per session and kept in memory.

Only the defense contract is used: `Defense.stages(x)` gives the intermediate images, and the stage named "mask" is
the defense's mask (shown in its own column, its mean reported).
"""
from __future__ import annotations

import html
import io
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from lib import data
from lib.defenses.base import Built, Defense
from lib.defenses.registry import LABELS, build, defense_names
from lib.evaluate import AttackSpec, adversarial_set, attack_specs, in_batches
from lib.profiles import load_profile, notebook_config
from lib.runtime import get_device
from lib.train import trained_classifier
from lib.viz import perturbation_image, show_image

if TYPE_CHECKING:
    from lib.cases import Case

# one style for every figure of the visualisation notebooks
STYLE: dict[str, Any] = {"panel": 1.55, "title_size": 10, "label_size": 8, "heat_cmap": "jet", "act_cmap": "viridis",
                         "bar_colors": {"clean": "tab:green", "adversarial": "tab:red", "purified": "tab:blue"}}
EXPLORER_NOTEBOOK = "08_masks_and_restorations"


def figure_title(what: str, dataset: str, attack: str, eps: float | None) -> str:
    """'what - dataset, attack, eps=...' (eps 'n/a' for minimum-norm attacks without a budget)."""
    budget = "n/a" if eps is None else f"{eps:g}"
    return f"{what} — {dataset}, {attack}, ε={budget}"


# --------------------------------------------------------------------------- the contract's stages

MASK = "mask"   # the stage that is the defense's mask


@torch.no_grad()
def stages_and_mask(defense: Defense, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The defense's intermediate images on `x` (`Defense.stages`) without its mask, and the mask (None when the
    defense has no stage named "mask")."""
    stages = dict(defense.stages(x))
    return stages, stages.pop(MASK, None)


@torch.no_grad()
def top_predictions(classifier: nn.Module, x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and classes of the top-k predictions, each (N, k), on the CPU."""
    probs = torch.softmax(classifier(x), dim=1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return top.values.cpu(), top.indices.cpu()


# --------------------------------------------------------------------------- figures

def _image_column(ax, img: torch.Tensor, title: str, xlabel: str = "") -> None:
    show_image(ax, img.cpu())
    ax.set_title(title, fontsize=STYLE["label_size"])
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=STYLE["label_size"] - 1)


def restoration_figure(clean: torch.Tensor, adversarial: torch.Tensor, purified: torch.Tensor, *,
                       stages: Mapping[str, torch.Tensor] | None = None, mask: torch.Tensor | None = None,
                       row_labels: Sequence[str] | None = None, dataset: str, attack: str, eps: float | None,
                       defense: str):
    """One row per example: clean | adversarial | perturbation magnified | intermediate stages | mask | purified |
    residual (purified - clean) magnified. Magnified images map 0 to grey and the largest |difference| to black/white;
    the largest |difference| is printed under each."""
    stages = dict(stages or {})
    n = len(clean)
    columns = ["clean", "adversarial", "perturbation", *stages, *(["mask"] if mask is not None else []),
               "purified", "residual"]
    fig, axes = plt.subplots(n, len(columns), squeeze=False,
                             figsize=(STYLE["panel"] * len(columns), STYLE["panel"] * n + 0.7))
    delta, residual = perturbation_image(clean, adversarial), perturbation_image(clean, purified)
    delta_max = (adversarial - clean).flatten(1).abs().amax(1)
    residual_max = (purified - clean).flatten(1).abs().amax(1)
    for i in range(n):
        panels = [(clean[i], ""), (adversarial[i], ""), (delta[i], f"max |δ| {delta_max[i]:.3f}"),
                  *[(s[i], "") for s in stages.values()],
                  *([(mask[i], f"mean {mask[i].mean():.2f}")] if mask is not None else []),
                  (purified[i], ""), (residual[i], f"max |r| {residual_max[i]:.3f}")]
        for j, (img, xlabel) in enumerate(panels):
            _image_column(axes[i, j], img, columns[j] if i == 0 else "", xlabel)
        if row_labels:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=STYLE["label_size"])
    fig.suptitle(figure_title(f"{defense}: purification", dataset, attack, eps), fontsize=STYLE["title_size"])
    fig.tight_layout()
    return fig


def restoration_case(case: "Case", spec: AttackSpec, *, examples: int = 3
                     ) -> tuple[pd.DataFrame, dict[str, plt.Figure]]:
    """Notebook 08 on one case and gray-box attack: (per defense: the accuracy on the adversarial input of the target
    classifier and on the purified input of the defense's own classifier, L2 distances to the clean input, the mean
    mask value where the defense has a mask stage; {figure name: gallery of the first `examples` images})."""
    x, x_adv, k = case.x, case.adversarial(spec), examples
    adversarial_accuracy = case.accuracy(x_adv)
    row_labels = [f"true {case.class_names[int(c)]}" for c in case.y[:k]]
    rows, figures = [], {}
    for name, built in case.defenses.items():
        purified = in_batches(built.defense.purify, x_adv, batch_size=case.batch_size, device=case.device)
        stages, mask = stages_and_mask(built.defense, x_adv[:k])
        mask_mean = None if mask is None else float(in_batches(
            lambda xb: stages_and_mask(built.defense, xb)[1], x_adv, batch_size=case.batch_size).mean())
        rows.append({"dataset": case.dataset, "attack": spec.title, "eps": spec.eps, "defense": case.label(name),
                     "accuracy adversarial (%)": adversarial_accuracy,
                     "accuracy purified (%)": case.accuracy(purified, name),
                     "L2 adversarial-clean": float((x_adv - x).flatten(1).norm(dim=1).mean()),
                     "L2 purified-clean": float((purified - x.cpu()).flatten(1).norm(dim=1).mean()),
                     "mask mean": mask_mean, "n": len(x)})
        figures[f"restoration_{case.dataset}_{spec.name}_{name}"] = restoration_figure(
            x[:k].cpu(), x_adv[:k].cpu(), purified[:k], stages={s: t.cpu() for s, t in stages.items()},
            mask=None if mask is None else mask.cpu(), row_labels=row_labels, dataset=case.dataset,
            attack=spec.title, eps=spec.eps, defense=case.label(name))
    return pd.DataFrame(rows), figures


def _bars(ax, probs: torch.Tensor, classes: torch.Tensor, names: Sequence[str], kind: str) -> None:
    labels = [names[int(c)] for c in classes]
    ax.barh(range(len(labels))[::-1], probs.numpy(), color=STYLE["bar_colors"][kind])
    ax.set_yticks(range(len(labels))[::-1], labels, fontsize=STYLE["label_size"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=STYLE["label_size"])
    ax.set_title(f"{kind}: top-{len(labels)}", fontsize=STYLE["label_size"])


def explorer_figure(view: Mapping[str, Any]):
    """The explorer's picture of one example: images on top, the classifier's top predictions as bars below."""
    images = [("clean", view["clean"]), ("adversarial", view["adversarial"]),
              ("perturbation ×", perturbation_image(view["clean"], view["adversarial"]))]
    images += list(view["stages"].items())
    if view["mask"] is not None:
        images.append(("mask", view["mask"]))
    images.append(("purified", view["purified"]))
    fig = plt.figure(figsize=(max(STYLE["panel"] * len(images), 6.5), 2 * STYLE["panel"] + 1.2))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.15, 1])
    top, bottom = outer[0].subgridspec(1, len(images)), outer[1].subgridspec(1, 3, wspace=0.6)
    names = view["class_names"]
    for j, (title, img) in enumerate(images):
        ax = fig.add_subplot(top[0, j])
        _image_column(ax, img[0], title)
        if j == 0:
            ax.set_ylabel(f"true: {names[view['label']]}", fontsize=STYLE["label_size"])
    for b, kind in enumerate(("clean", "adversarial", "purified")):
        probs, classes = view["top"][kind]
        _bars(fig.add_subplot(bottom[0, b]), probs[0], classes[0], names, kind)
    what = f"image {view['index']}, {view['defense']}"
    fig.suptitle(figure_title(what, view["dataset"], view["attack"], view["eps"]), fontsize=STYLE["title_size"])
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the explorer

class Explorer:
    """ipywidgets explorer of attacks and defenses; display it in a notebook, or drive `select` / the controls.

    Controls: `dataset`, `index`, `random_button`, `attack`, `eps`, `defense`; outputs: `image` (PNG of
    `explorer_figure`), `message` (why a choice was refused; `refused` has it as plain text). `view` holds the tensors
    and predictions shown; `loads` counts classifier loads, defense builds and attack runs (each happens once per
    choice per session). Settings come from the profile's `notebooks.08_masks_and_restorations.explorer` section
    unless given here.
    """

    def __init__(self, profile: str | Mapping[str, Any] = "quick", *, datasets: Sequence[str] | None = None,
                 attacks: Sequence[Mapping[str, Any]] | None = None, eps: Mapping[str, Sequence[float]] | None = None,
                 defenses: Sequence[str] | None = None, pool_size: int | None = None, top_k: int | None = None,
                 device: torch.device | None = None):
        self.profile = load_profile(profile) if isinstance(profile, str) else dict(profile)
        cfg = notebook_config(self.profile, EXPLORER_NOTEBOOK).get("explorer", {})
        given = {"datasets": datasets, "attacks": attacks, "eps": eps}
        needed = [k for k, v in given.items() if not v and k not in cfg]
        if needed:
            raise ValueError(f"profile {self.profile['name']!r} has no notebooks.{EXPLORER_NOTEBOOK}.explorer "
                             f"setting(s) {needed}; pass them to Explorer or add them to the profile")
        self.datasets = list(datasets or cfg["datasets"])
        self.specs: dict[str, AttackSpec] = {s.title: s for s in attack_specs(attacks or cfg["attacks"])}
        self.eps_grid = {k: [float(e) for e in v] for k, v in (eps or cfg["eps"]).items()}
        self.defense_list = list(defenses or cfg.get("defenses") or defense_names())
        self.pool_size = int(pool_size or cfg.get("pool_size", 100))
        self.top_k = int(top_k or cfg.get("top_k", 3))
        self.device = device or get_device()
        self._rng = np.random.default_rng(self.profile.get("seed", 0))
        self._classifiers: dict[str, nn.Module] = {}
        self._pools: dict[str, data.ImageData] = {}
        self._defenses: dict[tuple[str, str], Built] = {}
        self._adversarial: dict[tuple, torch.Tensor] = {}
        self.loads = {"classifier": 0, "defense": 0, "attack": 0}
        self.view: dict[str, Any] = {}
        self.refused = ""                      # the last refusal as plain text ("" when the view is current)
        self._hold = False

        self.dataset = widgets.Dropdown(options=self.datasets, value=self.datasets[0], description="dataset")
        self.index = widgets.IntText(value=0, description="image")
        self.random_button = widgets.Button(description="random image", icon="random")
        self.attack = widgets.Dropdown(options=list(self.specs), description="attack")
        self.eps = widgets.Dropdown(options=[], description="epsilon")
        self.defense = widgets.Dropdown(options=[(LABELS.get(n, n), n) for n in self.defense_list],
                                        value=self.defense_list[0], description="defense")
        self.message = widgets.HTML(value="")
        self.image = widgets.Image(format="png")
        self.widget = widgets.VBox([
            widgets.HBox([self.dataset, self.attack, self.eps]),
            widgets.HBox([self.defense, self.index, self.random_button]),
            self.message, self.image])
        self.widget.add_class("adv-explorer")
        self.image.add_class("adv-explorer-image")
        self.message.add_class("adv-explorer-message")
        self._set_eps_options()
        for control in (self.dataset, self.index, self.attack, self.eps, self.defense):
            control.observe(self._on_change, names="value")
        self.random_button.on_click(lambda _button: self.random_image())
        self.refresh()

    # ---- display and driving
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def select(self, **choices: Any) -> bool:
        """Set several controls at once (dataset, index, attack, eps, defense), then refresh once.

        An unknown name or value is refused with a message in the widget; nothing changes and False is returned.
        """
        valid = {"dataset": self.datasets, "attack": list(self.specs), "defense": self.defense_list}
        for key, value in choices.items():
            if key not in ("dataset", "index", "attack", "eps", "defense"):
                return self._refuse(f"unknown control {key!r}; controls: dataset, index, attack, eps, defense")
            if key in valid and value not in valid[key]:
                return self._refuse(f"unknown {key} {value!r}; valid: {', '.join(map(str, valid[key]))}")
        if "index" in choices and not isinstance(choices["index"], (int, np.integer)):
            return self._refuse(f"image index must be an integer, got {choices['index']!r}")
        if "eps" in choices:
            dataset = choices.get("dataset", self.dataset.value)
            grid = self.eps_grid.get(dataset, [])
            if not isinstance(choices["eps"], (int, float)) or float(choices["eps"]) not in grid:
                return self._refuse(f"epsilon {choices['eps']} is not offered for {dataset}; valid: "
                                    f"{', '.join(f'{e:g}' for e in grid)}")
        self._hold = True
        try:
            for key in ("dataset", "attack", "defense", "index"):
                if key in choices:
                    getattr(self, key).value = choices[key]
            self._set_eps_options(choices.get("eps"))
        finally:
            self._hold = False
        return self.refresh()

    def random_image(self) -> None:
        """Jump to a random image of the current dataset's pool."""
        pool = self._pool(self.dataset.value)
        if pool is not None:
            self.index.value = int(self._rng.integers(len(pool)))

    def figure(self):
        """The current view as a matplotlib figure (e.g. to save it with lib.report.save_figure)."""
        if not self.view:
            raise ValueError(f"nothing to draw: {self.refused or 'no valid choice yet'}")
        return explorer_figure(self.view)

    # ---- internals
    def _on_change(self, change) -> None:
        if self._hold:
            return
        if change["owner"] is self.dataset or change["owner"] is self.attack:
            self._hold = True
            try:
                self._set_eps_options()
            finally:
                self._hold = False
        self.refresh()

    def _set_eps_options(self, value: float | None = None) -> None:
        grid = self.eps_grid.get(self.dataset.value, [])
        spec = self.specs[self.attack.value]
        bounded = "eps" in spec.params or spec.eps is not None
        keep = value if value is not None else self.eps.value
        self.eps.options = [(f"{e:g}", e) for e in grid]
        self.eps.disabled = not bounded
        if grid:
            self.eps.value = keep if keep in grid else (spec.eps if spec.eps in grid else grid[len(grid) // 2])

    def _refuse(self, text: str) -> bool:
        self.refused = text
        self.message.value = f"<b style='color:#b00'>refused:</b> {html.escape(text)}"
        return False

    def _pool(self, dataset: str) -> data.ImageData | None:
        if dataset not in self._pools:
            try:
                self._pools[dataset] = data.load_dataset(dataset, "test", n=self.pool_size, seed=self.profile["seed"])
            except data.DatasetUnavailable as err:
                self._refuse(f"dataset {dataset} is not available: {err}")
                return None
        return self._pools[dataset]

    def _classifier(self, dataset: str) -> nn.Module:
        if dataset not in self._classifiers:
            self._classifiers[dataset] = trained_classifier(self.profile, dataset, "target", device=self.device)[0]
            self.loads["classifier"] += 1
        return self._classifiers[dataset]

    def _defense(self, dataset: str, name: str) -> Built:
        if (dataset, name) not in self._defenses:
            built = build(name, self.profile, dataset, self._classifier(dataset), device=self.device)
            built.defense.to(self.device).eval()
            built.classifier.to(self.device).eval()
            self._defenses[dataset, name] = built
            self.loads["defense"] += 1
        return self._defenses[dataset, name]

    def _spec(self) -> tuple[AttackSpec, float | None]:
        spec = self.specs[self.attack.value]
        if "eps" not in spec.params and spec.eps is None:
            return spec, None
        if self.eps.value is None:
            raise ValueError(f"no epsilon is configured for {self.dataset.value}; add it to the explorer's eps grid")
        eps = float(self.eps.value)
        return AttackSpec(spec.name, {**spec.params, "eps": eps}, spec.label), eps

    def _adversarial_example(self, dataset: str, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spec, eps = self._spec()
        key = (dataset, index, spec.name, repr(sorted(spec.params.items())))
        if key not in self._adversarial:
            self._adversarial[key] = adversarial_set(spec, self._classifier(dataset), x, y)[0]
            self.loads["attack"] += 1
        return self._adversarial[key]

    def refresh(self) -> bool:
        """Recompute and redraw the view for the current controls; a refused choice leaves the last view shown."""
        dataset, index, defense_name = self.dataset.value, self.index.value, self.defense.value
        pool = self._pool(dataset)
        if pool is None:
            return False
        if not 0 <= index < len(pool):
            return self._refuse(f"image index {index} is out of range for {dataset}: choose 0 to {len(pool) - 1}")
        if self.attack.value not in self.specs:
            return self._refuse(f"unknown attack {self.attack.value!r}")
        try:
            classifier = self._classifier(dataset)
            built = self._defense(dataset, defense_name)
            x = pool.x[index:index + 1].to(self.device)
            y = pool.y[index:index + 1].to(self.device)
            x_adv = self._adversarial_example(dataset, index, x, y)
            with torch.no_grad():
                purified = built.defense.purify(x_adv)
            stages, mask = stages_and_mask(built.defense, x_adv)
        except (ValueError, RuntimeError) as err:  # DatasetUnavailable is a RuntimeError
            return self._refuse(f"{type(err).__name__}: {err}")
        names = pool.info.classes or [str(i) for i in range(pool.info.num_classes)]
        _, eps = self._spec()
        self.view = {
            "dataset": dataset, "index": index, "label": int(y), "class_names": list(names),
            "attack": self.attack.value, "eps": eps, "defense": LABELS.get(defense_name, defense_name),
            "defense_name": defense_name, "clean": x.cpu(), "adversarial": x_adv.cpu(), "purified": purified.cpu(),
            "stages": {k: v.cpu() for k, v in stages.items()}, "mask": None if mask is None else mask.cpu(),
            "top": {kind: top_predictions(model, t, self.top_k) for kind, model, t in
                    (("clean", classifier, x), ("adversarial", classifier, x_adv),
                     ("purified", built.classifier, purified))},
        }
        self.image.value = figure_png(explorer_figure(self.view))
        self.message.value = self.refused = ""
        return True

