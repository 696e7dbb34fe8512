"""Batched L2 DeepFool (Moosavi-Dezfooli et al. 2016): repeated linearised minimal steps to the nearest boundary.

All samples move together; each step runs one forward pass over the samples still correctly classified
and one backward pass per candidate class, so the cost is independent of the batch's Python loop count.
Candidates are the label plus the top (num_candidates - 1) other classes of the clean logits, fixed at the
start as in the paper's code and foolbox. The overshoot scales the accumulated perturbation at every step,
x_i = clip(x + (1 + overshoot) * r_total), and a sample stops as soon as it is misclassified.
"""
from __future__ import annotations

from typing import Callable

import torch

from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_TINY = 1e-8  # guards divisions by zero-norm gradients
_STEP_SLACK = 1e-4  # added to each step's distance, as in the reference code, to cross the boundary


def deepfool(model: Model, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50, overshoot: float = 0.02,
             num_candidates: int = 10) -> torch.Tensor:
    """Untargeted L2 DeepFool; samples misclassified at the start are returned unchanged."""
    check_attack_inputs(model, x, y)
    check_positive_int(steps, "steps")
    check_nonnegative(overshoot, "overshoot")
    check_positive_int(num_candidates, "num_candidates")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2 (the label and at least one other class), got {num_candidates}")

    x0 = x.detach()
    with torch.no_grad():
        logits0 = model(x0)
    n_cand = min(num_candidates, logits0.shape[1])
    others = logits0.scatter(1, y[:, None], float("-inf")).topk(n_cand - 1, dim=1).indices
    x_adv = x0.clone()
    r_total = torch.zeros_like(x0)
    active = torch.arange(x0.shape[0], device=x0.device)

    for _ in range(steps):
        with torch.enable_grad():
            xa = x_adv[active].requires_grad_(True)
            logits = model(xa)
            keep = logits.argmax(1) == y[active]
            active = active[keep]
            if active.numel() == 0:
                break
            z = logits[keep]
            diffs = z.gather(1, others[active]) - z.gather(1, y[active, None])
            grads = torch.stack([
                torch.autograd.grad(diffs[:, k].sum(), xa, retain_graph=k < n_cand - 2)[0][keep]
                for k in range(n_cand - 1)
            ], dim=1)
        with torch.no_grad():
            grad_norms = grads.flatten(2).norm(dim=2)
            dist = diffs.abs() / (grad_norms + _TINY)
            best = dist.argmin(1)
            rows = torch.arange(active.numel(), device=x0.device)
            scale = (dist[rows, best] + _STEP_SLACK) / (grad_norms[rows, best] + _TINY)
            r_total[active] += scale.view(-1, *[1] * (x0.dim() - 1)) * grads[rows, best]
            x_adv[active] = (x0[active] + (1 + overshoot) * r_total[active]).clamp(0.0, 1.0)
    return x_adv.detach()
