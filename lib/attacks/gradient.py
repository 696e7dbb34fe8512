"""Gradient-sign and projected-gradient attacks: FGSM, PGD (L-inf / L2), BIM, MI-FGSM, DI-FGSM.

All attacks are batched and device-agnostic, work in pixel space [0, 1], take one `torch.autograd.grad`
call over the whole batch per step (gradients w.r.t. the input only; the model's train/eval mode and
parameters are left alone) and return a detached tensor of x's shape, dtype and device.
Losses are summed over the batch, so each sample's gradient is independent of the batch it sits in.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_TINY = 1e-12  # guards per-sample normalisation of an all-zero gradient or perturbation
_LOSSES = ("ce", "cw")
_NORMS = ("linf", "l2")


def _check_inputs(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 1,
                  alpha: float | None = None) -> torch.Tensor:
    """Validate the common arguments (labels in the model's range) and return y as int64 on x's device."""
    check_attack_inputs(model, x, y)
    check_nonnegative(eps, "eps")
    check_positive_int(steps, "steps")
    if alpha is not None:
        check_nonnegative(alpha, "alpha")
    return y.to(device=x.device, dtype=torch.long)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logit margin max_{j != y} Z_j - Z_y (positive once y no longer wins)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return z_other - z_y


def _objectives(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-sample value the attacker ascends: CE / CW margin away from y, or towards target y when targeted."""
    value = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else _margin(logits, y)
    return -value if targeted else value


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Scalar the attacker ascends: the per-sample objectives summed over the batch."""
    return _objectives(logits, y, loss, targeted).sum()


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, *, loss: str = "ce",
                   targeted: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """Gradient of the attack objective w.r.t. x (one autograd.grad call), optionally through `transform`."""
    with torch.enable_grad():
        x_var = x.detach().requires_grad_(True)
        logits = model(x_var if transform is None else transform(x_var))
        (grad,) = torch.autograd.grad(_objective(logits, y, loss, targeted), x_var)
    return grad


def _per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample Lp norm, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _rand(shape: torch.Size, x: torch.Tensor, generator: torch.Generator | None, normal: bool = False
          ) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) noise drawn on the generator's device, moved to x's device."""
    device = generator.device if generator is not None else x.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform sample from the L-inf ball, or uniform in volume from the L2 ball, around x; clipped to [0, 1]."""
    if norm == "linf":
        delta = (2 * _rand(x.shape, x, generator) - 1) * eps
    else:
        direction = _rand(x.shape, x, generator, normal=True)
        direction = direction / (_per_sample_norm(direction, 2) + _TINY)
        dim = x[0].numel()
        radius = _rand((x.shape[0], *([1] * (x.dim() - 1))), x, generator) ** (1.0 / dim) * eps
        delta = direction * radius
    return (x + delta).clamp(0.0, 1.0)


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one signed-gradient step of size eps."""
    y = _check_inputs(model, x, y, eps)
    grad = input_gradient(model, x, y, targeted=targeted)
    return (x.detach() + eps * grad.sign()).clamp(0.0, 1.0)


class _BestIterate:
    """Per example, the most successful iterate seen so far: one that fools the model beats one that does not; among
    equals the higher attack objective wins (the best-iterate rule of Croce & Hein's APGD)."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.value = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)

    def update(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> None:
        with torch.no_grad():
            value = _objectives(logits, y, loss, targeted).to(self.value.dtype)
            hit = logits.argmax(1) == y
            fooled = hit if targeted else ~hit
            better = (fooled & ~self.fooled) | ((fooled == self.fooled) & (value > self.value))
            self.x[better], self.fooled[better], self.value[better] = x[better].detach(), fooled[better], value[better]


def _pgd_run(model: Model, x0: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int, norm: str,
             random_start: bool, targeted: bool, loss: str, generator: torch.Generator | None,
             best: _BestIterate | None) -> torch.Tensor:
    """One PGD run from x0 (or a random start in the ball); every iterate, the last included, is offered to `best`."""
    x_adv = _random_start(x0, eps, norm, generator) if random_start else x0.clone()
    lower, upper = (x0 - eps).clamp_min(0.0), (x0 + eps).clamp_max(1.0)
    for _ in range(steps):
        with torch.enable_grad():
            x_var = x_adv.detach().requires_grad_(True)
            logits = model(x_var)
            (grad,) = torch.autograd.grad(_objective(logits, y, loss, targeted), x_var)
        if best is not None:
            best.update(x_adv, logits, y, loss, targeted)
        if norm == "linf":
            x_adv = torch.clamp(x_adv + alpha * grad.sign(), lower, upper)
        else:
            delta = x_adv + alpha * grad / (_per_sample_norm(grad, 2) + _TINY) - x0
            scale = (eps / (_per_sample_norm(delta, 2) + _TINY)).clamp_max(1.0)
            x_adv = (x0 + delta * scale).clamp(0.0, 1.0)
    x_adv = x_adv.detach()
    if best is not None:
        with torch.no_grad():
            best.update(x_adv, model(x_adv), y, loss, targeted)
    return x_adv


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, targeted: bool = False,
        loss: str = "ce", restarts: int = 1, keep_best: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball, clipped to [0, 1] every step.

    alpha defaults to 2.5 * eps / steps. L-inf steps follow the gradient's sign; L2 steps follow the
    per-sample unit-L2 gradient and project back onto the ball. loss="cw" ascends the logit margin
    max_{j != y} Z_j - Z_y (unclamped, kappa = 0) instead of cross-entropy.
    By default the last iterate of one run is returned (Madry et al.'s PGD, as torchattacks and the papers run it).
    For evaluation, keep_best=True returns per example the best iterate of every step and `restarts` runs (an
    iterate that fools the model first, else the highest objective); restarts > 1 alone picks per example the best of
    the runs' last iterates. Restarts after the first always start at random.
    """
    y = _check_inputs(model, x, y, eps, steps, alpha)
    check_positive_int(restarts, "restarts")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    if restarts == 1 and not keep_best:
        return _pgd_run(model, x0, y, eps, alpha, steps, norm, random_start, targeted, loss, generator, None)
    best = _BestIterate(x0)
    for run in range(restarts):
        last = _pgd_run(model, x0, y, eps, alpha, steps, norm, random_start or run > 0, targeted, loss, generator,
                        best if keep_best else None)
        if not keep_best:
            with torch.no_grad():
                best.update(last, model(last), y, loss, targeted)
    return best.x


def pgd_l2(model: Model, x: torch.Tensor, y: torch.Tensor, **params) -> torch.Tensor:
    """PGD in the L2 ball: pgd(..., norm="l2")."""
    return pgd(model, x, y, norm="l2", **params)


def bim(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
        steps: int = 10, targeted: bool = False, loss: str = "ce") -> torch.Tensor:
    """Basic Iterative Method (Kurakin et al. 2017): L-inf PGD without a random start."""
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm="linf", random_start=False,
               targeted=targeted, loss=loss)


def _momentum_sign_attack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                          steps: int, decay: float, targeted: bool,
                          transform: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Iterative FGSM with momentum on the per-sample L1-normalised gradient, projected onto the L-inf ball."""
    x0 = x.detach()
    lower, upper = (x0 - eps).clamp_min(0.0), (x0 + eps).clamp_max(1.0)
    x_adv, momentum = x0.clone(), torch.zeros_like(x0)
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, targeted=targeted, transform=transform)
        momentum = decay * momentum + grad / (_per_sample_norm(grad, 1) + _TINY)
        x_adv = torch.clamp(x_adv + alpha * momentum.sign(), lower, upper)
    return x_adv.detach()


def mi_fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
            steps: int = 10, decay: float = 1.0, targeted: bool = False) -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al. 2018); alpha defaults to eps / steps, no random start."""
    y = _check_inputs(model, x, y, eps, steps, alpha)
    check_nonnegative(decay, "decay")
    alpha = eps / steps if alpha is None else alpha
    return _momentum_sign_attack(model, x, y, eps, alpha, steps, decay, targeted, transform=None)


def _uniform_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in [low, high] (inclusive), drawn on the generator's device (CPU by default)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=device))


def input_diversity(x: torch.Tensor, *, prob: float = 0.5, resize_rate: float = 0.9,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Xie et al. 2019 input diversity, one draw per batch as in torchattacks: with probability prob, resize
    the batch to a random side in [floor(resize_rate * W), W) and zero-pad it back to W at a random offset."""
    device = generator.device if generator is not None else "cpu"
    if float(torch.rand((), generator=generator, device=device)) >= prob:
        return x
    height, width = x.shape[-2:]
    side = _uniform_int(min(int(math.floor(resize_rate * width)), width - 1), width - 1, generator)
    pad_h, pad_w = height - side, width - side
    top, left = _uniform_int(0, pad_h, generator), _uniform_int(0, pad_w, generator)
    resized = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return F.pad(resized, (left, pad_w - left, top, pad_h - top), value=0.0)


def di_fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
            steps: int = 10, prob: float = 0.5, resize_rate: float = 0.9, decay: float = 0.0,
            targeted: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Diverse-inputs iterative FGSM (Xie et al. 2019): gradients through random resize-and-pad;
    decay > 0 adds MI-FGSM momentum (M-DI2-FGSM). alpha defaults to eps / steps."""
    y = _check_inputs(model, x, y, eps, steps, alpha)
    check_nonnegative(decay, "decay")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must lie in [0, 1], got {prob}")
    if not 0.0 < resize_rate < 1.0:
        raise ValueError(f"resize_rate must lie in (0, 1), got {resize_rate}")
    if x.shape[-2] != x.shape[-1]:
        raise ValueError(f"di_fgsm needs square images, got {tuple(x.shape[-2:])}")
    alpha = eps / steps if alpha is None else alpha

    def transform(t: torch.Tensor) -> torch.Tensor:
        return input_diversity(t, prob=prob, resize_rate=resize_rate, generator=generator)

    return _momentum_sign_attack(model, x, y, eps, alpha, steps, decay, targeted, transform=transform)
