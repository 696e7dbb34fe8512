"""Training of paper 003's networks: R_θ on (Q_k(x̃), x) pairs (spec-003 §2.4-2.5) and the paper's classifiers.

`train_edsr` trains R_θ in place through the project's one loop (`lib.train.fit`) with EDSR's step
schedule; `trained_reconstruction` builds, trains and caches the whole defense; `build` is the defense
factory of the registry (the profile's settings for one dataset); `trained_paper_classifier` trains and
caches one of the paper's classifiers, optionally with Kurakin-style adversarial training (Table 4, §2.8).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from lib import cache
from lib.adversarial_training import kurakin_training_loss
from lib.attacks import fgsm
from lib.data import ImageData, load_dataset
from lib.defenses.base import Built, NotBuiltForDataset
from lib.defenses.reconstruction.defense import (
    ReconstructionDefense,
    check_levels,
    quantize,
)
from lib.defenses.reconstruction.losses import restorer_loss
from lib.defenses.reconstruction.networks import EDSRRestorer
from lib.evaluate import accuracy, model_digest
from lib.models import build_classifier
from lib.profiles import notebook_config
from lib.runtime import get_device, seed_everything
from lib.train import TrainConfig, cached_model, descend, fit, fit_classifier
from lib.validate import (
    check_images,
    check_labels,
    check_nonnegative,
    check_positive_int,
)

NOTEBOOK = "04_image_reconstruction"
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RestorerConfig:
    """R_θ and its training (spec §2.3-2.5): EDSR-baseline B=16, F=64, Adam 1e-4, batch 64, p_adv 0.5."""

    levels: int = 4
    eps_max: float = 0.1           # FGSM strength of the adversarial training inputs (dataset's largest ε)
    n_feats: int = 64
    n_blocks: int = 16
    res_scale: float = 1.0
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4               # halved at 50% and 75% of the epochs
    p_adv: float = 0.5             # fraction of training inputs replaced by their FGSM version, redrawn per epoch
    seed: int = 0

    def __post_init__(self) -> None:
        check_levels(self.levels)
        check_nonnegative(self.eps_max, "eps_max")
        for name in ("n_feats", "n_blocks", "epochs", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if not 0.0 <= self.p_adv <= 1.0:
            raise ValueError(f"p_adv must lie in [0, 1], got {self.p_adv}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def edsr_lr_factor(epoch: int, epochs: int) -> float:
    """EDSR-style step schedule: 1, then 1/2 from 50% of the epochs, 1/4 from 75%."""
    return 0.5 ** sum(epoch >= m * epochs for m in (0.5, 0.75))


def train_edsr(restorer: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, cfg: RestorerConfig, *,
                   device: torch.device | None = None, checkpoint: Path | None = None) -> list[dict]:
    """Train R_θ in place with eq. (4) on (Q_k(x̃), x), x̃ = x_adv with probability p_adv else x (§2.4).

    Each epoch draws, from its own generator, which images are replaced by x_adv and the batch order.
    With `checkpoint`, state is saved atomically after every epoch and an interrupted run resumes.
    Returns the per-epoch history (mean eq.-(4) loss, learning rate, share of adversarial inputs).
    """
    check_images(x_clean, "x_clean")
    check_images(x_adv, "x_adv")
    if x_clean.shape != x_adv.shape:
        raise ValueError(f"x_clean and x_adv shapes differ: {tuple(x_clean.shape)} vs {tuple(x_adv.shape)}")
    opt = torch.optim.Adam(restorer.parameters(), lr=cfg.lr)
    n = len(x_clean)

    def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        use_adv = torch.rand(n, generator=gen) < cfg.p_adv
        return use_adv, torch.randperm(n, generator=gen)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        use_adv, order = draw(epoch)
        for idx in order.split(cfg.batch_size):
            target = x_clean[idx]
            yield torch.where(use_adv[idx].view(-1, 1, 1, 1), x_adv[idx], target), target

    def step(source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"loss": descend(opt, restorer_loss(restorer(quantize(source, cfg.levels)), target))}

    def adv_fraction(epoch: int) -> dict[str, float]:
        return {"adv_fraction": float(draw(epoch)[0].float().mean())}

    return fit(step, batches, epochs=cfg.epochs, modules={"restorer": restorer}, optimizers={"restorer": opt},
               lr_factor=edsr_lr_factor, seed=cfg.seed, device=device, checkpoint=checkpoint,
               desc="reconstruction/R_θ", epoch_end=adv_fraction)


def fgsm_examples(classifier: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, batch_size: int = 256,
                  device: torch.device | None = None) -> torch.Tensor:
    """FGSM(ε) versions of x on `classifier` (true labels), computed in batches on `device`, returned on CPU."""
    check_images(x)
    check_labels(y, len(x))
    device = device or get_device()
    return torch.cat([fgsm(classifier, xb.to(device), yb.to(device), eps=eps).cpu()
                      for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def trained_reconstruction(classifier: nn.Module, train: ImageData, cfg: RestorerConfig, *,
                           device: torch.device | None = None) -> tuple[ReconstructionDefense, dict]:
    """R_θ trained on `train` with FGSM(eps_max) examples of `classifier`, cached by config, data and weights.

    Returns (ReconstructionDefense in eval mode, metadata incl. history, train_seconds, cache_hit, cache_key).
    """
    device = device or get_device()

    def build_restorer() -> nn.Module:
        seed_everything(cfg.seed)
        return EDSRRestorer(train.info.channels, cfg.n_feats, cfg.n_blocks, cfg.res_scale)

    def train_it(restorer: nn.Module, partial: Path) -> dict:
        x_adv = fgsm_examples(classifier, train.x, train.y, cfg.eps_max, device=device)
        history = train_edsr(restorer, train.x, x_adv, cfg, device=device, checkpoint=partial)
        return {"history": history, "final_loss": history[-1]["loss"], "train_size": len(train)}

    config = {"restorer": asdict(cfg), "data": cache.tensor_digest(train.x, train.y),
              "classifier": model_digest(classifier)}
    restorer, meta = cached_model("reconstruction/restorer", config, build_restorer, train_it,
                                  code=(train_edsr, quantize, restorer_loss), device=device)
    return ReconstructionDefense(restorer, cfg.levels).to(device).eval(), meta


def restorer_setup(profile: Mapping[str, Any], dataset: str) -> tuple[ImageData, RestorerConfig]:
    """R_θ's training subset and configuration for `dataset` from the profile's 04_image_reconstruction section
    (its per-dataset levels, eps_max and restorer overrides)."""
    cfg = notebook_config(profile, NOTEBOOK)
    if dataset not in cfg["per_dataset"]:
        raise NotBuiltForDataset(f"profile {profile['name']!r} has no reconstruction settings for {dataset!r}; "
                         f"it has: {', '.join(cfg['per_dataset'])}")
    ds = cfg["per_dataset"][dataset]
    train = load_dataset(dataset, "train", n=ds.get("train_size", cfg["train_size"]), seed=profile["seed"])
    rcfg = RestorerConfig(levels=ds["levels"], eps_max=ds["eps_max"], seed=profile["seed"],
                          **{**cfg["restorer"], **ds.get("restorer", {})})
    return train, rcfg


def build(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
          device: torch.device | None = None) -> Built:
    """The defense factory: compression Q_k + R_θ for `dataset` in front of `classifier`, R_θ trained (cached)
    on FGSM examples of `classifier` with the profile's settings. meta adds `history` and `cache_hit`."""
    train, rcfg = restorer_setup(profile, dataset)
    defense, meta = trained_reconstruction(classifier, train, rcfg, device=device)
    return Built(defense, classifier, {"config": {"dataset": dataset, "train_size": len(train), **asdict(rcfg)},
                                       "train_seconds": float(meta["train_seconds"]), "cache_key": meta["cache_key"],
                                       "cache_hit": meta["cache_hit"], "history": meta["history"]})


def trained_paper_classifier(arch: str, train: ImageData, test: ImageData, cfg: TrainConfig, *, width: float = 1.0,
                             adversarial: str | None = None, adv_max_steps: int | None = None,
                             device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """One of the paper's classifiers (lib.models name `arch`) trained on `train`, cached; meta has test accuracy.

    `adversarial` 'fgsm' / 'bim' trains with lib.adversarial_training.kurakin_training_loss.
    """
    device = device or get_device()
    info = train.info
    loss_fn = None if adversarial is None else kurakin_training_loss(adversarial, max_steps=adv_max_steps)

    def build_model() -> nn.Module:
        seed_everything(cfg.seed)
        return build_classifier(arch, num_classes=info.num_classes, in_channels=info.channels,
                                image_size=info.image_size, mean=info.mean, std=info.std, width=width)

    def train_it(model: nn.Module, partial: Path) -> dict:
        history = fit_classifier(model, train, cfg, device=device, checkpoint=partial, loss_fn=loss_fn,
                                 desc=f"{info.name}/{arch}" + (f"/adv-{adversarial}" if adversarial else ""))
        return {"test_accuracy": accuracy(model, test.x, test.y, device=device), "final_loss": history[-1]["loss"]}

    config = {"dataset": info.name, "arch": arch, "width": width, "train": asdict(cfg),
              "adversarial": adversarial, "adv_max_steps": adv_max_steps,
              "train_data": cache.tensor_digest(train.x, train.y), "test_data": cache.tensor_digest(test.x, test.y)}
    code = (kurakin_training_loss,) if adversarial else ()
    return cached_model(f"reconstruction/classifiers/{info.name}", config, build_model, train_it, code=code,
                        device=device)
