"""Training SFM-Defense (Algorithm 1): cross-entropy epochs of F on T(x), alternating with epochs of the masker G.

E_pre pre-training epochs of F on squeezed images T(x), then E rounds of (one F epoch, one G epoch on Eq. 2 with F
frozen in eval mode). The masker sees T(x) during training (M(T(x)) as Algorithm 1 is written; inference is
T(M(x)), spec-000 §8 item 3). Every epoch goes through the project's one loop, `lib.train.fit`. Mask statistics
are logged every G epoch and a mask that ends collapsed (all zeros) or trivial (all ones) is reported.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lib import cache
from lib.data import ImageData
from lib.defenses.base import Built, Defense
from lib.defenses.sfm.defense import SFMDefense
from lib.defenses.sfm.losses import check_reduction, sfm_losses
from lib.defenses.sfm.networks import AttentionUNet, SFMPair
from lib.evaluate import in_batches
from lib.runtime import get_device, seed_everything
from lib.train import augment_batch, cached_model, constant_lr, descend, fit, frozen, tensor_batches
from lib.validate import check_positive_int

ZERO_LEVEL, ONE_LEVEL = 0.01, 0.99
Log = Callable[[str], None]


@dataclass(frozen=True)
class SFMConfig:
    """Hyper-parameters of SFM-Defense training; defaults follow spec-000 §2.6 / §7(b)."""

    base_width: int = 64
    depth: int = 5
    w1: float = 2.5e-3
    w2: float = 1.0
    w3: float = 1.0
    reduction: str = "batch_tensor"
    seg_reduction: str = "mean"
    batch_size: int = 128
    pre_epochs: int = 10
    epochs: int = 50
    clf_optimizer: str = "sgd"
    clf_lr: float = 0.05
    clf_momentum: float = 0.9
    clf_weight_decay: float = 5e-4
    masker_lr: float = 0.01
    masker_momentum: float = 0.9
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_reduction(self.reduction, self.seg_reduction)
        if self.clf_optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown clf_optimizer {self.clf_optimizer!r}; valid: sgd, adam")
        for name in ("base_width", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if self.pre_epochs < 0 or self.epochs < 0:
            raise ValueError(f"pre_epochs and epochs must be >= 0, got {self.pre_epochs}, {self.epochs}")
        if min(self.w1, self.w2, self.w3) < 0:
            raise ValueError(f"loss weights must be >= 0, got {(self.w1, self.w2, self.w3)}")
        if not (self.clf_lr > 0 and self.masker_lr > 0):
            raise ValueError(f"learning rates must be positive, got {self.clf_lr}, {self.masker_lr}")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.w1, self.w2, self.w3)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SFMConfig":
        """Build from a profile section, ignoring keys that are not SFM hyper-parameters."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# --------------------------------------------------------------------------- mask statistics


def mask_statistics(mask: torch.Tensor) -> dict[str, float]:
    """Mean mask value and the fractions of entries below 0.01 (removed) and above 0.99 (kept)."""
    return {"mask_mean": float(mask.mean()), "mask_frac_zero": float((mask < ZERO_LEVEL).float().mean()),
            "mask_frac_one": float((mask > ONE_LEVEL).float().mean())}


def mask_status(stats: Mapping[str, float], collapse_fraction: float = 0.95) -> str:
    """'collapsed to zeros', 'identity (all ones)' or 'partial' (neither), from mask_statistics."""
    if stats["mask_frac_zero"] >= collapse_fraction or stats["mask_mean"] < ZERO_LEVEL:
        return "collapsed to zeros"
    if stats["mask_frac_one"] >= collapse_fraction or stats["mask_mean"] > ONE_LEVEL:
        return "identity (all ones)"
    return "partial"


def last_masker_epoch(history: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The history row of the last SFM (masker) epoch of a train_sfm history, None if there was none."""
    rows = [r for r in history if r.get("phase") == "masker"]
    return rows[-1] if rows else None


def final_mask_status(history: list[Mapping[str, Any]]) -> str:
    """The mask status of the last SFM epoch in a train_sfm history ('not trained' if there was none)."""
    last = last_masker_epoch(history)
    return last["mask_status"] if last is not None else "not trained"


# --------------------------------------------------------------------------- the two phases of Algorithm 1


def classifier_optimizer(classifier: nn.Module, cfg: SFMConfig) -> torch.optim.Optimizer:
    """The optimizer of F's cross-entropy epochs."""
    if cfg.clf_optimizer == "adam":
        return torch.optim.Adam(classifier.parameters(), lr=cfg.clf_lr, weight_decay=cfg.clf_weight_decay)
    return torch.optim.SGD(classifier.parameters(), lr=cfg.clf_lr, momentum=cfg.clf_momentum,
                           weight_decay=cfg.clf_weight_decay)


def masker_optimizer(masker: nn.Module, cfg: SFMConfig) -> torch.optim.Optimizer:
    """SGD on the masker's parameters only (Algorithm 1)."""
    return torch.optim.SGD(masker.parameters(), lr=cfg.masker_lr, momentum=cfg.masker_momentum)


def classifier_epochs(classifier: nn.Module, x_t: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                      cfg: SFMConfig, first_seed: int, epochs: int = 1, *, device: torch.device | None = None,
                      desc: str = "SFM classifier") -> list[dict[str, float]]:
    """Cross-entropy epochs of F on already squeezed images T(x) (Algorithm 1, step 1); the masker is not used.

    Epoch e shuffles (and augments, when cfg.augment) with seed first_seed + e. One history row per epoch
    with the mean cross-entropy `ce` and the training accuracy `train_acc` (%).
    """

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(first_seed + epoch)
        for xb, yb in tensor_batches(x_t, y, batch_size=cfg.batch_size, seed=first_seed + epoch):
            yield (augment_batch(xb, gen) if cfg.augment else xb), yb

    def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
        logits = classifier(xb)
        ce = descend(opt, F.cross_entropy(logits, yb))
        return {"ce": ce, "train_acc": 100.0 * float((logits.argmax(1) == yb).float().mean())}

    return fit(step, batches, epochs=epochs, modules={"classifier": classifier}, optimizers={"classifier": opt},
               lr_factor=constant_lr, seed=first_seed, device=device, desc=desc)


def masker_epoch(classifier: nn.Module, masker: nn.Module, x_t: torch.Tensor, opt: torch.optim.Optimizer,
                 cfg: SFMConfig, seed: int, *, device: torch.device | None = None,
                 desc: str = "SFM masker") -> dict[str, Any]:
    """One SFM epoch (Algorithm 1, step 2) on x_t = T(x): steps on G with Eq. 2; F frozen in eval mode, labels unused.

    Returns the epoch means (weighted by batch size) of the three loss terms, L_mask (`L_total`) and the mask
    statistics, and the mask status they give.
    """

    def step(xb: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            logits_clean = classifier(xb)
        mask = masker(xb)
        x_tilde = xb * mask
        terms = sfm_losses(xb, x_tilde, logits_clean, classifier(x_tilde), cfg.weights, cfg.reduction,
                           cfg.seg_reduction)
        descend(opt, terms["total"])
        return {f"L_{k}": float(v.detach()) for k, v in terms.items()} | mask_statistics(mask.detach())

    with frozen(classifier):
        row = fit(step, lambda _epoch: tensor_batches(x_t, batch_size=cfg.batch_size, seed=seed), epochs=1,
                  modules={"masker": masker}, optimizers={"masker": opt}, lr_factor=constant_lr, seed=seed,
                  device=device, desc=desc)[0]
    stats = {k: v for k, v in row.items() if k not in ("epoch", "lr")}
    return {**stats, "mask_status": mask_status(stats)}


def train_sfm(classifier: nn.Module, masker: nn.Module, preprocess: Defense, data: ImageData, cfg: SFMConfig, *,
              device: torch.device | None = None, log: Log | None = print) -> list[dict[str, Any]]:
    """Algorithm 1 in place: E_pre cross-entropy epochs of F on T(x), then E alternating (F epoch, SFM epoch) rounds.

    T is deterministic, so T(train set) is computed once. Every SFM epoch logs the mask statistics and
    its status; a mask that ends collapsed (all zeros) or trivial (all ones) raises a warning.
    Returns one history row per epoch (phase 'pretrain', 'classifier' or 'masker').
    """
    device = device or get_device()
    classifier.to(device)
    masker.to(device)
    preprocess.to(device).eval()
    x_t = in_batches(preprocess.purify, data.x, batch_size=512, device=device)
    clf_opt, mask_opt = classifier_optimizer(classifier, cfg), masker_optimizer(masker, cfg)
    say = log or (lambda _msg: None)
    history: list[dict[str, Any]] = []
    if cfg.pre_epochs:
        pre = classifier_epochs(classifier, x_t, data.y, clf_opt, cfg, cfg.seed * 1000, cfg.pre_epochs, device=device,
                                desc="SFM pretrain")
        for row in pre:
            history.append({"phase": "pretrain", **row})
            say(f"pretrain {row['epoch']}/{cfg.pre_epochs}: CE {row['ce']:.4f}, train acc {row['train_acc']:.1f}%")
    for epoch in range(cfg.epochs):
        seed = cfg.seed * 1000 + cfg.pre_epochs + epoch
        row = classifier_epochs(classifier, x_t, data.y, clf_opt, cfg, seed, device=device)[0]
        history.append({"phase": "classifier", **row, "epoch": epoch + 1})
        stats = masker_epoch(classifier, masker, x_t, mask_opt, cfg, seed, device=device)
        history.append({"phase": "masker", "epoch": epoch + 1, **stats})
        say(f"round {epoch + 1}/{cfg.epochs}: CE {row['ce']:.4f} | L_mask {stats['L_total']:.4g} (sp {stats['L_sp']:.4g}, "
            f"seg {stats['L_seg']:.4f}, recon {stats['L_recon']:.4g}) | mask mean {stats['mask_mean']:.3f}, "
            f"<0.01 {stats['mask_frac_zero']:.3f}, >0.99 {stats['mask_frac_one']:.3f} [{stats['mask_status']}]")
    final = final_mask_status(history)
    if final not in ("partial", "not trained"):
        warnings.warn(f"SFM mask ended {final} (w = {cfg.weights}, reduction {cfg.reduction}); see spec-000 §2.5.1",
                      RuntimeWarning, stacklevel=2)
    return history


def trained_sfm(build_classifier: Callable[[], nn.Module], preprocess: Defense, preprocess_config: Mapping[str, Any],
                data: ImageData, cfg: SFMConfig, *, key: Mapping[str, Any], device: torch.device | None = None,
                log: Log | None = print) -> Built:
    """F and G trained by train_sfm (or loaded from the cache): Built(SFMDefense(G, T), F, metadata).

    `key` describes the classifier architecture and dataset, `preprocess_config` the squeezer T; together
    with cfg, the training data digest and the source code they key the cache entry. Metadata: `config` (cfg's
    values), `train_seconds`, `cache_key`, `cache_hit`, `history` (train_sfm's), `mask_status`, `train_size`.
    """
    device = device or get_device()

    def build() -> SFMPair:
        seed_everything(cfg.seed)
        return SFMPair(build_classifier(), AttentionUNet(data.info.channels, cfg.base_width, cfg.depth))

    def train(pair: SFMPair, _partial: Path) -> dict:
        t0 = time.perf_counter()
        history = train_sfm(pair.classifier, pair.masker, preprocess, data, cfg, device=device, log=log)
        return {"history": history, "train_seconds": time.perf_counter() - t0, "train_size": len(data),
                "mask_status": final_mask_status(history)}

    config = {"model": dict(key), "preprocess": dict(preprocess_config), "sfm": asdict(cfg),
              "train_data": cache.tensor_digest(data.x, data.y)}
    pair, meta = cached_model("sfm", config, build, train, code=(type(preprocess), train_sfm, sfm_losses, SFMDefense),
                              device=device)
    defense = SFMDefense(pair.masker, preprocess).to(device).eval()
    return Built(defense, pair.classifier, {**meta, "config": asdict(cfg)})
