"""Where a classifier looks, across defenses: per-layer activation maps and statistics of benign, adversarial and
purified inputs (RegionSparse's activation analysis applied to every defense), Grad-CAM attention, and the fraction
of attention that stays on the benign attention region. Builds on lib.activations (hooks, Eq. 7, Grad-CAM);
`activation_case` and `attention_case` are notebooks 06 and 07 on one case of lib.cases.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.activations import cam_iou, channel_max_activations, grad_cam, layer_outputs, total_activation
from lib.evaluate import AttackSpec, predict
from lib.validate import check_images
from lib.viz import show_image
from lib.widgets import STYLE, figure_title

if TYPE_CHECKING:
    from lib.cases import Case


@torch.no_grad()
def layer_activation_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None
                          ) -> dict[str, torch.Tensor]:
    """Channel-mean activation map (N, h, w) of every spatial layer in `layers` (default: the model's ReLU and
    global-pooling modules), in forward order; layers whose output is not (N, C, h, w) with h*w > 1 are left out."""
    found: dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        if out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1 and name not in found:
            found[name] = out.mean(1).cpu()

    layers = layer_outputs(model, x, layers, record)
    if not found:
        raise ValueError(f"none of the layers {layers} has a spatial (N, C, h, w) output with h*w > 1")
    return found


def activation_statistics(model: nn.Module, inputs: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None,
                          gamma: float = 0.0, reference: str = "benign") -> pd.DataFrame:
    """Per input kind and layer: mean total activation V (RegionSparse's Eq. 7 on per-channel maxima) and its ratio
    to the `reference` kind's V. `inputs` maps a kind ("benign", "adversarial", "purified: median", ...) to a batch."""
    if reference not in inputs:
        raise ValueError(f"inputs must include the reference kind {reference!r}; got {list(inputs)}")
    values = {kind: {name: float(total_activation(p, gamma).mean())
                     for name, p in channel_max_activations(model, x, layers).items()} for kind, x in inputs.items()}
    base = values[reference]
    return pd.DataFrame([{"kind": kind, "layer index": index, "layer": name, "V": v,
                          f"ratio to {reference}": v / base[name] if base[name] > 0 else float("nan")}
                         for kind, per_layer in values.items() for index, (name, v) in enumerate(per_layer.items())])


def attention(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | None = None,
              layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps (N, H, W), min-max normalised to [0, 1] per image (grad-cam package, via lib.activations);
    classes default to each input's own top-1 prediction, so the map shows the evidence for what the model predicts.
    The input is made to require gradients so that models with frozen parameters still have activation gradients."""
    check_images(x)
    return grad_cam(model, x.detach().clone().requires_grad_(True), classes, layer)


def benign_region(benign_maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The benign attention region: pixels whose normalised benign attention is at least `threshold` (N, H, W)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if benign_maps.dim() != 3:
        raise ValueError(f"attention maps must have shape (N, H, W), got {tuple(benign_maps.shape)}")
    return benign_maps >= threshold


def attention_retention(benign_maps: torch.Tensor, maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Fraction of each map's attention mass inside the benign attention region, sum_R a / sum a, per image (N,);
    NaN where a map has no attention at all. 1 = attention stayed on the benign region, 0 = it all moved away."""
    if maps.shape != benign_maps.shape:
        raise ValueError(f"map shapes differ: {tuple(benign_maps.shape)} vs {tuple(maps.shape)}")
    if (maps < 0).any():
        raise ValueError("attention maps must be non-negative")
    region = benign_region(benign_maps, threshold).to(maps.dtype)
    total = maps.flatten(1).sum(1)
    inside = (maps * region).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), torch.full_like(total, float("nan")))


def retention_row(benign_maps: torch.Tensor, others: Mapping[str, torch.Tensor], threshold: float = 0.5
                  ) -> dict[str, float]:
    """Mean retention (NaN-free images only) of each kind in `others`, plus the benign map's own share (baseline)."""
    row = {"benign (own share)": float(np.nanmean(attention_retention(benign_maps, benign_maps, threshold).numpy()))}
    for kind, maps in others.items():
        row[kind] = float(np.nanmean(attention_retention(benign_maps, maps, threshold).numpy()))
    return row


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor) -> None:
    show_image(ax, image)
    ax.imshow(heat.numpy(), cmap=STYLE["heat_cmap"], alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")


def attention_figure(images: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor], titles: Sequence[str],
                     *, dataset: str, attack: str, eps: float | None,
                     predictions: Mapping[str, Sequence[str]] | None = None):
    """Rows = examples, columns = input kinds (benign, adversarial, purified by each defense): each image with its
    Grad-CAM map overlaid (jet colour map, red = most attention) and, when given, the prediction under it."""
    kinds = list(images)
    n = len(next(iter(images.values())))
    fig, axes = plt.subplots(n, len(kinds), figsize=(STYLE["panel"] * len(kinds), STYLE["panel"] * n + 0.6),
                             squeeze=False)
    for j, kind in enumerate(kinds):
        for i in range(n):
            _overlay(axes[i, j], images[kind][i], maps[kind][i])
            if predictions is not None:
                axes[i, j].set_xlabel(f"pred {predictions[kind][i]}", fontsize=STYLE["label_size"])
            elif i == n - 1:
                axes[i, j].set_xlabel(kind, fontsize=STYLE["label_size"])
        axes[0, j].set_title(kind, fontsize=STYLE["label_size"])
    for i in range(n):
        axes[i, 0].set_ylabel(titles[i], fontsize=STYLE["label_size"])
    fig.suptitle(figure_title("Grad-CAM attention", dataset, attack, eps), fontsize=STYLE["title_size"])
    fig.tight_layout()
    return fig


def activation_maps_figure(maps: Mapping[str, Mapping[str, torch.Tensor]], *, dataset: str, attack: str,
                           eps: float | None, example: int = 0):
    """Rows = input kinds (benign, adversarial, purified by each defense), columns = layers: one example's
    channel-mean activation maps, one colour scale per layer."""
    kinds = list(maps)
    layers = list(maps[kinds[0]])
    fig, axes = plt.subplots(len(kinds), len(layers), squeeze=False, layout="constrained",
                             figsize=(STYLE["panel"] * len(layers) + 0.8, STYLE["panel"] * len(kinds) + 1.2))
    for j, layer in enumerate(layers):
        top = max(float(maps[k][layer][example].max()) for k in kinds)
        for i, kind in enumerate(kinds):
            ax = axes[i, j]
            im = ax.imshow(maps[kind][layer][example].numpy(), cmap=STYLE["act_cmap"], vmin=0, vmax=top or 1.0,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(kind.replace(": ", ":\n"), fontsize=STYLE["label_size"])
        axes[0, j].set_title(layer, fontsize=STYLE["label_size"])
        bar = fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", shrink=0.9, aspect=12)
        bar.set_label(f"mean activation\n{layer}", fontsize=STYLE["label_size"])
        bar.ax.tick_params(labelsize=STYLE["label_size"] - 1)
    fig.suptitle(figure_title(f"activation maps of test image {example}", dataset, attack, eps),
                 fontsize=STYLE["title_size"])
    return fig


def activation_statistics_figure(stats: pd.DataFrame, *, dataset: str, attack: str, eps: float | None,
                                 reference: str = "benign"):
    """Ratio of each input kind's total activation V to the benign V, per layer (one line per kind)."""
    column = f"ratio to {reference}"
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for kind, part in stats[stats["kind"] != reference].groupby("kind", sort=False):
        adversarial = kind == "adversarial"
        ax.plot(part["layer index"], part[column], marker="o" if adversarial else ".",
                linewidth=2.2 if adversarial else 1, color="black" if adversarial else None, label=kind)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    layer_names = stats.drop_duplicates("layer index").sort_values("layer index")
    ax.set_xticks(layer_names["layer index"], layer_names["layer"], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel(f"V / V({reference})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(figure_title("total activation relative to benign", dataset, attack, eps),
                 fontsize=STYLE["title_size"])
    fig.tight_layout()
    return fig


def retention_figure(table: pd.DataFrame, *, dataset: str, attack: str, eps: float | None):
    """Bars per defense: share of attention on the benign region for adversarial and purified inputs."""
    kinds = [c for c in ("benign (own share)", "adversarial", "purified") if c in table.columns]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(table) + 1.5), 3.4))
    width = 0.8 / len(kinds)
    pos = np.arange(len(table))
    for k, kind in enumerate(kinds):
        ax.bar(pos + (k - (len(kinds) - 1) / 2) * width, table[kind], width, label=kind)
    ax.set_xticks(pos, table["defense"], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("defense")
    ax.set_ylabel("attention on benign region")
    ax.legend(fontsize=7)
    ax.set_title(figure_title("attention retention", dataset, attack, eps), fontsize=STYLE["title_size"])
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- one case of notebooks 06 and 07

def _with_case(frame: pd.DataFrame, case: "Case", spec: AttackSpec) -> pd.DataFrame:
    """`frame` with the dataset, attack and budget as its first columns."""
    return pd.concat([pd.DataFrame({"dataset": case.dataset, "attack": spec.title, "eps": spec.eps},
                                   index=frame.index), frame], axis=1)


def activation_case(case: "Case", spec: AttackSpec, *, gamma: float = 0.0, example: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, plt.Figure]]:
    """Notebook 06 on one case and gray-box attack: (accuracy per input kind, Eq. 7 statistics per kind and layer,
    {figure name: figure}). Activations are the target classifier's on every input (one model, one set of layers);
    a purified input's accuracy is its defense's own classifier's."""
    x, x_adv = case.x, case.adversarial(spec)
    purified = case.purified(x_adv)
    inputs = {"benign": x, "adversarial": x_adv, **{f"purified: {case.label(n)}": p for n, p in purified.items()}}
    scores = [case.accuracy(x), case.accuracy(x_adv), *(case.accuracy(p, n) for n, p in purified.items())]
    accuracy = _with_case(pd.DataFrame({"input": list(inputs), "accuracy (%)": scores}), case, spec)
    stats = _with_case(activation_statistics(case.classifier, inputs, gamma=gamma), case, spec)
    maps = {kind: layer_activation_maps(case.classifier, batch[example:example + 1]) for kind, batch in inputs.items()}
    title = {"dataset": case.dataset, "attack": spec.title, "eps": spec.eps}
    figures = {f"activation_maps_{case.dataset}_{spec.name}": activation_maps_figure(maps, example=example, **title),
               f"activation_ratio_{case.dataset}_{spec.name}": activation_statistics_figure(stats, **title)}
    return accuracy, stats, figures


def attention_case(case: "Case", spec: AttackSpec, *, threshold: float = 0.5, examples: int = 2
                   ) -> tuple[pd.DataFrame, dict[str, plt.Figure]]:
    """Notebook 07 on one case and gray-box attack: (retention per defense, {figure name: figure}).

    Grad-CAM maps are the target classifier's on every input (the attacked model, so that every defense is compared
    with the same benign map); a purified input's accuracy is its defense's own classifier's."""
    x, y, x_adv = case.x, case.y, case.adversarial(spec)
    purified = case.purified(x_adv)
    benign_maps, adv_maps = attention(case.classifier, x), attention(case.classifier, x_adv)
    purified_maps = {n: attention(case.classifier, p) for n, p in purified.items()}
    rows = [{"defense": case.label(n),
             **retention_row(benign_maps, {"adversarial": adv_maps, "purified": maps}, threshold),
             "IoU purified vs benign": float(cam_iou(benign_maps, maps, threshold).mean()),
             "empty maps (purified)": int((maps.flatten(1).sum(1) == 0).sum()),
             "accuracy purified (%)": case.accuracy(purified[n], n), "n": len(y)}
            for n, maps in purified_maps.items()]
    table = _with_case(pd.DataFrame(rows), case, spec)
    k = examples
    images = {"benign": x[:k].cpu(), "adversarial": x_adv[:k].cpu(),
              **{case.label(n): p[:k].cpu() for n, p in purified.items()}}
    maps = {"benign": benign_maps[:k], "adversarial": adv_maps[:k],
            **{case.label(n): m[:k] for n, m in purified_maps.items()}}
    names = case.class_names
    predictions = {kind: [names[int(c)] for c in predict(case.classifier, batch)] for kind, batch in images.items()}
    title = {"dataset": case.dataset, "attack": spec.title, "eps": spec.eps}
    figures = {f"gradcam_{case.dataset}_{spec.name}": attention_figure(
                   images, maps, [f"true {names[int(c)]}" for c in y[:k]], predictions=predictions, **title),
               f"retention_{case.dataset}_{spec.name}": retention_figure(table, **title)}
    return table, figures
