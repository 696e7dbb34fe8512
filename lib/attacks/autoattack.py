"""AutoAttack (Croce & Hein 2020) through the official code, packaged on PyPI as `pyautoattack`.

The wrapper adapts it to the project's attack API: any logits callable, x/y in, x_adv out (x's shape,
dtype and device), quiet unless verbose, global RNG state left as it was (AutoAttack reseeds torch).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator, Sequence

import torch
from pyautoattack import AutoAttack
from torch import nn

from lib.validate import check_images, check_labels, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_VERSIONS = ("standard", "plus", "rand", "custom")
_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_LOGGER = "auto-attack"  # the logger pyautoattack reports through


class _CallableModule(nn.Module):
    """Expose a plain logits callable as the nn.Module AutoAttack expects."""

    def __init__(self, fn: Model):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _set_iterations(apgd, n_iter: int) -> None:
    """Change an APGD attack's iteration count and the step-size checkpoints its constructor derives from it."""
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Route AutoAttack's log to stdout when verbose, silence it (warnings included) otherwise."""
    logger = logging.getLogger(_LOGGER)
    level, disabled = logger.level, logger.disabled
    handler = logging.StreamHandler(sys.stdout) if verbose else None
    if handler is not None:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    logger.disabled = not verbose
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled


def autoattack(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
               version: str = "standard", attacks: Sequence[str] | None = None, seed: int = 0,
               n_iter: int | None = None, n_queries: int | None = None, verbose: bool = False,
               targeted: bool = False) -> torch.Tensor:
    """Run AutoAttack (untargeted) with budget eps in the given norm and return its adversarial examples.

    version="custom" runs only `attacks` (e.g. ["apgd-ce"]). n_iter overrides the iterations of APGD and
    FAB (100 in the official settings) and n_queries Square's query budget (5000), for quick runs.
    Targeted variants (apgd-t, fab-t) cycle through min(9, K - 1) target classes.
    """
    check_images(x)
    check_labels(y, x.shape[0])
    check_nonnegative(eps, "eps")
    if targeted:
        raise ValueError("autoattack is untargeted; use version='custom' with attacks=['apgd-t'] for its "
                         "targeted APGD, or pgd(..., targeted=True) for a chosen target")
    if norm.lower() not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(set(_NORMS.values()))}, got {norm!r}")
    if version not in _VERSIONS:
        raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
    if version == "custom":
        unknown = [a for a in (attacks or []) if a not in _ATTACKS]
        if not attacks or unknown:
            raise ValueError(f"version='custom' needs attacks from {_ATTACKS}, got {attacks!r}")
    elif attacks is not None:
        raise ValueError(f"attacks is only used with version='custom', got version={version!r}")
    for value, name in ((n_iter, "n_iter"), (n_queries, "n_queries")):
        if value is not None:
            check_positive_int(value, name)

    net = model if isinstance(model, nn.Module) else _CallableModule(model)
    y = y.to(x.device)
    devices = [x.device] if x.device.type == "cuda" else []
    with _logging(verbose), torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            n_classes = net(x[:1].float()).shape[1]
        adversary = AutoAttack(net, norm=_NORMS[norm.lower()], eps=float(eps), version=version,
                               attacks=list(attacks) if attacks is not None else None, seed=seed,
                               device=x.device)
        adversary.verbose = verbose
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_classes - 1)
        if n_iter is not None:
            _set_iterations(adversary.apgd, n_iter)
            _set_iterations(adversary.apgd_targeted, n_iter)
            adversary.fab.n_iter = n_iter
        if n_queries is not None:
            adversary.square.n_queries = n_queries
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y, batch_size=x.shape[0])
    return x_adv.detach().to(x.dtype).clamp(0.0, 1.0)
