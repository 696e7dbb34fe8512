"""IDFR's two trainings (spec-001 Alg. 1 and 2), both through lib.train.fit, and their cached versions.

- train_denoiser: Adam on the ID loss over adversarial examples (one (attack, eps) configuration per image,
  crafted white-box on the target: `mixture_adversarial`) plus Gaussian-noised clean copies, redrawn every epoch.
- train_feature_restorer: Adam on Eq. 6 over fresh convex-hull mixtures (`ConvexHullSampler`) of the post-ID training
  embeddings (`FeaturePool`, `feature_pool`).
- trained_denoiser / trained_idfr: build, train and cache them for one frozen target from an `IDFRSetting` (the
  training images, attack grid and configurations; `IDFRSetting.from_profile` reads the profile's 02_idfr section).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lib import cache
from lib.defenses.base import NotBuiltForDataset
from lib.defenses.idfr.losses import ID_LOSSES, fr_loss, id_loss
from lib.defenses.idfr.networks import FeatureRestorer, IDFRClassifier, InputDenoiser
from lib.evaluate import AttackSpec, adversarial_set, model_digest
from lib.runtime import get_device, seed_everything
from lib.train import cached_model, constant_lr, descend, fit, frozen
from lib.validate import (
    check_images,
    check_labels,
    check_nonnegative,
    check_positive_int,
)

PAIRINGS = ("paper", "code")
FR_POOLS = ("all_configs", "train_mix")
NOTEBOOK = "02_idfr"


@dataclass(frozen=True)
class IDConfig:
    """ID training: paper Adam lr 0.01, 100 epochs; batch 128 from the authors' code; m noisy copies of sigma (spec §2.4)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    loss: str = "ce"
    noise_copies: int = 2
    noise_sigma: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_nonnegative(self.noise_sigma, "noise_sigma")
        if self.loss not in ID_LOSSES:
            raise ValueError(f"unknown ID loss {self.loss!r}; valid: {', '.join(ID_LOSSES)}")
        if int(self.noise_copies) != self.noise_copies or self.noise_copies < 0:
            raise ValueError(f"noise_copies must be an integer >= 0, got {self.noise_copies}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class FRConfig:
    """FR training: paper Adam lr 0.01, 80 epochs; 500 steps of 96 mixtures per epoch from the authors' code."""

    epochs: int = 80
    steps_per_epoch: int = 500
    batch_size: int = 96
    lr: float = 0.01
    pairing: str = "paper"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on CPU inside the block: the FR's tiny matrix products run slower with thread hand-offs
    (measured 5.5 ms vs up to 0.19 s per step on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- input denoiser

def train_denoiser(denoiser: nn.Module, classifier: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
                   y: torch.Tensor, cfg: IDConfig, device: torch.device | None = None) -> list[dict]:
    """Algorithm 1: Adam on id_loss over AEs x_adv (clean originals x_clean, labels y) plus cfg.noise_copies
    Gaussian copies clip01(x_clean + N(0, sigma^2)), redrawn every epoch. The classifier stays frozen (eval mode).
    Returns lib.train.fit's history (mean loss per epoch)."""
    check_images(x_adv, "x_adv")
    check_images(x_clean, "x_clean")
    check_labels(y, len(x_clean))
    if x_adv.shape != x_clean.shape:
        raise ValueError(f"x_adv and x_clean must have one shape, got {tuple(x_adv.shape)} and {tuple(x_clean.shape)}")
    device = device or get_device()
    denoiser.to(device)
    classifier.to(device)
    opt = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_adv, x_clean, y = x_adv.cpu(), x_clean.cpu(), y.cpu()
    clean = x_clean.repeat(1 + cfg.noise_copies, 1, 1, 1)
    labels = y.repeat(1 + cfg.noise_copies)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        noisy = [(x_clean + cfg.noise_sigma * torch.randn(x_clean.shape, generator=gen)).clamp(0, 1)
                 for _ in range(cfg.noise_copies)]
        inputs = torch.cat([x_adv, *noisy])
        for idx in torch.randperm(len(labels), generator=gen).split(cfg.batch_size):
            yield inputs[idx], clean[idx], labels[idx]

    def step(z: torch.Tensor, xc: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
        return {"loss": descend(opt, id_loss(denoiser, classifier, z, xc, yb, cfg.loss))}

    with frozen(classifier):
        return fit(step, batches, epochs=cfg.epochs, modules={"denoiser": denoiser}, optimizers={"denoiser": opt},
                   lr_factor=constant_lr, seed=cfg.seed, device=device, desc="IDFR denoiser")


def mixture_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec], *,
                        seed: int = 0, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """id_train_mode="mixture" (spec §2.4): each image gets an AE from one configuration drawn uniformly from
    `specs`, crafted white-box on `model` (cached per configuration). Returns (x_adv, configuration index)."""
    if not specs:
        raise ValueError("mixture_adversarial needs at least one attack configuration")
    choice = torch.randint(len(specs), (len(y),), generator=torch.Generator().manual_seed(seed))
    x_adv = x.clone()
    for k, spec in enumerate(specs):
        idx = (choice == k).nonzero().flatten()
        if len(idx):
            x_adv[idx] = adversarial_set(spec, model, x[idx], y[idx], batch_size=batch_size)[0].to(x.device)
    return x_adv, choice


# ----------------------------------------------------------------------------------------- feature restorer

@dataclass
class FeaturePool:
    """Post-ID training embeddings h, their labels and whether f_cls classifies them correctly (p1) or not (p2)."""

    h: torch.Tensor
    y: torch.Tensor
    correct: torch.Tensor

    @property
    def p2_fraction(self) -> float:
        return float((~self.correct).float().mean())


@torch.no_grad()
def feature_pool(classifier: nn.Module, denoiser: nn.Module | None, inputs: Sequence[torch.Tensor], y: torch.Tensor,
                 batch_size: int = 500, device: torch.device | None = None) -> FeaturePool:
    """Embeddings f_enc(I_w(x)) of every tensor in `inputs` (each labelled y) and their p1/p2 split (Alg. 2 step 1)."""
    device = device or get_device()
    classifier.to(device).eval()
    if denoiser is not None:
        denoiser.to(device).eval()
    hs, correct = [], []
    for x in inputs:
        check_images(x)
        check_labels(y, len(x))
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            xb = xb.to(device)
            h = classifier.features(denoiser(xb) if denoiser is not None else xb)
            hs.append(h.cpu())
            correct.append(classifier.head(h).argmax(1).cpu() == yb)
    return FeaturePool(torch.cat(hs), y.repeat(len(inputs)), torch.cat(correct))


class ConvexHullSampler:
    """Mixtures alpha*h_x + (1-alpha)*h_x~ of two same-class embeddings (Eq. 4/6, Alg. 2).

    pairing="paper": h_x from the class's correctly classified set p1, h_x~ from its misclassified set p2 (from p1
    when the class has no p2), alpha ~ U(0, 1). pairing="code" (authors' code): both endpoints from the class's whole
    pool, alpha in {0.1, ..., 1.0}. Classes are drawn uniformly among those with a p1 embedding ("paper") or any
    embedding ("code"). The label of a mixture is the shared class.
    """

    def __init__(self, pool: FeaturePool, pairing: str = "paper"):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if len(pool.h) == 0:
            raise ValueError("the feature pool is empty")
        self.pool, self.pairing = pool, pairing
        everything = torch.ones_like(pool.correct)
        first = pool.correct if pairing == "paper" else everything
        second = ~pool.correct if pairing == "paper" else everything
        self.classes = torch.unique(pool.y[first])
        if len(self.classes) == 0:
            raise ValueError("no correctly classified embedding in the pool: nothing to pair with")
        first_idx, second_idx = self._index(first), self._index(second)
        self.fallback_classes = [int(c) for c, s in zip(self.classes, second_idx) if len(s) == 0]
        # fall back to p1 for classes without a misclassified embedding
        second_idx = [s if len(s) else f for s, f in zip(second_idx, first_idx)]
        self._first, self._second = self._flatten(first_idx), self._flatten(second_idx)

    def _index(self, mask: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nonzero(mask & (self.pool.y == c)).flatten() for c in self.classes]

    @staticmethod
    def _flatten(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-class index lists as (all indices, start of each class, count of each class)."""
        counts = torch.tensor([len(g) for g in groups])
        return torch.cat(groups), torch.cumsum(counts, 0) - counts, counts

    @staticmethod
    def _pick(groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor], which: torch.Tensor,
              gen: torch.Generator) -> torch.Tensor:
        flat, starts, counts = groups
        offset = (torch.rand(len(which), generator=gen) * counts[which]).long().clamp_max(counts[which] - 1)
        return flat[starts[which] + offset]

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """n mixtures: dict with h (mixtures), y, alpha, i and j (pool indices of the two endpoints)."""
        check_positive_int(n, "n")
        which = torch.randint(len(self.classes), (n,), generator=generator)
        i = self._pick(self._first, which, generator)
        j = self._pick(self._second, which, generator)
        if self.pairing == "paper":
            alpha = torch.rand(n, generator=generator)
        else:
            alpha = torch.randint(1, 11, (n,), generator=generator).float() / 10
        h = alpha[:, None] * self.pool.h[i] + (1 - alpha[:, None]) * self.pool.h[j]
        return {"h": h, "y": self.classes[which], "alpha": alpha, "i": i, "j": j}


def train_feature_restorer(restorer: nn.Module, classifier: nn.Module, sampler: ConvexHullSampler, cfg: FRConfig,
                   device: torch.device | None = None) -> list[dict]:
    """Algorithm 2: Adam on fr_loss over fresh convex-hull mixtures each step; returns lib.train.fit's history
    (mean loss per epoch). The classifier stays frozen; on CPU the loop runs on one thread (tiny products)."""
    device = device or get_device()
    restorer.to(device)
    classifier.to(device)
    opt = torch.optim.Adam(restorer.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(cfg.steps_per_epoch):
            batch = sampler.sample(cfg.batch_size, gen)
            yield batch["h"], batch["y"]

    def step(h: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {"loss": descend(opt, fr_loss(restorer, classifier, h, y))}

    with frozen(classifier), _one_cpu_thread(device):
        return fit(step, batches, epochs=cfg.epochs, modules={"restorer": restorer}, optimizers={"restorer": opt},
                   lr_factor=constant_lr, seed=cfg.seed, device=device, desc="IDFR restorer")


# ----------------------------------------------------------------------------------------- cached, from a setting

def attack_grid(entries: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> list[AttackSpec]:
    """The paper's attack x epsilon grid: one AttackSpec per (entry, eps), labelled by the entry's label."""
    if not eps:
        raise ValueError("attack_grid needs at least one epsilon")
    return [AttackSpec(e["name"], {**dict(e.get("params", {})), "eps": float(v)}, e.get("label", e["name"]))
            for e in entries for v in eps]


@dataclass
class IDFRSetting:
    """What IDFR is trained from for one target: training images (x, y), the (attack, eps) grid, the ID and FR
    configurations, the denoiser's architecture (InputDenoiser keyword arguments) and the FR pool (spec §2.6):
    "all_configs" = post-ID embeddings of the AEs of every configuration + noisy copies + clean, for the first
    `pool_images` training images (all when None); "train_mix" = only the AEs the ID trained on + noisy copies
    (the literal Alg. 2)."""

    x: torch.Tensor
    y: torch.Tensor
    specs: list[AttackSpec]
    id_cfg: IDConfig
    fr_cfg: FRConfig
    denoiser: Mapping[str, Any]
    fr_pool: str = "all_configs"
    fr_skips: bool = False
    noise_copies_in_pool: int = 2
    pool_images: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.fr_pool not in FR_POOLS:
            raise ValueError(f"fr_pool must be one of {FR_POOLS}, got {self.fr_pool!r}")

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any], dataset: str) -> "IDFRSetting":
        """The settings of the profile's 02_idfr section for `dataset`: its training subset (`id_train_size` images;
        null: the dataset's `train_size`, all when that is null too, so ImageNet is never loaded whole unless the
        profile says so), attack grid and budgets, ID / FR configurations (seeded with the profile's seed)."""
        from lib.data import load_dataset
        from lib.profiles import dataset_config, notebook_config

        cfg = notebook_config(profile, NOTEBOOK)
        if dataset not in cfg["eps"]:
            raise NotBuiltForDataset(f"profile {profile['name']!r} has no IDFR budgets for {dataset!r}; "
                             f"it has: {', '.join(cfg['eps'])}")
        n = cfg["id_train_size"] if cfg["id_train_size"] is not None else dataset_config(profile, dataset).get("train_size")
        train = load_dataset(dataset, "train", n=n, seed=profile["seed"])
        return cls(train.x, train.y, attack_grid(cfg["attacks"], cfg["eps"][dataset]),
                   IDConfig(**cfg["id"], seed=profile["seed"]), FRConfig(**cfg["fr"], seed=profile["seed"]),
                   dict(cfg["denoiser"]), fr_pool=cfg["fr_pool"], pool_images=cfg["pool_images"])

    def config(self) -> dict[str, Any]:
        """The setting as plain values (for a Built's meta)."""
        return {"train_size": len(self.y), "attacks": [repr(s) for s in self.specs], "id": asdict(self.id_cfg),
                "fr": asdict(self.fr_cfg), "denoiser": dict(self.denoiser), "fr_pool": self.fr_pool,
                "fr_skips": self.fr_skips, "noise_copies_in_pool": self.noise_copies_in_pool,
                "pool_images": self.pool_images}


@dataclass
class IDFRFit:
    """A trained IDFR for one target: the modules, the pool the FR saw and training metadata."""

    denoiser: InputDenoiser
    restorer: FeatureRestorer
    pool: FeaturePool
    meta: dict[str, Any]

    def pipelines(self, classifier: nn.Module) -> dict[str, IDFRClassifier]:
        """Table 5's ablation: none, ID, FR, ID+FR (FR alone uses the restorer trained on post-ID features)."""
        return {"No Defense": IDFRClassifier(classifier), "ID": IDFRClassifier(classifier, self.denoiser),
                "FR": IDFRClassifier(classifier, restorer=self.restorer),
                "ID+FR": IDFRClassifier(classifier, self.denoiser, self.restorer)}


def _target_config(classifier: nn.Module, setting: IDFRSetting) -> dict[str, Any]:
    return {"target": model_digest(classifier), "data": cache.tensor_digest(setting.x.cpu(), setting.y.cpu()),
            "attacks": [repr(s) for s in setting.specs]}


def trained_denoiser(classifier: nn.Module, setting: IDFRSetting, *, loss: str | None = None,
                     device: torch.device | None = None) -> tuple[InputDenoiser, torch.Tensor, dict[str, Any]]:
    """Algorithm 1 for one frozen target, cached: training AEs white-box on the target, one configuration of the
    setting's grid per image (mixture mode, cached per configuration), then train_denoiser. `loss` replaces the
    setting's ID loss (the learned-denoiser baselines). Returns (ID, its training AEs, metadata)."""
    device = device or get_device()
    id_cfg = setting.id_cfg if loss is None else replace(setting.id_cfg, loss=loss)
    classifier.to(device).eval()
    x, y = setting.x.to(device), setting.y.to(device)
    kwargs = dict(setting.denoiser)
    kwargs.setdefault("in_channels", x.shape[1])
    t0 = time.perf_counter()
    x_adv, _ = mixture_adversarial(classifier, x, y, setting.specs, seed=id_cfg.seed, batch_size=setting.batch_size)
    seconds_aes = time.perf_counter() - t0

    def build() -> nn.Module:
        seed_everything(id_cfg.seed)
        return InputDenoiser(**kwargs)

    def train(model: nn.Module, _partial) -> dict:
        return {"history": train_denoiser(model, classifier, x_adv, x, y, id_cfg, device)}

    config = {**_target_config(classifier, setting), "id": asdict(id_cfg), "arch": kwargs}
    denoiser, meta = cached_model("idfr/denoiser", config, build, train,
                                  code=(train_denoiser, id_loss, mixture_adversarial), device=device)
    return denoiser.eval(), x_adv, {**meta, "aes_seconds": seconds_aes}


def trained_idfr(classifier: nn.Module, setting: IDFRSetting, *, device: torch.device | None = None) -> IDFRFit:
    """ID (trained_denoiser) then FR for one frozen target, both cached; the FR's pool as the setting says."""
    device = device or get_device()
    denoiser, x_adv, id_meta = trained_denoiser(classifier, setting, device=device)
    x, y = setting.x.to(device), setting.y.to(device)

    t1 = time.perf_counter()
    n = len(y) if setting.pool_images is None else min(int(setting.pool_images), len(y))
    xp, yp = x[:n], y[:n]
    gen = torch.Generator().manual_seed(setting.fr_cfg.seed)
    noisy = [(xp.cpu() + setting.id_cfg.noise_sigma * torch.randn(xp.shape, generator=gen)).clamp(0, 1)
             for _ in range(setting.noise_copies_in_pool)]
    if setting.fr_pool == "all_configs":
        aes = [adversarial_set(s, classifier, xp, yp, batch_size=setting.batch_size)[0].cpu() for s in setting.specs]
        inputs = [*aes, *noisy, xp.cpu()]
    else:
        inputs = [x_adv[:n].cpu(), *noisy]
    pool = feature_pool(classifier, denoiser, inputs, yp.cpu(), device=device)
    seconds_pool = time.perf_counter() - t1
    sampler = ConvexHullSampler(pool, setting.fr_cfg.pairing)

    def build() -> nn.Module:
        seed_everything(setting.fr_cfg.seed)
        return FeatureRestorer(classifier.feat_dim, skips=setting.fr_skips)

    def train(model: nn.Module, _partial) -> dict:
        return {"history": train_feature_restorer(model, classifier, sampler, setting.fr_cfg, device)}

    config = {**_target_config(classifier, setting), "denoiser": model_digest(denoiser),
              "fr": asdict(setting.fr_cfg), "pool": setting.fr_pool, "pool_images": n,
              "pool_data": cache.tensor_digest(pool.h, pool.y), "skips": setting.fr_skips}
    restorer, fr_meta = cached_model("idfr/restorer", config, build, train,
                                     code=(train_feature_restorer, fr_loss, ConvexHullSampler, feature_pool), device=device)
    meta = {"id_seconds": id_meta["train_seconds"], "id_cache_hit": id_meta["cache_hit"],
            "id_cache_key": id_meta["cache_key"], "id_history": id_meta["history"],
            "fr_seconds": fr_meta["train_seconds"], "fr_cache_hit": fr_meta["cache_hit"],
            "fr_cache_key": fr_meta["cache_key"], "fr_history": fr_meta["history"],
            "aes_seconds": id_meta["aes_seconds"], "pool_seconds": seconds_pool, "pool_size": len(pool.y),
            "p2_fraction": pool.p2_fraction, "fallback_classes": sampler.fallback_classes}
    return IDFRFit(denoiser.eval(), restorer.eval(), pool, meta)
