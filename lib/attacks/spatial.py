"""Spatially transformed adversarial examples, stAdv (Xiao et al. 2018): a smooth per-pixel flow field.

The adversarial image samples x bilinearly at p + f(p) for every pixel p. The flow minimises
CW's margin loss + tau * L_flow(f), where L_flow sums, over each pixel and each of its 4 neighbours,
sqrt(|du|^2 + |dv|^2 + 1e-8) (the small constant keeps the gradient finite at zero flow).
Decision: the paper (and advertorch, used by paper 004) optimise with L-BFGS; we use Adam on the flow,
which batches cleanly and keeps every sample's optimisation independent of the others.
Per sample, the successful iterate with the smallest L_flow is returned; if none succeeded, the last
iterate (fail_mode="last", our default) or an all-zero image (fail_mode="zeros", advertorch's behaviour).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lib.attacks.cw import margin_loss, succeeded
from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_SQRT_EPS = 1e-8
FAIL_MODES = ("last", "zeros")


def flow_warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinearly resample x (N,C,H,W) at p + flow(p); flow (N,2,H,W) in pixels, channel 0 columns, 1 rows.

    Uses grid_sample with align_corners=True, so normalised -1 and +1 are the centres of the first and
    last pixels and a zero flow reproduces x; samples beyond the border repeat the edge pixel.
    """
    n, _, h, w = x.shape
    if flow.shape != (n, 2, h, w):
        raise ValueError(f"flow must have shape {(n, 2, h, w)}, got {tuple(flow.shape)}")
    rows = torch.arange(h, device=x.device, dtype=x.dtype).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=x.device, dtype=x.dtype).view(1, w).expand(h, w)
    grid = torch.stack((
        2 * (cols + flow[:, 0]) / max(w - 1, 1) - 1,
        2 * (rows + flow[:, 1]) / max(h - 1, 1) - 1,
    ), dim=-1)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.clamp(0.0, 1.0)


def flow_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """The paper's L_flow per sample: every pixel's flow difference to each 4-neighbour, as sqrt(. + 1e-8)."""
    d_cols = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    d_rows = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    per_pair = ((d_cols.pow(2).sum(1) + _SQRT_EPS).sqrt().flatten(1).sum(1)
                + (d_rows.pow(2).sum(1) + _SQRT_EPS).sqrt().flatten(1).sum(1))
    return 2 * per_pair  # each neighbouring pair appears once from either end in the paper's double sum


@dataclass(frozen=True)
class StAdvResult:
    """stAdv outputs: images, the flow behind each (best success or last iterate), and the success mask."""

    x_adv: torch.Tensor
    flow: torch.Tensor
    success: torch.Tensor


def stadv_details(model: Model, x: torch.Tensor, y: torch.Tensor, *, tau: float = 0.05, steps: int = 100,
                  kappa: float = 0.0, lr: float = 0.01, targeted: bool = False,
                  fail_mode: str = "last") -> StAdvResult:
    """Optimise a flow per sample with Adam; return the smoothest successful warp (see module docstring)."""
    check_attack_inputs(model, x, y)
    for value, name in ((tau, "tau"), (kappa, "kappa"), (lr, "lr")):
        check_nonnegative(value, name)
    check_positive_int(steps, "steps")
    if fail_mode not in FAIL_MODES:
        raise ValueError(f"fail_mode must be one of {FAIL_MODES}, got {fail_mode!r}")

    x = x.detach()
    n, _, h, w = x.shape
    view = (n, 1, 1, 1)
    flow = torch.zeros(n, 2, h, w, device=x.device, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([flow], lr=lr)
    best_smooth = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
    best_flow = torch.zeros_like(flow)
    best_adv = torch.zeros_like(x)

    for it in range(steps + 1):
        with torch.enable_grad():
            x_adv = flow_warp(x, flow)
            logits = model(x_adv)
            smooth = flow_smoothness(flow)
            loss = margin_loss(logits, y, kappa, targeted) + tau * smooth
        with torch.no_grad():
            better = succeeded(logits, y, kappa, targeted) & (smooth < best_smooth)
            best_smooth = torch.where(better, smooth, best_smooth)
            best_flow = torch.where(better.view(view), flow, best_flow)
            best_adv = torch.where(better.view(view), x_adv, best_adv)
        if it == steps:
            break
        (flow.grad,) = torch.autograd.grad(loss.sum(), flow)
        opt.step()

    success = torch.isfinite(best_smooth)
    last_adv = x_adv.detach() if fail_mode == "last" else torch.zeros_like(x)
    return StAdvResult(
        x_adv=torch.where(success.view(view), best_adv, last_adv).detach(),
        flow=torch.where(success.view(view), best_flow, flow.detach()),
        success=success,
    )


def stadv(model: Model, x: torch.Tensor, y: torch.Tensor, *, tau: float = 0.05, steps: int = 100,
          kappa: float = 0.0, lr: float = 0.01, targeted: bool = False, fail_mode: str = "last") -> torch.Tensor:
    """Spatial-transform attack (stAdv); returns the adversarial warps of x (see module docstring)."""
    return stadv_details(model, x, y, tau=tau, steps=steps, kappa=kappa, lr=lr, targeted=targeted,
                         fail_mode=fail_mode).x_adv
