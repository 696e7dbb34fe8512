"""Sanity checks of an adversarial evaluation, per defense (Carlini et al. 2019's checklist, Athalye et al. 2018).

Each check is PASS or WARN (or n/a where it does not apply), with what was measured and, for a WARN, what it means:
(a) an unbounded attack (L-inf eps 1) leaves at most `max_unbounded` % accuracy;
(b) accuracy does not rise with more iterations or restarts of white-box PGD;
(c) per attack and budget, white box <= gray box <= transfer from the surrogate;
(d) for a randomised defense, accuracy against the number of EOT draws flattens;
(e) the clean accuracy of the attack surface (what the white-box attacker differentiates) equals that of the
    defended pipeline (what is scored);
(f) AutoAttack's own checks raised no flag.
Checks (a), (b), (d) and (e) run white-box PGD on the first `size` test images; (c) and (f) read the benchmark's rows.
"""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
import torch

from lib.attacks import attack_surface
from lib.defenses.base import Built
from lib.evaluate import AttackSpec, _seed_of, accuracy, adversarial_set
from lib.runtime import seeded_rng

EXPLAIN = {
    "unbounded": "an attack with no budget must reach 0%: the white-box gradient does not lead to the defense's "
                 "decision boundary (gradient masking, or a poor BPDA approximation), or there are too few steps",
    "iterations": "a stronger attack must not do worse: the optimisation is unstable or the gradient is noisy "
                  "(randomness without enough EOT draws), so the headline attack may be under-converged",
    "ordering": "knowing more must not help the defense: a white-box attack weaker than the gray box, or a gray box "
                "weaker than transfer, points to obfuscated gradients; the per-example worst case already counts "
                "the stronger threat's errors",
    "eot": "accuracy still moves with more EOT draws: the gradient estimate has not converged, so more draws are "
           "needed for a reliable white-box number",
    "surface": "the attacker differentiates another model than the one scored (BPDA/EOT wrapper changes the "
               "forward pass), so white-box numbers do not measure the defended pipeline",
    "autoattack": "AutoAttack's own checks (randomised model, zero gradients, Square beating the gradient attacks) "
                  "point to an unreliable gradient-based evaluation",
}


def _row(defense: str, check: str, ok: bool | None, measured: str, key: str) -> dict[str, str]:
    status = "n/a" if ok is None else ("PASS" if ok else "WARN")
    return {"defense": defense, "check": check, "status": status, "measured": measured,
            "explanation": EXPLAIN[key] if status == "WARN" else ""}


def _white_acc(built: Built, x: torch.Tensor, y: torch.Tensor, params: Mapping[str, Any], eot: int) -> float:
    """Accuracy (%) of the defended model under white-box L-inf PGD with `params` through EOT over `eot` draws."""
    spec = AttackSpec("pgd", dict(params))
    x_adv, _ = adversarial_set(spec, attack_surface(built.classifier, built.defense, eot_samples=eot), x, y)
    with seeded_rng(_seed_of("sanity", sorted(params.items()), eot), x.device):
        return accuracy(built.model().eval(), x_adv, y)


def sanity_checks(defenses: Mapping[str, Built], rows: pd.DataFrame, x: torch.Tensor, y: torch.Tensor, *,
                  budgets: Mapping[str, float], settings: Mapping[str, Any], eot_samples: int,
                  device: torch.device | None = None) -> pd.DataFrame:
    """The PASS/WARN table of checks (a)-(f) for every defense (columns defense, check, status, measured, explanation).

    `rows` are the benchmark's rows for these defenses (lib.evaluate.threat_outcomes); `settings` holds `eval_size` (test
    images of the attack checks), `steps` (fewer, more), `restarts` (more), `eot_draws` (increasing), `tolerance`
    (percentage points an accuracy may rise by chance) and `max_unbounded` (%). The L-inf budget is budgets['linf'].
    """
    x, y = x[:settings["eval_size"]].to(device), y[:settings["eval_size"]].to(device)
    tol, eps = float(settings["tolerance"]), float(budgets["linf"])
    few, many = settings["steps"]
    out = []
    for name, built in defenses.items():
        built.defense.to(device), built.classifier.to(device)
        eot = eot_samples if built.defense.randomized else 1
        base = {"eps": eps, "steps": few, "keep_best": True}
        unbounded = _white_acc(built, x, y, {**base, "eps": 1.0}, eot)
        out.append(_row(name, "(a) unbounded attack", unbounded <= settings["max_unbounded"],
                        f"PGD eps 1, {few} steps: {unbounded:.1f}%", "unbounded"))
        accs = {label: _white_acc(built, x, y, params, eot) for label, params in
                ((f"{few} steps", base), (f"{many} steps", {**base, "steps": many}),
                 (f"{settings['restarts']} restarts", {**base, "restarts": settings["restarts"]}))}
        first = accs[f"{few} steps"]
        out.append(_row(name, "(b) more iterations / restarts", all(a <= first + tol for a in accs.values()),
                        ", ".join(f"{k}: {a:.1f}%" for k, a in accs.items()), "iterations"))
        out.append(_ordering(name, rows[rows.defense == name], tol))
        if built.defense.randomized:
            draws = {k: _white_acc(built, x, y, base, k) for k in settings["eot_draws"]}
            last, before = list(draws.values())[-2:]
            out.append(_row(name, "(d) EOT draws", abs(last - before) <= tol,
                            ", ".join(f"EOT-{k}: {a:.1f}%" for k, a in draws.items()), "eot"))
        else:
            out.append(_row(name, "(d) EOT draws", None, "deterministic defense", "eot"))
        with seeded_rng(_seed_of("sanity clean", name), device):
            surface = accuracy(attack_surface(built.classifier, built.defense).eval(), x, y)
        with seeded_rng(_seed_of("sanity clean", name), device):
            pipeline = accuracy(built.model().eval(), x, y)
        out.append(_row(name, "(e) attack surface = pipeline", abs(surface - pipeline) <= (tol if eot > 1 else 1e-9),
                        f"surface {surface:.1f}%, pipeline {pipeline:.1f}%", "surface"))
        flags = "; ".join(dict.fromkeys(f for f in rows[rows.defense == name]["flags"] if f))
        out.append(_row(name, "(f) AutoAttack flags", not flags, flags or "none", "autoattack"))
    return pd.DataFrame(out)


def _ordering(name: str, rows: pd.DataFrame, tol: float) -> dict[str, str]:
    """Check (c): per attack and budget, white <= gray <= black (each pair where both were run)."""
    acc = rows.pivot_table(index=["attack", "eps"], columns="threat", values="robust_acc")
    broken = []
    for stronger, weaker in (("white", "gray"), ("gray", "black")):
        if {stronger, weaker} <= set(acc.columns):
            bad = acc[acc[stronger] > acc[weaker] + tol]
            broken += [f"{a} {e:g}: {stronger} {r[stronger]:.1f}% > {weaker} {r[weaker]:.1f}%" for (a, e), r in bad.iterrows()]
    pairs = len(acc)
    return _row(name, "(c) white <= gray <= transfer", not broken,
                "; ".join(broken) if broken else f"holds for {pairs} attack/budget pairs", "ordering")
