"""Training ARN and the baselines of its tables (spec §2.4, Algorithm 1), through the project's one loop `fit`.

One trainer serves every purifier of the paper's tables: ARN (autoencoder + attack discriminator + KL term +
image discriminator), the pixel-loss denoiser (the same autoencoder with only L_mse), APE-G (a conv generator with
MSE + GAN loss) and HGD (a noise-predicting denoiser with the logit-guided loss). `train_purifier` trains in
place, `trained_purifier` builds, trains and caches; `trained_variant` / `trained_profile_variant` do so for a
named purifier of the profile's section.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lib import cache
from lib.defenses.arn.defense import Purifier, to_unit
from lib.defenses.arn.losses import (
    LossWeights,
    attack_discriminator_loss,
    attack_invariance_loss,
    generator_adversarial_loss,
    gradient_penalty,
    image_discriminator_loss,
    kl_normal,
    logit_guided_loss,
    loss_weights,
    restoration_mse,
)
from lib.defenses.arn.networks import (
    ARNAutoencoder,
    AttackDiscriminator,
    ConvGenerator,
    ImageDiscriminator,
)
from lib.defenses.arn.suite import NOTEBOOK, SEEN, arn_subset, budgets, craft_seen
from lib.runtime import get_device, seed_everything
from lib.train import LRFactor, cached_model, descend, fit, frozen
from lib.validate import check_images, check_positive_int

KINDS = ("arn", "ape", "hgd")


@dataclass(frozen=True)
class PurifierConfig:
    """One purifier: its generator network, loss weights and optimisation settings (batch_size is per domain)."""

    kind: str = "arn"                       # arn | ape | hgd: the generator network (ARNAutoencoder / ConvGenerator)
    weights: LossWeights = field(default_factory=LossWeights)
    widths: tuple[int, ...] = (128, 256, 512, 1024)
    latent: int = 2048
    da_hidden: tuple[int, ...] = (1024, 256, 64)
    di_widths: tuple[int, ...] = (32, 64, 128, 256)
    di_hidden: int = 512
    gen_widths: tuple[int, int] = (64, 128)  # ConvGenerator widths (ape, hgd)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    milestones: tuple[int, ...] = ()         # epochs where learning rates drop: x0.1 for E/G, x0.5 for D_A, D_I
    include_natural: bool = True             # natural images are a D_A domain and reconstructed to themselves (A5)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.kind != "arn" and (self.weights.w_att > 0 or self.weights.w_nor > 0):
            raise ValueError(f"{self.kind!r} has no latent code: w_att and w_nor must be 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "PurifierConfig":
        """From a profile section: 'preset' plus optional 'weights' overrides; lists become tuples."""
        values = dict(values)
        weights = loss_weights(values.pop("preset", "tiny"), **dict(values.pop("weights", {}) or {}))
        known = {f for f in cls.__dataclass_fields__} - {"weights"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown purifier settings {sorted(unknown)}; valid: {sorted(known | {'preset'})}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(weights=weights, **values)


def build_generator(cfg: PurifierConfig, in_channels: int, image_size: int) -> nn.Module:
    """The generator network of a purifier config (ARN's autoencoder, or the baselines' conv generator)."""
    if cfg.kind == "arn":
        return ARNAutoencoder(in_channels, image_size, cfg.widths, cfg.latent)
    return ConvGenerator(in_channels, cfg.gen_widths, residual=cfg.kind == "hgd")


def milestone_lr(milestones: Sequence[int], gamma: float = 0.1) -> LRFactor:
    """The MultiStepLR schedule as a `fit` learning-rate factor: gamma ** (number of milestones passed)."""

    def factor(epoch: int, epochs: int) -> float:
        return gamma ** sum(epoch >= m for m in milestones)

    return factor


class PurifierTrainer:
    """The generator, D_A and D_I (where their weights are > 0) with one Adam optimiser each; `step` is one
    iteration of Algorithm 1, for `fit`.

    Order (official code): D_A step on detached codes, D_I step on detached restorations (both from one no-grad
    pass), then one E/G step accumulating L_mse + L_nor (E and G), L_att (E only: D_A is not stepped) and L_adv
    (G only: its backward is restricted to the decoder's parameters). `classifier` (frozen) is needed only when
    w_logit > 0 (HGD's logit-guided loss). The discriminators are initialised from the global RNG; the latent
    noise then continues that stream in a generator of its own (`noise`), which `fit`'s per-epoch reseeding of
    the global RNGs leaves alone; the gradient penalty has its own generator seeded from cfg.seed.
    """

    def __init__(self, generator: nn.Module, cfg: PurifierConfig, in_channels: int, image_size: int,
                 n_domains: int, classifier: nn.Module | None = None):
        w = cfg.weights
        if w.w_logit > 0 and classifier is None:
            raise ValueError("w_logit > 0 (HGD-style loss) needs the classifier")
        self.gen, self.cfg, self.classifier = generator, cfg, classifier
        device = next(generator.parameters()).device
        self.d_a = AttackDiscriminator(cfg.latent, n_domains, cfg.da_hidden).to(device) if w.w_att > 0 else None
        self.d_i = ImageDiscriminator(in_channels, image_size, cfg.di_widths, cfg.di_hidden).to(device) \
            if w.w_adv > 0 else None
        self.modules = {name: m for name, m in (("generator", generator), ("d_a", self.d_a), ("d_i", self.d_i))
                        if m is not None}
        self.optimizers = {name: torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=cfg.betas)
                           for name, m in self.modules.items()}
        self.noise = torch.Generator().set_state(torch.get_rng_state())
        self.gp_gen = torch.Generator().manual_seed(cfg.seed)

    def step(self, inp: torch.Tensor, tgt: torch.Tensor, domains: torch.Tensor) -> dict[str, float]:
        """One iteration on inputs `inp`, natural targets `tgt` ([0, 1]) and domain labels; returns the losses."""
        w, logs = self.cfg.weights, {}
        tgt_pm = 2 * tgt - 1
        if self.d_a is not None or self.d_i is not None:
            with torch.no_grad():  # one detached pass serves both discriminator steps (neither changes E or G)
                detached = self.gen(inp, self.noise)
        if self.d_a is not None:
            logs["L_DA"] = descend(self.optimizers["d_a"],
                                   attack_discriminator_loss(self.d_a(detached.z), domains, w.da_loss))
        if self.d_i is not None:
            fake_det = detached.out
            loss_di = image_discriminator_loss(self.d_i(tgt_pm), self.d_i(fake_det))
            if w.gp > 0:
                loss_di = loss_di + w.gp * gradient_penalty(self.d_i, tgt_pm, fake_det, self.gp_gen)
            logs["L_DI"] = descend(self.optimizers["d_i"], loss_di)

        opt_g = self.optimizers["generator"]
        opt_g.zero_grad(set_to_none=True)
        res = self.gen(inp, self.noise)
        loss = w.w_mse * restoration_mse(res.out, tgt_pm, w.mse_reduction)
        logs["L_mse"] = restoration_mse(res.out.detach(), tgt_pm, w.mse_reduction).item()
        if w.w_nor > 0:
            l_nor = kl_normal(res.mu, res.logvar, w.kl_reduction)
            loss = loss + w.w_nor * l_nor
            logs["L_nor"] = l_nor.item()
        if self.d_a is not None:
            l_att = attack_invariance_loss(self.d_a(res.z), w.da_loss)
            loss = loss + w.w_att * l_att
            logs["L_att"] = l_att.item()
        if self.d_i is not None:
            l_adv = generator_adversarial_loss(self.d_i(res.out))
            if res.z is not None:
                # G only (Eq. 8): accumulate its gradient into the decoder's parameters alone, which equals the
                # official G(E(x).detach()) without a second decoder pass
                (w.w_adv * l_adv).backward(inputs=list(self.gen.decoder.parameters()), retain_graph=True)
            else:
                loss = loss + w.w_adv * l_adv  # a generator without a code is G itself
            logs["L_adv"] = l_adv.item()
        if w.w_logit > 0:
            l_logit = logit_guided_loss(self.classifier, to_unit(res.out), tgt)
            loss = loss + w.w_logit * l_logit
            logs["L_logit"] = l_logit.item()
        loss.backward()
        opt_g.step()
        for disc in (self.d_a, self.d_i):
            if disc is not None:
                disc.zero_grad(set_to_none=True)  # L_att's / L_adv's gradients on the discriminators are never applied
        logs["L_total"] = loss.item()
        return logs


def domain_batches(x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], cfg: PurifierConfig, epoch: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch's shuffled minibatches (inputs, natural targets, domain labels): each batch holds the same images
    in every domain (domain 0 natural when included, then the seen attacks in order)."""
    n = len(x_nat)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    sets = ([x_nat] if cfg.include_natural else []) + list(x_advs)
    for idx in order.split(cfg.batch_size):
        inp = torch.cat([s[idx] for s in sets])
        tgt = x_nat[idx].repeat(len(sets), 1, 1, 1)
        domains = torch.arange(len(sets)).repeat_interleave(len(idx))
        yield inp, tgt, domains


def train_purifier(generator: nn.Module, x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], cfg: PurifierConfig,
                   *, classifier: nn.Module | None = None, device: torch.device | None = None) -> list[dict]:
    """Train `generator` in place to map natural and seen-attack images back to the natural ones; per-epoch losses
    (means over each epoch's examples).

    x_advs[k][i] must be the k-th seen attack's version of x_nat[i] (paired, crafted offline).
    """
    check_images(x_nat, "x_nat")
    if not x_advs:
        raise ValueError("train_purifier needs at least one set of seen-attack examples")
    for k, xa in enumerate(x_advs):
        check_images(xa, f"x_advs[{k}]")
        if xa.shape != x_nat.shape:
            raise ValueError(f"x_advs[{k}] has shape {tuple(xa.shape)}, x_nat {tuple(x_nat.shape)}: "
                             "sets must be paired")
    device = device or get_device()
    seed_everything(cfg.seed)
    generator.to(device)
    if classifier is not None:
        classifier.to(device)
    n_domains = len(x_advs) + int(cfg.include_natural)
    trainer = PurifierTrainer(generator, cfg, x_nat.shape[1], x_nat.shape[-1], n_domains, classifier)
    schedules = {name: milestone_lr(cfg.milestones, 0.1 if name == "generator" else 0.5) for name in trainer.optimizers}
    with frozen(classifier) if classifier is not None else contextlib.nullcontext():
        return fit(trainer.step, partial(domain_batches, x_nat, x_advs, cfg), epochs=cfg.epochs,
                   modules=trainer.modules, optimizers=trainer.optimizers, lr_factor=schedules,
                   seed=cfg.seed, device=device, desc=f"purifier {cfg.kind}")


def trained_purifier(cfg: PurifierConfig, x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], *,
                     classifier: nn.Module | None = None, namespace: str = "arn",
                     device: torch.device | None = None) -> tuple[Purifier, dict]:
    """Train a purifier once and cache it (key: config, training data, classifier weights, source code).

    The meta has train_seconds, the first and last epochs' L_mse, cache_hit and cache_key.
    """
    from lib.evaluate import model_digest

    device = device or get_device()
    config = {"purifier": asdict(cfg), "data": cache.tensor_digest(x_nat, *x_advs),
              "classifier": model_digest(classifier) if cfg.weights.w_logit > 0 else None}

    def build() -> nn.Module:
        seed_everything(cfg.seed)
        return build_generator(cfg, x_nat.shape[1], x_nat.shape[-1])

    def train(gen: nn.Module, partial_checkpoint: Path) -> dict:
        # no per-epoch checkpoint: the noise generators' states are not in it, so a resumed run would differ
        t0 = time.perf_counter()
        history = train_purifier(gen, x_nat, x_advs, cfg, classifier=classifier, device=device)
        return {"train_seconds": time.perf_counter() - t0, "final": history[-1],
                "first_mse": history[0]["L_mse"], "final_mse": history[-1]["L_mse"]}

    gen, meta = cached_model(f"purifiers/{namespace}", config, build, train,
                             code=(train_purifier, PurifierTrainer, domain_batches), device=device)
    return Purifier(gen).to(device).eval(), meta


# --------------------------------------------------------------------------- the purifiers of the paper's tables

PIXEL_MSE_OFF: dict[str, float] = {"w_att": 0.0, "w_nor": 0.0, "w_adv": 0.0}


@dataclass(frozen=True)
class Variant:
    """A purifier of the paper's tables: its profile sub-section (arn | ape | hgd), seen attacks, weight overrides."""

    section: str
    seen: tuple[str, ...]
    weights: Mapping[str, float] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "ARN_PP": Variant("arn", SEEN["PP"]),
    "Pixel-MSE_PP": Variant("arn", SEEN["PP"], PIXEL_MSE_OFF),  # the same autoencoder, L_att, L_nor, L_adv off
    "APE-G_PP": Variant("ape", SEEN["PP"]),
    "HGD_PP": Variant("hgd", SEEN["PP"]),
    **{f"ARN w/o L_{term}": Variant("arn", SEEN["PP"], {f"w_{term}": 0.0}) for term in ("adv", "nor", "att")},
    "ARN_DP": Variant("arn", SEEN["DP"]),
    "ARN (PGD_N+STA_N)": Variant("arn", SEEN["PS"]),
}


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def purifier_cfg(cfg: Mapping[str, Any], section: str, seed: int, **weights: float) -> PurifierConfig:
    """The PurifierConfig of sub-section `section` (arn | ape | hgd) with `seed` and some loss weights replaced."""
    if section not in cfg:
        raise ValueError(f"the ARN section has no purifier settings {section!r}")
    pc = PurifierConfig.from_mapping({**cfg[section], "seed": seed})
    return replace(pc, weights=replace(pc.weights, **weights)) if weights else pc


def purifier_jobs(cfg: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(variant, seed) pairs the section asks for: ARN_PP and the pixel-loss denoiser per seed; APE-G, HGD and,
    where enabled, the ablations, ARN_DP and ARN (PGD_N+STA_N) at the first seed."""
    seed0 = cfg["seeds"][0]
    jobs = [(name, seed) for seed in cfg["seeds"] for name in ("ARN_PP", "Pixel-MSE_PP")]
    jobs += [("APE-G_PP", seed0), ("HGD_PP", seed0)]
    if cfg["ablations"]:
        jobs += [(f"ARN w/o L_{term}", seed0) for term in ("adv", "nor", "att")]
    if cfg["arn_dp"]:
        jobs.append(("ARN_DP", seed0))
    if cfg["table2b"]:
        jobs.append(("ARN (PGD_N+STA_N)", seed0))
    return jobs


def seen_attacks(cfg: Mapping[str, Any]) -> list[str]:
    """Every attack some job of the section is trained on (to craft on the training subset), sorted."""
    return sorted({a for name, _ in purifier_jobs(cfg) for a in VARIANTS[name].seen})


def trained_variant(cfg: Mapping[str, Any], variant: str, seed: int, x_nat: torch.Tensor,
                    train_adv: Mapping[str, torch.Tensor], classifier: nn.Module, *, dataset: str,
                    device: torch.device | None = None) -> tuple[Purifier, dict]:
    """Train (or load) one variant on x_nat and its seen attacks from `train_adv`; the meta adds variant, seed,
    epochs, seen and config (the PurifierConfig as plain values) to trained_purifier's."""
    v = _variant(variant)
    missing = [a for a in v.seen if a not in train_adv]
    if missing:
        raise ValueError(f"{variant} is trained on {v.seen}; missing crafted sets {missing}")
    pc = purifier_cfg(cfg, v.section, seed, **v.weights)
    defense, meta = trained_purifier(pc, x_nat, [train_adv[a] for a in v.seen], classifier=classifier,
                                     namespace=f"arn/{dataset}", device=device)
    return defense, {**meta, "variant": variant, "seed": seed, "epochs": pc.epochs, "seen": list(v.seen),
                     "config": {"variant": variant, "seen": list(v.seen), **asdict(pc)}}


def trained_profile_variant(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
                            variant: str = "ARN_PP", seed: int | None = None, device: torch.device | None = None
                            ) -> tuple[Purifier, dict]:
    """The profile's purifier `variant` for `dataset`, defending `classifier` (moved to `device`): the seen attacks
    are crafted on it over the training subset (cached), then the purifier is trained once (cached). Settings come
    from the profile's notebooks.05_attack_invariant_arn section; seed defaults to its first seed."""
    from lib.profiles import notebook_config

    cfg = notebook_config(profile, NOTEBOOK)
    _variant(variant)
    budgets(cfg, dataset)  # a clear error before any data is loaded
    device = device or get_device()
    classifier.to(device)
    train = arn_subset(profile, dataset, "train")
    crafted = craft_seen(profile, dataset, classifier, train, VARIANTS[variant].seen, device=device)
    seed = cfg["seeds"][0] if seed is None else seed
    defense, meta = trained_variant(cfg, variant, seed, train.x, {a: xs for a, (xs, _) in crafted.items()},
                                    classifier, dataset=dataset, device=device)
    return defense, {**meta, "attack_seconds": {a: s for a, (_, s) in crafted.items()}}
