"""Threat models, defined once, returning tidy pandas tables.

- black box: adversarial examples crafted on an independently trained surrogate, then fed to the
  defended target (transfer);
- gray box: crafted on the target classifier (or a model the caller names), ignorant of the defense;
- white box / adaptive: crafted on classifier(defense(x)) itself, with BPDA for non-differentiable
  defenses and EOT for randomised ones (lib.attacks.attack_surface).

Accuracies in the tables are percentages of all evaluated examples (clean mistakes included).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from lib import cache
from lib.defenses.base import Defense, Defended
from lib.runtime import get_device, seeded_rng
from lib.validate import check_images, check_labels

THREATS = ("black", "gray", "white")
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration: a registry name, its keyword parameters and a display label."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None
    l2_budget: float | None = None   # minimal-norm attacks (CW, DeepFool, DDN): success only within this L2 radius

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def eps(self) -> float | None:
        """The attack's budget: its L-inf/L2 eps parameter, or the L2 budget of a minimal-norm attack."""
        eps = self.params.get("eps", self.l2_budget)
        return None if eps is None else float(eps)


def attack_specs(entries: Sequence[Mapping[str, Any]]) -> list[AttackSpec]:
    """AttackSpecs from a profile's list of {name, params, label, l2_budget} mappings."""
    return [AttackSpec(e["name"], dict(e.get("params", {})), e.get("label"), e.get("l2_budget")) for e in entries]


def within_l2_budget(x: torch.Tensor, x_adv: torch.Tensor, budget: float | None) -> torch.Tensor:
    """x_adv where its L2 distance to x is within `budget`, else x (the attack failed within the budget)."""
    if budget is None:
        return x_adv
    inside = (x_adv - x).flatten(1).norm(dim=1) <= budget
    return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), x_adv, x)


@torch.no_grad()
def in_batches(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 256,
               device: torch.device | None = None) -> torch.Tensor:
    """fn over aligned mini-batches of `tensors` (moved to `device` when given), without gradients; the
    concatenated result on CPU. The one batch-apply helper: purification, masks, features at bounded memory."""
    chunks = zip(*(t.split(batch_size) for t in tensors))
    return torch.cat([fn(*(c.to(device) if device is not None else c for c in chunk)).cpu() for chunk in chunks])


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, batch_size: int = 500, device: torch.device | None = None) -> torch.Tensor:
    """Predicted labels (on CPU) for a [0, 1] batch, evaluated in mini-batches."""
    device = device or _device_of(model)
    return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(batch_size)])


def accuracy(model: Model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent."""
    check_images(x)
    check_labels(y, len(x))
    return 100.0 * float((predict(model, x, batch_size, device) == y.cpu()).float().mean())


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Mean L-inf, mean and median L2 of x_adv - x over all examples."""
    delta = (x_adv - x).flatten(1)
    l2 = delta.norm(dim=1)
    return {"linf_mean": float(delta.abs().amax(1).mean()), "l2_mean": float(l2.mean()), "l2_median": float(l2.median())}


def model_digest(model: nn.Module) -> str:
    """Hash of a module's class and weights: identifies it in cache keys."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def adversarial_set(spec: AttackSpec, model: Model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                    use_cache: bool = True) -> tuple[torch.Tensor, float]:
    """Run one attack on `model`; returns (x_adv on x's device, seconds spent).

    The attack's randomness is seeded from (attack, parameters, inputs), so a result is the same whether
    or not anything ran or was cached before it. When `model` is an nn.Module the result is cached under
    (attack, parameters, weights, inputs, attack code); a cached set reports the seconds of the run that produced it.
    """
    from lib import attacks

    inputs = cache.tensor_digest(x, y)

    def run() -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        with seeded_rng(_seed_of(spec.name, dict(spec.params), inputs), x.device):   # random starts, restarts
            x_adv = attacks.generate(spec.name, model, x, y, batch_size=batch_size, **spec.params)
        return {"x_adv": x_adv, "seconds": torch.tensor(time.perf_counter() - t0)}

    if use_cache and isinstance(model, nn.Module):
        config = {"attack": spec.name, "params": dict(spec.params), "model": model_digest(model),
                  "inputs": inputs, "rng": "seeded per attack and inputs"}
        out = cache.cached_tensors("adversarial", config, run, code=cache.source_fingerprint([attacks.ATTACKS[spec.name]]))
    else:
        out = run()
    return out["x_adv"].to(x.device), float(out["seconds"])


def evaluate_threats(classifier: nn.Module, defenses: Mapping[str, Defense], x: torch.Tensor, y: torch.Tensor,
                     attacks: Sequence[AttackSpec], *, threats: Sequence[str] = ("gray", "white"),
                     surrogate: Model | None = None, gray_box_models: Mapping[str, Model] | None = None,
                     eot_samples: int = 1, batch_size: int = 256, device: torch.device | None = None,
                     use_cache: bool = True) -> pd.DataFrame:
    """Clean and robust accuracy of every defense under every attack and threat model.

    Adversarial sets that do not depend on the defense (black box, gray box) are crafted once and
    shared. `gray_box_models[name]` overrides the model attacked in the gray box for one defense
    (e.g. SFM's gray box differentiates through the masker but not the squeezer).
    Returns one row per (threat, defense, attack).
    """
    from lib.attacks import attack_surface

    unknown = set(threats) - set(THREATS)
    if unknown:
        raise ValueError(f"unknown threat model(s) {sorted(unknown)}; valid: {', '.join(THREATS)}")
    if "black" in threats and surrogate is None:
        raise ValueError("the black-box threat model needs an independently trained `surrogate`")
    check_images(x)
    check_labels(y, len(x))
    device = device or get_device()
    x, y = x.to(device), y.to(device)
    classifier.to(device)
    gray_box_models = dict(gray_box_models or {})
    pipelines = {name: Defended(classifier, d.to(device)).eval() for name, d in defenses.items()}
    clean = {}
    for name, pipeline in pipelines.items():
        with seeded_rng(_seed_of(name, "clean"), device):
            clean[name] = accuracy(pipeline, x, y, batch_size, device)

    rows: list[dict[str, Any]] = []
    crafted: dict[tuple, tuple[torch.Tensor, float]] = {}   # one run per (attacked model, attack, parameters)
    for threat in threats:
        for spec in attacks:
            for name, defense in defenses.items():
                if threat == "white":
                    # not cached on disk: a weight digest cannot tell apart parameter-free defenses (JPEG q=75 / q=90)
                    model, cacheable = attack_surface(classifier, defense, eot_samples=eot_samples), False
                    gradient, owner = _gradient_route(defense, eot_samples), ("white", name)
                else:
                    model, cacheable = (surrogate if threat == "black" else gray_box_models.get(name, classifier)), use_cache
                    gradient = "surrogate" if threat == "black" else ("classifier" if model is classifier else "custom")
                    owner = ("transfer", id(model))
                key = (*owner, spec.name, repr(sorted(spec.params.items())))
                if key not in crafted:
                    crafted[key] = adversarial_set(spec, model, x, y, batch_size=batch_size, use_cache=cacheable)
                x_adv, seconds = crafted[key]
                x_adv = within_l2_budget(x, x_adv, spec.l2_budget)
                with seeded_rng(_seed_of(name, spec.name, dict(spec.params), threat), device):   # randomised defenses
                    robust = accuracy(pipelines[name], x_adv, y, batch_size, device)
                rows.append({"threat": threat, "defense": name, "attack": spec.title, "eps": spec.eps, "n": len(y),
                             "clean_acc": clean[name], "robust_acc": robust,
                             **perturbation_norms(x, x_adv), "attack_seconds": seconds, "gradient": gradient})
    return pd.DataFrame(rows)


def _seed_of(*parts: Any) -> int:
    """A 32-bit seed determined by `parts` alone."""
    return int(cache.config_key(list(parts))[:8], 16)


def _gradient_route(defense: Defense, eot_samples: int) -> str:
    route = "full" if defense.differentiable else ("BPDA-approx" if defense.bpda_purify is not None else "BPDA")
    return f"{route}+EOT-{eot_samples}" if defense.randomized and eot_samples > 1 else route


def _device_of(model: Model) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")
