"""RegionSparse's evaluation protocol (spec-002 §3): attack-strength grids, the normalised L2 measure, CW with
tau-scaling, MI-FGSM calibrated to a target L2, accuracy-against-strength tables, classifiers retrained on
transformed images (black box) and FGSM adversarial fine-tuning (Table II).

Strengths: FGSM/BIM by L-inf on the 0-255 scale (eps = k / 255), CW-L2/MI-FGSM by Guo et al.'s normalised L2
d = mean_i ||x'_i - x_i||_2 / ||x_i||_2. Strength 0 means the clean images.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lib import cache
from lib.attacks import bim, fgsm, mi_fgsm
from lib.data import ImageData
from lib.defenses.base import Defense
from lib.evaluate import model_digest, predict
from lib.train import TrainConfig, cached_model, fit_classifier
from lib.validate import check_images, check_labels, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]
LINF_ATTACKS = ("FGSM", "BIM")
L2_ATTACKS = ("CW-L2", "MI-FGSM")
ATTACK_ORDER = ("FGSM", "BIM", "CW-L2", "MI-FGSM")


def normalized_l2(x: torch.Tensor, x_adv: torch.Tensor) -> float:
    """Guo et al.'s normalised L2 dissimilarity: mean over images of ||x_adv - x||_2 / ||x||_2."""
    num = (x_adv - x).flatten(1).norm(dim=1)
    return float((num / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def bim_steps(linf: float) -> int:
    """Kurakin et al.'s BIM schedule: min(L-inf + 4, ceil(1.25 L-inf)) steps of 1/255 (L-inf on the 0-255 scale)."""
    return max(1, int(min(linf + 4, math.ceil(1.25 * linf))))


def cw_fixed_c(model: Model, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1, kappa: float = 0.0,
               steps: int = 50, lr: float = 0.01) -> torch.Tensor:
    """The paper's CW-L2: one fixed constant c (no binary search), Adam in tanh space; per image the smallest
    successful iterate, else the last one (so tau-scaling can still grow an unsuccessful perturbation)."""
    check_images(x)
    check_labels(y, len(x))
    check_nonnegative(c, "c")
    check_positive_int(steps, "steps")
    x = x.detach()
    y = y.to(x.device)
    w = torch.atanh((2 * x - 1) * 0.999999).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_l2 = torch.full((len(x),), float("inf"), device=x.device)
    last = x
    for _ in range(steps):
        with torch.enable_grad():
            x_new = (torch.tanh(w) + 1) / 2
            logits = model(x_new)
            z_y = logits.gather(1, y[:, None]).squeeze(1)
            z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            l2sq = (x_new - x).flatten(1).pow(2).sum(1)
            loss = (l2sq + c * (z_y - z_other + kappa).clamp_min(0)).sum()
        with torch.no_grad():
            better = (z_other > z_y + kappa) & (l2sq < best_l2)
            best_l2 = torch.where(better, l2sq, best_l2)
            best = torch.where(better[:, None, None, None], x_new, best)
            last = x_new.detach()
        (w.grad,) = torch.autograd.grad(loss, w)
        opt.step()
    found = torch.isfinite(best_l2)[:, None, None, None]
    return torch.where(found, best, last).detach()


def scale_to_normalized_l2(x: torch.Tensor, x_adv: torch.Tensor, d: float, *, tau_max: float = 1e3,
                           iters: int = 50) -> tuple[torch.Tensor, float, float]:
    """One global tau >= 1 (bisection) so that clip(x + tau * (x_adv - x)) has mean normalised L2 d.

    Returns (scaled images, tau, achieved d). If d is already exceeded at tau = 1, tau = 1 and the achieved d is
    reported as it is; if even tau_max falls short, tau_max is used.
    """
    delta = x_adv - x

    def at(tau: float) -> torch.Tensor:
        return (x + tau * delta).clamp(0.0, 1.0)

    if normalized_l2(x, x_adv) >= d:
        return x_adv.clone(), 1.0, normalized_l2(x, x_adv)
    lo, hi = 1.0, tau_max
    if normalized_l2(x, at(hi)) < d:
        return at(hi), hi, normalized_l2(x, at(hi))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if normalized_l2(x, at(mid)) < d else (lo, mid)
    out = at(hi)
    return out, hi, normalized_l2(x, out)


def mi_fgsm_at_l2(model: Model, x: torch.Tensor, y: torch.Tensor, d: float, *, steps: int = 10, decay: float = 1.0,
                  refine: int = 2, batch_size: int = 500) -> tuple[torch.Tensor, float, float]:
    """MI-FGSM (sign update, L-inf ball) with one global eps chosen so the mean normalised L2 is about d.

    Starts from eps0 = d / mean_i(sqrt(N_pixels) / ||x_i||_2) and rescales eps by d / achieved `refine` times.
    Returns (images, eps, achieved d).
    """
    dims = x[0].numel()
    eps = d / float((math.sqrt(dims) / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())

    def run(e: float) -> torch.Tensor:
        return torch.cat([mi_fgsm(model, xb, yb, eps=e, steps=steps, decay=decay)
                          for xb, yb in zip(x.split(batch_size), y.split(batch_size))])

    x_adv = run(eps)
    for _ in range(refine):
        got = normalized_l2(x, x_adv)
        if got <= 0:
            break
        eps = min(1.0, eps * d / got)
        x_adv = run(eps)
    return x_adv, eps, normalized_l2(x, x_adv)


def craft_strength_sets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grids: Mapping[str, Sequence[float]],
                        params: Mapping[str, Any], *, batch_size: int = 500, use_cache: bool = True
                        ) -> tuple[dict[tuple[str, float], torch.Tensor], pd.DataFrame]:
    """Gray-box adversarial sets on `model` for every (attack, strength) of `grids` (keys in ATTACK_ORDER).

    params: {"mi_steps", "mi_refine", "cw_c", "cw_steps", "cw_lr"}. Cached per (attack, strength, params, model
    weights, inputs). Returns ({(attack, strength): x_adv}, a table of nominal and achieved strengths).
    """
    unknown = set(grids) - set(ATTACK_ORDER)
    if unknown:
        raise ValueError(f"unknown attack(s) {sorted(unknown)}; valid: {', '.join(ATTACK_ORDER)}")
    digest, inputs = model_digest(model), cache.tensor_digest(x, y)
    code = cache.source_fingerprint([craft_strength_sets, bim, mi_fgsm])
    sets, rows = {}, []
    cw_base: torch.Tensor | None = None
    for attack in [a for a in ATTACK_ORDER if a in grids]:
        for level in grids[attack]:
            def compute(attack=attack, level=level) -> dict[str, torch.Tensor]:
                nonlocal cw_base
                if attack == "FGSM":
                    out = _batched(lambda xb, yb: fgsm(model, xb, yb, eps=level / 255), x, y, batch_size)
                    return {"x_adv": out, "knob": torch.tensor(level / 255)}
                if attack == "BIM":
                    out = _batched(lambda xb, yb: bim(model, xb, yb, eps=level / 255, alpha=1 / 255,
                                                      steps=bim_steps(level)), x, y, batch_size)
                    return {"x_adv": out, "knob": torch.tensor(level / 255)}
                if attack == "MI-FGSM":
                    out, eps, _ = mi_fgsm_at_l2(model, x, y, level, steps=params.get("mi_steps", 10),
                                                refine=params.get("mi_refine", 2), batch_size=batch_size)
                    return {"x_adv": out, "knob": torch.tensor(eps)}
                if cw_base is None:
                    cw_base = _batched(lambda xb, yb: cw_fixed_c(model, xb, yb, c=params.get("cw_c", 0.1),
                                                                 steps=params.get("cw_steps", 50),
                                                                 lr=params.get("cw_lr", 0.01)), x, y, batch_size)
                out, tau, _ = scale_to_normalized_l2(x, cw_base, level)
                return {"x_adv": out, "knob": torch.tensor(tau)}

            config = {"attack": attack, "level": level, "params": dict(params), "model": digest, "inputs": inputs}
            res = cache.cached_tensors("regionsparse/adversarial", config, compute, code=code) if use_cache \
                else compute()
            x_adv = res["x_adv"].to(x.device)
            sets[(attack, float(level))] = x_adv
            rows.append({"attack": attack, "strength": float(level),
                         "knob": {"FGSM": "eps", "BIM": "eps", "MI-FGSM": "eps", "CW-L2": "tau"}[attack],
                         "knob value": float(res["knob"]), "achieved d": normalized_l2(x, x_adv),
                         "achieved Linf (x255)": float((x_adv - x).abs().flatten(1).amax(1).mean()) * 255})
    return sets, pd.DataFrame(rows)


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    return torch.cat([fn(xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def purify_sets(defense: Defense, x: torch.Tensor, sets: Mapping[tuple[str, float], torch.Tensor]
                ) -> tuple[torch.Tensor, dict[tuple[str, float], torch.Tensor]]:
    """defense.purify of the clean images and of every adversarial set, in one batched pass."""
    keys = list(sets)
    stacked = torch.cat([x, *(sets[k] for k in keys)])
    with torch.no_grad():
        out = defense.purify(stacked)
    parts = out.split(len(x))
    return parts[0], dict(zip(keys, parts[1:]))


def accuracy_curves(classifiers: Mapping[str, Model] | Model, purified: Mapping[str, tuple[torch.Tensor, Mapping]],
                    y: torch.Tensor, setting: str, batch_size: int = 500) -> pd.DataFrame:
    """Tidy accuracy (%) for every defense, attack and strength, strength 0 = clean, from purified sets.

    purified[defense] = (purified clean images, {(attack, strength): purified x_adv}); classifiers is one
    model for all defenses or one per defense name.
    """
    rows = []
    y = y.cpu()
    for name, (clean, sets) in purified.items():
        model = classifiers[name] if isinstance(classifiers, Mapping) else classifiers
        clean_acc = 100.0 * float((predict(model, clean, batch_size) == y).float().mean())
        for attack in [a for a in ATTACK_ORDER if any(k[0] == a for k in sets)]:
            rows.append({"setting": setting, "defense": name, "attack": attack, "strength": 0.0, "accuracy": clean_acc})
            for (a, level), xa in sets.items():
                if a == attack:
                    rows.append({"setting": setting, "defense": name, "attack": attack, "strength": level,
                                 "accuracy": 100.0 * float((predict(model, xa, batch_size) == y).float().mean())})
    return pd.DataFrame(rows)


def finetune_copy(model: nn.Module, data: ImageData, cfg: TrainConfig, *, tag: str, config: Mapping[str, Any],
                  loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """A fine-tuned copy of `model` on `data` (cached under tag, config, the start weights and the data)."""
    start = model_digest(model)
    key = {"tag": tag, **dict(config), "start": start, "data": cache.tensor_digest(data.x, data.y),
           "train": asdict(cfg)}

    def build() -> nn.Module:
        return copy.deepcopy(model).cpu()

    def train(m: nn.Module, partial) -> dict:
        hist = fit_classifier(m, data, cfg, device=device, checkpoint=partial, desc=tag, loss_fn=loss_fn)
        return {"final_loss": hist[-1]["loss"], "train_size": len(data)}

    return cached_model("regionsparse/finetuned", key, build, train, code=(finetune_copy, fgsm_adversarial_loss),
                        device=device)


def fgsm_adversarial_loss(levels: Sequence[float] = tuple(range(2, 23, 4)), seed: int = 0
                          ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """50/50 clean/FGSM cross-entropy with a per-image eps drawn from `levels` (0-255 scale), as in Kurakin et al."""
    gen = torch.Generator().manual_seed(seed)
    levels_t = torch.tensor(list(levels), dtype=torch.float32) / 255

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        eps = levels_t[torch.randint(len(levels_t), (len(xb),), generator=gen)].to(xb).view(-1, 1, 1, 1)
        model.eval()
        with torch.enable_grad():
            xv = xb.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xv), yb), xv)
        model.train()
        x_adv = (xb + eps * g.sign()).clamp(0, 1).detach()
        return 0.5 * F.cross_entropy(model(xb), yb) + 0.5 * F.cross_entropy(model(x_adv), yb)

    return loss


@torch.no_grad()
def eliminated_share(model: Model, x_adv: torch.Tensor, x_defended: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 500) -> tuple[float, int]:
    """Share (%) of successful attacks a defense undoes: among images whose x_adv fools the undefended model,
    the fraction classified correctly after the defense. Returns (share, number of successful attacks)."""
    y = y.cpu()
    fooled = predict(model, x_adv, batch_size) != y
    fixed = predict(model, x_defended, batch_size) == y
    n = int(fooled.sum())
    return (100.0 * float((fooled & fixed).sum()) / n if n else float("nan")), n


def _rs_range(df: pd.DataFrame, defense: str, attacks: Sequence[str], fn: str) -> float:
    rows = df[(df["defense"] == defense) & df["attack"].isin(attacks) & (df["strength"] > 0)]
    return float(getattr(rows["accuracy"], fn)()) if len(rows) else float("nan")


def _drop(df: pd.DataFrame, defense: str, attacks: Sequence[str]) -> float:
    """Largest accuracy fall from the weakest to the strongest attack level, over `attacks`."""
    drops = []
    for attack in attacks:
        rows = df[(df["defense"] == defense) & (df["attack"] == attack) & (df["strength"] > 0)].sort_values("strength")
        if len(rows) > 1:
            drops.append(float(rows["accuracy"].iloc[0] - rows["accuracy"].iloc[-1]))
    return max(drops) if drops else float("nan")


def _gain(a: pd.DataFrame, b: pd.DataFrame, defenses: Sequence[str]) -> float:
    """Mean accuracy gain of table a over table b on the (defense, attack, strength > 0) cells both have."""
    keys = ["defense", "attack", "strength"]
    m = a[a["defense"].isin(defenses) & (a["strength"] > 0)].merge(b, on=keys, suffixes=("_a", "_b"))
    return float((m["accuracy_a"] - m["accuracy_b"]).mean()) if len(m) else float("nan")


def claims_ours(claims: pd.DataFrame, *, gray: pd.DataFrame, ablation: pd.DataFrame | None = None,
                black: pd.DataFrame | None = None, extended: pd.DataFrame | None = None,
                transfer: pd.DataFrame | None = None, table2: pd.DataFrame | None = None,
                ratios: pd.DataFrame | None = None, eliminated: float | None = None,
                rs: str = "RegionSparse") -> pd.DataFrame:
    """Our value for every row of the paper's text claims (lib.reference 'regionsparse'/'claims'), same keys.

    Accuracy tables are tidy (defense, attack, strength, accuracy); `ablation` has variant names as defenses,
    `transfer` a 'source' column, `table2` the Table II layout in long form (defense, attack, strength, accuracy),
    `ratios` the activation_ratios table of one attack, `eliminated` the largest eliminated_share of RegionSparse
    on MI-FGSM / CW-L2 examples. Rows a value was not given for stay NaN.
    """
    linf, l2 = list(LINF_ATTACKS), list(L2_ATTACKS)
    values: list[float] = []
    for _, row in claims.iterrows():
        setting, attack, metric = row["setting"], row["attack"], row["metric"]
        v = float("nan")
        if metric.startswith("activation ratio") and ratios is not None and len(ratios):
            half = max(1, len(ratios) // 2)
            low, deepest = ratios["ratio"].iloc[:half].mean(), ratios["ratio"].iloc[-1]
            v = float(low if "index < 30" in setting else deepest)
        elif setting == "gray-box (Fig. 5)":
            if metric.startswith("accuracy ("):
                v = _rs_range(gray, rs, linf if "L∞" in attack else l2, "min" if "min" in metric else "max")
            elif metric.startswith("accuracy decrease"):
                v = _drop(gray, rs, ["CW-L2"] if attack == "CW-L2" else list(ATTACK_ORDER))
        elif setting == "gray-box ablation (Fig. 4)" and ablation is not None:
            level = ablation[ablation["attack"].isin(linf if "L∞" in attack else l2)]
            region = level[level["defense"] == "Region"]
            if metric == "accuracy (max)":
                v = float(region["accuracy"].max())
            elif metric == "accuracy (min)":
                v = float(region["accuracy"].min())
            else:
                variants = ["noIS", "noBS"] if "smoothing" in metric else ["noTR", "noIS", "noPN", "noBS"]
                scope = ablation[ablation["attack"].isin(list(ATTACK_ORDER))] if "smoothing" in metric else level
                piv = scope.pivot_table(index="attack", columns="defense", values="accuracy")
                v = float(max((piv["Region"] - piv[c]).max() for c in variants if c in piv))
        elif setting.startswith("black-box") and black is not None:
            if metric == "accuracy gain over gray-box":
                v = _gain(black, gray, [rs])
            else:
                rows = black[(black["defense"] == rs) & (black["strength"] > 0)]
                v = float(rows.sort_values("strength").groupby("attack")["accuracy"].first().min())
        elif setting.startswith("extended gray-box") and extended is not None:
            if metric == "accuracy gain over gray-box":
                v = _gain(extended, gray, [d for d in extended["defense"].unique() if d != "No defense"])
            else:
                v = _rs_range(extended, rs, list(ATTACK_ORDER), "min")
        elif setting.startswith("transferred") and transfer is not None:
            v = _rs_range(transfer, rs, list(ATTACK_ORDER), "min")
        elif setting == "adversarial training" and table2 is not None:
            rows = table2[(table2["defense"] == row["defense"]) & (table2["attack"] != "Clean")]
            v = float(rows["accuracy"].min()) if len(rows) else float("nan")
        elif metric == "attacks eliminated (max)" and eliminated is not None:
            v = float(eliminated)
        values.append(v)
    out = claims[["defense", "setting", "attack", "eps", "metric"]].copy()
    out["value"] = values
    return out
