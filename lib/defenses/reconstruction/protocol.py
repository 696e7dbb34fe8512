"""Attacks and evaluation as paper 003 runs them (spec-003 §2.7, §3.2): the four attacks of Tables 1-4 at a
strength ε, BIM's step rule, the two readings of the tables' DeepFool / CW (clipped to the table's L-inf ball or
not), and accuracy rows of models that all classify the adversarial images crafted on one attacked model."""
from __future__ import annotations

import torch
from torch import nn

from lib.evaluate import AttackSpec, accuracy, adversarial_set
from lib.runtime import get_device
from lib.validate import check_nonnegative, check_positive_int

# What DeepFool / CW mean in tables headed by a single ε (spec-003 §2.7 [REVISED], §8 item 7); FGSM and BIM are
# ε-bounded and the same in both readings.
CLIPPED, ITERATIONS = "ε-clipped", "iterations"
READINGS: dict[str, str] = {
    CLIPPED: "DeepFool / CW at the profile's largest iteration count, then projected onto the table's L-inf "
             "ε-ball: PixelDefend's protocol, the spec's default",
    ITERATIONS: "DeepFool / CW unclipped at the profile's largest iteration count: the strength is the iteration "
                "count, not ε",
}
DEFAULT_READING = CLIPPED


def bim_schedule(eps: float, steps: int | None = None) -> dict[str, float | int]:
    """BIM's (steps, alpha) for ε in [0, 1] (spec §2.7).

    steps None: Kurakin's rule T = max(10, int(min(ε255 + 4, 1.25 ε255))), α = min(1/255, 2.5 ε / T);
    a fixed `steps` (the cpu-scale deviation) uses α = 2.5 ε / steps.
    """
    check_nonnegative(eps, "eps")
    if steps is None:
        e255 = 255.0 * eps
        steps = max(10, int(min(e255 + 4, 1.25 * e255)))
        return {"steps": steps, "alpha": min(1.0 / 255.0, 2.5 * eps / steps)}
    check_positive_int(steps, "steps")
    return {"steps": steps, "alpha": 2.5 * eps / steps}


def clip_to_linf_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Project x_adv onto the L-inf ball of radius ε around x (and [0, 1]): the tables' ε for DeepFool/CW (§2.7)."""
    check_nonnegative(eps, "eps")
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv shapes differ: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


def as_read(x: torch.Tensor, x_adv: torch.Tensor, spec: AttackSpec, eps: float, reading: str) -> torch.Tensor:
    """`spec`'s adversarial images as `reading` reads them: a minimum-norm attack's (no ε: DeepFool, CW) projected
    onto the ε-ball under CLIPPED, as crafted under ITERATIONS; ε-bounded attacks' as crafted in both."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; one of {list(READINGS)}")
    return clip_to_linf_ball(x, x_adv, eps) if spec.eps is None and reading == CLIPPED else x_adv


def paper_attacks(eps: float, *, bim_steps: int | None = None, deepfool: dict | None = None,
                  cw: dict | None = None) -> dict[str, AttackSpec]:
    """The four attacks of Tables 1-4 at strength ε: FGSM, BIM (bim_schedule), DeepFool and CW-L2.

    DeepFool and CW are minimum-norm attacks with their own parameters (`deepfool`, `cw`: keyword
    arguments of lib.attacks.deepfool / cw_l2); the tables clip them to the ε-ball afterwards.
    """
    return {"FGSM": AttackSpec("fgsm", {"eps": eps}, "FGSM"),
            "BIM": AttackSpec("bim", {"eps": eps, **bim_schedule(eps, bim_steps)}, "BIM"),
            "DeepFool": AttackSpec("deepfool", dict(deepfool or {}), "DeepFool"),
            "CW": AttackSpec("cw_l2", dict(cw or {}), "CW")}


def robustness_rows(attacked: nn.Module, evaluated: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                    attacks: dict[str, AttackSpec], *, clip_eps: float | None = None, batch_size: int = 256,
                    device: torch.device | None = None) -> list[dict]:
    """Accuracy (%) of every model in `evaluated` on clean x and on each attack crafted on `attacked`.

    The paper's protocol: attacks see `attacked` only (e.g. the bare classifier), then every evaluated
    model (e.g. classifier and classifier∘defense) classifies the same adversarial images. Attacks
    without an ε (DeepFool, CW) are projected onto the clip_eps L-inf ball when clip_eps is given;
    rows say so in 'clipped'. Adversarial sets are cached (lib.evaluate.adversarial_set).
    """
    device = device or get_device()
    x, y = x.to(device), y.to(device)
    rows = [{"attack": "Clean", "model": name, "accuracy": accuracy(m, x, y, batch_size, device), "clipped": False,
             "attack_seconds": 0.0} for name, m in evaluated.items()]
    for label, spec in attacks.items():
        x_adv, seconds = adversarial_set(spec, attacked, x, y, batch_size=batch_size)
        clipped = clip_eps is not None and spec.eps is None
        if clipped:
            x_adv = clip_to_linf_ball(x, x_adv, clip_eps)
        rows += [{"attack": label, "model": name, "accuracy": accuracy(m, x_adv, y, batch_size, device),
                  "clipped": clipped, "attack_seconds": seconds} for name, m in evaluated.items()]
    return rows


def reading_rows(attacked: nn.Module, evaluated: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                 attacks: dict[str, AttackSpec], eps: float, *, batch_size: int = 256,
                 device: torch.device | None = None) -> dict[str, list[dict]]:
    """{reading: robustness_rows} for every reading of READINGS, from one adversarial set per attack.

    Clean, FGSM and BIM rows are shared; DeepFool / CW (attacks without an ε) are clipped to the ε-ball in
    CLIPPED and left as crafted in ITERATIONS (the cache of adversarial_set crafts each set once).
    """
    clipped = robustness_rows(attacked, evaluated, x, y, attacks, clip_eps=eps, batch_size=batch_size, device=device)
    minimum_norm = {label: spec for label, spec in attacks.items() if spec.eps is None}
    unclipped = robustness_rows(attacked, evaluated, x, y, minimum_norm, batch_size=batch_size, device=device)
    unclipped = {(r["attack"], r["model"]): r for r in unclipped}
    return {CLIPPED: clipped,
            ITERATIONS: [unclipped[(r["attack"], r["model"])] if r["clipped"] else r for r in clipped]}
