"""AutoAttack (Croce & Hein 2020) through the official code, packaged on PyPI as `pyautoattack`.

The wrapper adapts it to the project's attack API: any logits callable, x/y in, x_adv out (x's shape,
dtype and device), global RNG state left as it was (AutoAttack reseeds torch). Its progress log is shown only when
verbose, but its checks (randomised model, zero gradients, Square beating the white-box attacks, ...) are never
silenced: each is raised as an `AutoAttackWarning`, which the evaluation records in its flags column.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Callable, Iterator, Sequence

import torch
from pyautoattack import AutoAttack, checks
from torch import nn

from lib.validate import check_attack_inputs, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]

_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
_VERSIONS = ("standard", "plus", "rand", "custom")
_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_LOGGER = "auto-attack"  # the logger pyautoattack reports through


class AutoAttackWarning(UserWarning):
    """One of AutoAttack's own checks failed (its message says which): the evaluation may be unreliable."""


class _WarningsAsPythonWarnings(logging.Handler):
    """Re-raise AutoAttack's logged warnings as AutoAttackWarning."""

    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(AutoAttackWarning(record.getMessage()), stacklevel=2)


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
    """Route AutoAttack's progress log to stdout when verbose; its warnings always become AutoAttackWarnings."""
    logger = logging.getLogger(_LOGGER)
    level, disabled, propagate = logger.level, logger.disabled, logger.propagate
    handlers = [_WarningsAsPythonWarnings(logging.WARNING)]
    if verbose:
        handlers.append(logging.StreamHandler(sys.stdout))
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.disabled, logger.propagate = False, False
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled, logger.propagate = disabled, propagate


def autoattack(model: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
               version: str = "standard", attacks: Sequence[str] | None = None, seed: int = 0,
               n_iter: int | None = None, n_queries: int | None = None, eot_iter: int | None = None,
               n_target_classes: int | None = None, verbose: bool = False, targeted: bool = False) -> torch.Tensor:
    """Run AutoAttack (untargeted) with budget eps in the given norm and return its adversarial examples.

    version="custom" runs only `attacks` (e.g. ["apgd-ce"]). n_iter overrides the iterations of APGD and
    FAB (100 in the official settings) and n_queries Square's query budget (5000), for quick runs. version="rand"
    (for randomised defenses) runs APGD-CE and APGD-DLR with EOT over 20 draws per gradient, eot_iter changes that.
    Targeted variants (apgd-t, fab-t) cycle through min(9, K - 1) target classes, or n_target_classes (a dry run's
    minimum) when given.
    """
    n_classes = check_attack_inputs(model, x, y)
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
    for value, name in ((n_iter, "n_iter"), (n_queries, "n_queries"), (eot_iter, "eot_iter"),
                        (n_target_classes, "n_target_classes")):
        if value is not None:
            check_positive_int(value, name)

    net = model if isinstance(model, nn.Module) else _CallableModule(model)
    y = y.to(x.device)
    devices = [x.device] if x.device.type == "cuda" else []
    for name in checks.funcs:   # its dynamic-defense check counts gradient calls in module-level counters it never
        checks.funcs[name] = 0  # resets: one flagged model would otherwise flag every model checked after it
    with _logging(verbose), torch.random.fork_rng(devices=devices):
        adversary = AutoAttack(net, norm=_NORMS[norm.lower()], eps=float(eps), version=version,
                               attacks=list(attacks) if attacks is not None else None, seed=seed,
                               device=x.device)
        adversary.verbose = verbose
        targets = min(n_target_classes or adversary.apgd_targeted.n_target_classes, n_classes - 1)
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
        if n_iter is not None:
            _set_iterations(adversary.apgd, n_iter)
            _set_iterations(adversary.apgd_targeted, n_iter)
            adversary.fab.n_iter = n_iter
        if n_queries is not None:
            adversary.square.n_queries = n_queries
        if eot_iter is not None:
            adversary.apgd.eot_iter = adversary.apgd_targeted.eot_iter = eot_iter
        x_adv, _ = adversary.run_standard_evaluation(x.detach().float(), y, batch_size=x.shape[0])
    return x_adv.detach().to(x.dtype).clamp(0.0, 1.0)
