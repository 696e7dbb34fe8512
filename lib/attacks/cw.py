"""Carlini-Wagner L2 attack (Carlini & Wagner 2017): tanh box, Adam, per-sample binary search over c.

Follows the authors' code (carlini/nn_robust_attacks, l2_attack.py): the modifier restarts from the
clean image at every binary-search step with a fresh Adam; c grows x10 until a sample's first success,
then bisects between the largest failing and smallest succeeding c; each iterate is scored before its
Adam update. Two differences: abort-early is decided per sample (the original decides on the summed
loss of its batch, which is the same thing at its default batch size of 1, and keeps results independent
of how samples are batched), and distances are measured to x itself rather than to its tanh reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_TANH_SHRINK = 0.999999  # keeps atanh finite at pixel values 0 and 1, as in the original code
_C_UNBOUNDED = 1e10  # "no successful c seen yet" (the original's upper_bound)


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float, targeted: bool) -> torch.Tensor:
    """CW's f per sample: max(Z_y - max_{i!=y} Z_i + kappa, 0), or max(max_{i!=t} Z_i - Z_t + kappa, 0) if targeted."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    diff = z_other - z_y if targeted else z_y - z_other
    return (diff + kappa).clamp_min(0.0)


def succeeded(logits: torch.Tensor, y: torch.Tensor, kappa: float, targeted: bool) -> torch.Tensor:
    """Bool mask: the target wins (targeted) or y loses (untargeted) by a logit margin above kappa."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_y - kappa > z_other if targeted else z_y + kappa < z_other


@dataclass(frozen=True)
class CWResult:
    """Everything cw_l2 computes: images, which samples succeeded, their L2 norms (inf if not), final c, and the
    last iterate of the last binary-search step (what a fixed-c run hands on when it did not succeed)."""

    x_adv: torch.Tensor
    success: torch.Tensor
    l2: torch.Tensor
    const: torch.Tensor
    last: torch.Tensor


def cw_l2_details(model: Model, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1, kappa: float = 0.0,
                  steps: int = 100, lr: float = 0.01, binary_steps: int = 5, targeted: bool = False,
                  abort_early: bool = True) -> CWResult:
    """Run CW-L2 and return the smallest-L2 successful example per sample (x where none) with diagnostics."""
    check_attack_inputs(model, x, y)
    for value, name in ((c, "c"), (kappa, "kappa"), (lr, "lr")):
        check_nonnegative(value, name)
    check_positive_int(steps, "steps")
    check_positive_int(binary_steps, "binary_steps")

    x = x.detach()
    n = x.shape[0]
    opts = dict(device=x.device, dtype=x.dtype)
    w0 = torch.atanh((2 * x - 1) * _TANH_SHRINK)
    const = torch.full((n,), float(c), **opts)
    lower = torch.zeros(n, **opts)
    upper = torch.full((n,), _C_UNBOUNDED, **opts)
    best_l2sq = torch.full((n,), float("inf"), **opts)
    best_adv = x.clone()
    last = x
    check_every = max(steps // 10, 1)

    for _ in range(binary_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        step_success = torch.zeros(n, dtype=torch.bool, device=x.device)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        prev_loss = torch.full((n,), float("inf"), **opts)
        for it in range(steps):
            with torch.enable_grad():
                x_new = (torch.tanh(w) + 1) / 2
                logits = model(x_new)
                l2sq = (x_new - x).flatten(1).pow(2).sum(1)
                loss = l2sq + const * margin_loss(logits, y, kappa, targeted)
                total = loss.sum()  # inside enable_grad, so the attack also runs under torch.no_grad()
            with torch.no_grad():
                ok = succeeded(logits, y, kappa, targeted) & active
                step_success |= ok
                better = ok & (l2sq < best_l2sq)
                best_l2sq = torch.where(better, l2sq, best_l2sq)
                best_adv = torch.where(better[:, None, None, None], x_new, best_adv)
                last = x_new.detach()
                if abort_early and it % check_every == 0:
                    active &= ~(loss > prev_loss * 0.9999)
                    prev_loss = torch.where(active, loss, prev_loss)
            if not active.any():
                break
            (w.grad,) = torch.autograd.grad(total, w)
            opt.step()

        upper = torch.where(step_success, torch.minimum(upper, const), upper)
        lower = torch.where(step_success, lower, torch.maximum(lower, const))
        bisect = upper < _C_UNBOUNDED / 10
        const = torch.where(bisect, (lower + upper) / 2, torch.where(step_success, const, const * 10))

    success = torch.isfinite(best_l2sq)
    return CWResult(best_adv.detach(), success, best_l2sq.sqrt(), const, last)


def cw_l2(model: Model, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1, kappa: float = 0.0,
          steps: int = 100, lr: float = 0.01, binary_steps: int = 5, targeted: bool = False,
          abort_early: bool = True) -> torch.Tensor:
    """Carlini-Wagner L2 with binary search over c; the minimum-norm success per sample, or x itself."""
    return cw_l2_details(model, x, y, c=c, kappa=kappa, steps=steps, lr=lr, binary_steps=binary_steps,
                         targeted=targeted, abort_early=abort_early).x_adv


def cw_l2_fixed_c(model: Model, x: torch.Tensor, y: torch.Tensor, *, c: float = 0.1, kappa: float = 0.0,
                  steps: int = 50, lr: float = 0.01, targeted: bool = False) -> torch.Tensor:
    """CW-L2 at one fixed constant c, as RegionSparse's paper runs it (no binary search, no abort-early): per
    sample the smallest successful iterate, else the last iterate rather than x, so that a later rescaling of
    the perturbation (`lib.attacks.strength.scale_to_normalized_l2`) can still grow an unsuccessful one."""
    res = cw_l2_details(model, x, y, c=c, kappa=kappa, steps=steps, lr=lr, binary_steps=1, targeted=targeted,
                        abort_early=False)
    return torch.where(res.success[:, None, None, None], res.x_adv, res.last)
