"""Adaptive-attack wrappers that let gradient attacks see through a defense.

- BPDA (Athalye et al. 2018): run a non-differentiable step forward, differentiate a surrogate backward
  (identity by default: the straight-through estimator).
- EOT (Athalye et al. 2018): average a randomised model over independent draws. Averaging the logits over
  `samples` draws and differentiating the average gives the mean of the per-draw gradients, a Monte-Carlo
  estimate of the gradient of the expected logits, which is what an attack on a random defense must follow.
- attack_surface: the composition an adaptive (white-box) attacker differentiates, built from a
  classifier and a `lib.defenses.base.Defense` according to its `differentiable` / `randomized` flags.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lib.validate import check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]


class _BPDAFunction(torch.autograd.Function):
    """forward_fn forward (no graph), gradient of backward_fn (or identity) backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_fn: Model, backward_fn: Model | None) -> torch.Tensor:
        out = forward_fn(x.detach())
        out = torch.as_tensor(out) if isinstance(out, np.ndarray) else out
        out = out.to(device=x.device, dtype=x.dtype)
        if backward_fn is None and out.shape != x.shape:
            raise ValueError(f"identity BPDA needs forward_fn to keep the shape {tuple(x.shape)}, "
                             f"got {tuple(out.shape)}; pass a backward_fn")
        ctx.backward_fn = backward_fn
        if backward_fn is not None:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.backward_fn is None:
            return grad_out, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(ctx.backward_fn(x_var), x_var, grad_out)
        return grad, None, None


class BPDA(nn.Module):
    """A step whose forward is forward_fn(x) and whose backward is the gradient of backward_fn at x."""

    def __init__(self, forward_fn: Model, backward_fn: Model | None = None):
        super().__init__()
        self.forward_fn = forward_fn
        self.backward_fn = backward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BPDAFunction.apply(x, self.forward_fn, self.backward_fn)


def bpda(forward_fn: Model, backward_fn: Model | None = None) -> BPDA:
    """Wrap a (possibly non-differentiable, e.g. NumPy/OpenCV) batch transform for BPDA.

    forward_fn runs without a graph and may return a tensor or a NumPy array (moved to x's device and
    dtype); backward_fn is a differentiable approximation of it, identity (straight-through) when None.
    """
    return BPDA(forward_fn, backward_fn)


class EOT(nn.Module):
    """Mean logits of a randomised model over `samples` independent draws (Expectation over Transformation).

    The batch is repeated `samples` times and evaluated in calls of at most `max_batch` images (default:
    all at once), so each input gets `samples` independent draws of the model's randomness.
    """

    def __init__(self, model: Model, samples: int, max_batch: int | None = None):
        super().__init__()
        check_positive_int(samples, "samples")
        if max_batch is not None:
            check_positive_int(max_batch, "max_batch")
        self.model = model
        self.samples = samples
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeated = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        chunks = repeated.split(self.max_batch) if self.max_batch is not None else (repeated,)
        logits = torch.cat([self.model(chunk) for chunk in chunks])
        return logits.view(self.samples, x.shape[0], *logits.shape[1:]).mean(0)


class _Pipeline(nn.Module):
    """classifier(purify(x)), with both parts registered so the pipeline moves and reports mode as one."""

    def __init__(self, classifier: Model, purify: Model, defense: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.defense = defense
        self.purify = purify

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x))


def attack_surface(classifier: Model, defense: nn.Module, *, eot_samples: int = 1,
                   backward_fn: Model | None = None, force_bpda: bool = False) -> nn.Module:
    """The model a white-box/adaptive attacker differentiates: classifier(defense.purify(x)).

    A non-differentiable defense is wrapped in BPDA, whose backward is the gradient of backward_fn (a
    differentiable approximation of purify: the defense's own `bpda_purify` when it has one, else the
    identity); force_bpda does so for a differentiable one too (the papers' "BPDA" rows). A randomised
    defense is wrapped in EOT over eot_samples draws when eot_samples > 1.
    """
    check_positive_int(eot_samples, "eot_samples")
    backward_fn = backward_fn or getattr(defense, "bpda_purify", None)
    purify = defense.purify if defense.differentiable and not force_bpda else bpda(defense.purify, backward_fn)
    surface: nn.Module = _Pipeline(classifier, purify, defense)
    if defense.randomized and eot_samples > 1:
        surface = EOT(surface, eot_samples)
    return surface
