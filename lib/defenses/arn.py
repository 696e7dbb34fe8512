"""ARN (Zhou et al., ICML 2021): an adversarial-noise-removing autoencoder built on attack-invariant features.

The encoder E learns a latent code that an attack discriminator D_A cannot attribute to any attack (L_att) and
whose posterior is pulled to N(0, I) (the VAE-style normalisation term L_nor); the decoder G reconstructs the
natural image (L_mse) and fools an image discriminator D_I (L_adv). The defended model is f(G(E(x))).
The same trainer, with other weights or generator networks, gives the baselines of the paper's tables:
a pixel-loss (MSE-only) denoiser, an APE-GAN-style purifier, an HGD-style (logit-guided) denoiser.
Spec: shared/papers/spec-004-attack-invariant.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib import cache
from lib.defenses.base import Defense
from lib.runtime import get_device, seed_everything
from lib.validate import check_images, check_labels, check_positive_int

if TYPE_CHECKING:
    import pandas as pd

    from lib.data import ImageData
    from lib.evaluate import AttackSpec

# (kernel, stride, padding) of each encoder convolution and of the latent convolution, per image side.
# 28: the official MNIST stack (the 2x2 kernel maps 14 -> 8); 32: k4 s2 p1 throughout (spec §2.2, A13);
# 8: the CPU stack of spec §7.b. The decoder mirrors the encoder with transposed convolutions.
LAYER_PLANS: dict[int, tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]] = {
    8: (((3, 1, 1), (4, 2, 1), (4, 2, 1)), (2, 1, 0)),
    28: (((4, 2, 1), (2, 2, 1), (4, 2, 1), (4, 2, 1)), (4, 2, 1)),
    32: (((4, 2, 1), (4, 2, 1), (4, 2, 1), (4, 2, 1)), (4, 2, 1)),
}
DA_LOSSES = ("ce", "bce")
MSE_REDUCTIONS = ("mean", "sample_sum")
KL_REDUCTIONS = ("batchmean", "sum", "none")


def _plan(image_size: int, n_layers: int) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]:
    if image_size not in LAYER_PLANS:
        raise ValueError(f"ARN networks support image sides {sorted(LAYER_PLANS)}, got {image_size}")
    convs, latent = LAYER_PLANS[image_size]
    if n_layers != len(convs):
        raise ValueError(f"image side {image_size} needs {len(convs)} widths, got {n_layers}")
    return convs, latent


def _init_weights(module: nn.Module) -> None:
    """The official code's init: conv weights ~ N(0, 0.02); BatchNorm weights ~ N(0, 0.02) (sic), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


class GenOutput(NamedTuple):
    """A purifier network's output: reconstruction in [-1, 1] space; latent mean, log-variance and code (or None)."""

    out: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None


class ARNAutoencoder(nn.Module):
    """E (conv-BN-LReLU stack, then parallel mu / logvar convolutions) and G (mirrored transposed convolutions, tanh).

    Takes [0, 1] images (scaled to [-1, 1] inside, as the official code does). Training samples
    z = mu + eps * exp(logvar / 2); evaluation uses z = mu (spec §2.7, A15).
    """

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (128, 256, 512, 1024),
                 latent: int = 2048):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(latent, "latent")
        convs, (lk, ls, lp) = _plan(image_size, len(widths))
        chans = [in_channels, *widths]
        enc: list[nn.Module] = []
        for (k, s, p), c_in, c_out in zip(convs, chans[:-1], chans[1:]):
            enc += [nn.Conv2d(c_in, c_out, k, s, p), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*enc)
        self.mu = nn.Conv2d(widths[-1], latent, lk, ls, lp)
        self.logvar = nn.Conv2d(widths[-1], latent, lk, ls, lp)
        dec: list[nn.Module] = [nn.ConvTranspose2d(latent, widths[-1], lk, ls, lp), nn.BatchNorm2d(widths[-1]),
                                nn.LeakyReLU(0.2)]
        for i in reversed(range(len(convs))):
            k, s, p = convs[i]
            dec.append(nn.ConvTranspose2d(chans[i + 1], chans[i], k, s, p))
            dec += [nn.BatchNorm2d(chans[i]), nn.LeakyReLU(0.2)] if i > 0 else [nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        self.latent_dim = latent
        _init_weights(self)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (N, latent), of a [0, 1] batch."""
        h = self.encoder(2 * x - 1)
        return self.mu(h).flatten(1), self.logvar(h).flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [-1, 1] space from codes (N, latent)."""
        return self.decoder(z[:, :, None, None])

    def forward(self, x: torch.Tensor) -> GenOutput:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return GenOutput(self.decode(z), mu, logvar, z)


class ConvGenerator(nn.Module):
    """Two strided convolutions and two transposed convolutions (APE-GAN's generator shape, spec §3.5).

    residual=False: outputs the image through tanh (APE-GAN). residual=True: predicts the adversarial noise and
    returns x - noise (HGD's denoiser predicts the noise). Works on any side divisible by 4.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (64, 128), residual: bool = False):
        super().__init__()
        c1, c2 = widths
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, 4, 2, 1), nn.BatchNorm2d(c2), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.ConvTranspose2d(c1, in_channels, 4, 2, 1),
        )
        self.residual = residual
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> GenOutput:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ConvGenerator needs sides divisible by 4, got {tuple(x.shape[-2:])}")
        h = self.net(2 * x - 1)
        return GenOutput(2 * x - 1 - h if self.residual else torch.tanh(h))


class AttackDiscriminator(nn.Module):
    """D_A: an MLP from the latent code to one logit per domain (no BN, LeakyReLU 0.2 between layers)."""

    def __init__(self, latent: int, n_domains: int, hidden: Sequence[int] = (1024, 256, 64)):
        super().__init__()
        check_positive_int(n_domains, "n_domains")
        dims = [latent, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], n_domains))
        self.n_domains = n_domains

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ImageDiscriminator(nn.Module):
    """D_I: the encoder's convolution plan with LeakyReLU, no BN, then FC -> hidden -> 1 logit (real vs restored)."""

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (32, 64, 128, 256),
                 hidden: int = 512):
        super().__init__()
        convs, _ = _plan(image_size, len(widths))
        chans = [in_channels, *widths]
        layers: list[nn.Module] = []
        side = image_size
        for (k, s, p), c_in, c_out in zip(convs, chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, k, s, p), nn.LeakyReLU(0.2)]
            side = (side + 2 * p - k) // s + 1
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * side * side, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        _init_weights(self)

    def forward(self, x_pm: torch.Tensor) -> torch.Tensor:
        """Logits (N,) of images in [-1, 1] space."""
        return self.net(x_pm).squeeze(1)


# --------------------------------------------------------------------------- losses (spec §2.3)

def kl_normal(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """L_nor as the closed-form KL(N(mu, exp(logvar)) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)).

    reduction: 'batchmean' sums over dimensions and averages over samples; 'sum' sums over everything (the
    official code); 'none' returns one value per sample.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar shapes differ: {tuple(mu.shape)} vs {tuple(logvar.shape)}")
    per_sample = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def attack_discriminator_loss(logits: torch.Tensor, domains: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """L_{D_A} (Eq. 1): softmax cross-entropy of D_A's logits against the domain labels ('bce': the code's
    independent sigmoids against one-hot targets)."""
    if kind not in DA_LOSSES:
        raise ValueError(f"kind must be one of {DA_LOSSES}, got {kind!r}")
    if kind == "ce":
        return F.cross_entropy(logits, domains)
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(domains, logits.shape[1]).to(logits.dtype))


def attack_invariance_loss(logits: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """L_att (Eq. 2): cross-entropy of D_A's prediction against the uniform 'attack-confused' label [1/K .. 1/K].

    With softmax CE it equals -mean_k log softmax_k and is minimal (log K) at uniform logits.
    """
    if kind not in DA_LOSSES:
        raise ValueError(f"kind must be one of {DA_LOSSES}, got {kind!r}")
    if kind == "ce":
        return -F.log_softmax(logits, dim=1).mean(1).mean()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 / logits.shape[1]))


def reconstruction_loss(out_pm: torch.Tensor, target_pm: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L_mse (Eq. 4): 'mean' over all elements (the code), or 'sample_sum' (sum over pixels, mean over samples)."""
    if reduction not in MSE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {MSE_REDUCTIONS}, got {reduction!r}")
    sq = (out_pm - target_pm).pow(2)
    return sq.mean() if reduction == "mean" else sq.flatten(1).sum(1).mean()


def image_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_{D_I} (Eq. 5, as the bounded standard GAN loss): BCE(D_I(x), 1) + BCE(D_I(G(E(x~))), 0)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv (Eq. 6), non-saturating: BCE(D_I(G(E(x~))), 1) = -mean log D_I(G(E(x~)))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def gradient_penalty(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """WGAN-GP term mean (||grad D(x_hat)|| - 1)^2 on x_hat between the natural target and the fake (spec A10)."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=generator).to(real)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights and reductions of the purifier objective (spec §2.3 presets); w_logit is HGD's logit-guided term."""

    w_mse: float = 200.0
    w_att: float = 0.5
    w_nor: float = 1e-3
    w_adv: float = 0.01
    w_logit: float = 0.0
    gp: float = 0.0
    mse_reduction: str = "mean"
    kl_reduction: str = "batchmean"
    da_loss: str = "ce"

    def __post_init__(self) -> None:
        for name in ("w_mse", "w_att", "w_nor", "w_adv", "w_logit", "gp"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.mse_reduction not in MSE_REDUCTIONS or self.kl_reduction not in KL_REDUCTIONS[:2] \
                or self.da_loss not in DA_LOSSES:
            raise ValueError(f"bad reductions: mse {self.mse_reduction!r} (valid {MSE_REDUCTIONS}), kl "
                             f"{self.kl_reduction!r} (valid {KL_REDUCTIONS[:2]}), "
                             f"da {self.da_loss!r} (valid {DA_LOSSES})")


PRESETS: dict[str, LossWeights] = {
    "paper_mnist": LossWeights(1.0, 0.1, 0.01, 0.1, mse_reduction="sample_sum"),
    "paper_cifar": LossWeights(1.0, 100.0, 10.0, 100.0, mse_reduction="sample_sum"),
    "official_code": LossWeights(200.0, 0.5, 1e-6, 0.01, gp=30.0, kl_reduction="sum", da_loss="bce"),
    "tiny": LossWeights(200.0, 0.5, 1e-3, 0.01),
}


def loss_weights(preset: str, **overrides: float) -> LossWeights:
    """A named preset (paper_mnist, paper_cifar, official_code, tiny) with some fields replaced (ablations)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


# --------------------------------------------------------------------------- training (spec §2.4)

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
    milestones: tuple[int, ...] = ()         # epochs where lr drops (x0.1 for E/G, x0.5 for discriminators)
    include_natural: bool = True             # natural images as an extra domain reconstructed to themselves (A5)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("arn", "ape", "hgd"):
            raise ValueError(f"kind must be 'arn', 'ape' or 'hgd', got {self.kind!r}")
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
    """The generator network of a purifier config."""
    if cfg.kind == "arn":
        return ARNAutoencoder(in_channels, image_size, cfg.widths, cfg.latent)
    return ConvGenerator(in_channels, cfg.gen_widths, residual=cfg.kind == "hgd")


def _to01(out_pm: torch.Tensor) -> torch.Tensor:
    return ((out_pm + 1) / 2).clamp(0.0, 1.0)


class PurifierTrainer:
    """Holds the generator, D_A, D_I and one Adam optimiser each; `step` is one iteration of Algorithm 1.

    Order (official code): D_A step on detached codes, D_I step on detached restorations (both from one no-grad
    pass), then one E/G step
    accumulating L_mse + L_nor (E and G), L_att (E only: D_A is not stepped) and L_adv (G only: its
    backward is restricted to the decoder's parameters). `classifier` (frozen) is needed only when w_logit > 0
    (HGD's logit-guided loss).
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
        adam = lambda params: torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)  # noqa: E731
        self.opt_g = adam(generator.parameters())
        self.opt_da = adam(self.d_a.parameters()) if self.d_a is not None else None
        self.opt_di = adam(self.d_i.parameters()) if self.d_i is not None else None
        self.gp_gen = torch.Generator().manual_seed(cfg.seed)

    def set_epoch(self, epoch: int) -> None:
        """Apply the MultiStepLR-style schedule: lr x 0.1 (E/G) and x 0.5 (D_A, D_I) per passed milestone."""
        drops = sum(epoch >= m for m in self.cfg.milestones)
        for opt, gamma in ((self.opt_g, 0.1), (self.opt_da, 0.5), (self.opt_di, 0.5)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = self.cfg.lr * gamma ** drops

    def step(self, inp: torch.Tensor, tgt: torch.Tensor, domains: torch.Tensor) -> dict[str, float]:
        """One iteration on inputs `inp`, natural targets `tgt` ([0, 1]) and domain labels; returns the losses."""
        w, logs = self.cfg.weights, {}
        self.gen.train()
        tgt_pm = 2 * tgt - 1
        if self.d_a is not None or self.d_i is not None:
            with torch.no_grad():  # one detached pass serves both discriminator steps (neither changes E or G)
                detached = self.gen(inp)
        if self.d_a is not None:
            self.opt_da.zero_grad(set_to_none=True)
            loss_da = attack_discriminator_loss(self.d_a(detached.z), domains, w.da_loss)
            loss_da.backward()
            self.opt_da.step()
            logs["L_DA"] = loss_da.item()
        if self.d_i is not None:
            fake_det = detached.out
            self.opt_di.zero_grad(set_to_none=True)
            loss_di = image_discriminator_loss(self.d_i(tgt_pm), self.d_i(fake_det))
            if w.gp > 0:
                loss_di = loss_di + w.gp * gradient_penalty(self.d_i, tgt_pm, fake_det, self.gp_gen)
            loss_di.backward()
            self.opt_di.step()
            logs["L_DI"] = loss_di.item()

        self.opt_g.zero_grad(set_to_none=True)
        res = self.gen(inp)
        loss = w.w_mse * reconstruction_loss(res.out, tgt_pm, w.mse_reduction)
        logs["L_mse"] = reconstruction_loss(res.out.detach(), tgt_pm, w.mse_reduction).item()
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
            l_logit = (self.classifier(_to01(res.out)) - self.classifier(tgt).detach()).abs().mean()
            loss = loss + w.w_logit * l_logit
            logs["L_logit"] = l_logit.item()
        loss.backward()
        self.opt_g.step()
        if self.d_a is not None:
            self.d_a.zero_grad(set_to_none=True)  # L_att's gradient on D_A is never applied
        if self.d_i is not None:
            self.d_i.zero_grad(set_to_none=True)
        logs["L_total"] = loss.item()
        return logs


def domain_batches(x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], cfg: PurifierConfig, epoch: int):
    """Per-epoch shuffled minibatches: (inputs, natural targets, domain labels); domain 0 is natural when included."""
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
    """Train `generator` in place to map natural and seen-attack images back to the natural ones; per-epoch losses.

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
    frozen = []
    if classifier is not None:
        classifier.to(device).eval()
        frozen = [p for p in classifier.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    n_domains = len(x_advs) + int(cfg.include_natural)
    trainer = PurifierTrainer(generator, cfg, x_nat.shape[1], x_nat.shape[-1], n_domains, classifier)
    history: list[dict] = []
    try:
        for epoch in range(cfg.epochs):
            trainer.set_epoch(epoch)
            sums: dict[str, float] = {}
            batches = 0
            for inp, tgt, dom in domain_batches(x_nat, x_advs, cfg, epoch):
                logs = trainer.step(inp.to(device), tgt.to(device), dom.to(device))
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
            history.append({"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()}})
    finally:
        for p in frozen:
            p.requires_grad_(True)
    generator.eval()
    return history


class Purifier(Defense):
    """A trained generator as a Defense: purify(x) = G(E(x)) mapped back to [0, 1] (deterministic, z = mu)."""

    differentiable = True

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
        self.generator.eval()
        return _to01(self.generator(x).out)

    def fit(self, x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], cfg: PurifierConfig, **kwargs) -> "Purifier":
        train_purifier(self.generator, x_nat, x_advs, cfg, **kwargs)
        return self


def trained_purifier(cfg: PurifierConfig, x_nat: torch.Tensor, x_advs: Sequence[torch.Tensor], *,
                     classifier: nn.Module | None = None, namespace: str = "arn",
                     device: torch.device | None = None) -> tuple[Purifier, dict]:
    """Train a purifier once and cache it (key: config, training data, classifier weights, source code)."""
    from lib.evaluate import model_digest
    from lib.train import cached_model

    device = device or get_device()
    config = {"purifier": asdict(cfg), "data": cache.tensor_digest(x_nat, *x_advs),
              "classifier": model_digest(classifier) if cfg.weights.w_logit > 0 else None}

    def build() -> nn.Module:
        seed_everything(cfg.seed)
        return build_generator(cfg, x_nat.shape[1], x_nat.shape[-1])

    def train(gen: nn.Module, partial: Path) -> dict:
        t0 = time.perf_counter()
        history = train_purifier(gen, x_nat, x_advs, cfg, classifier=classifier, device=device)
        return {"train_seconds": time.perf_counter() - t0, "final": history[-1],
                "first_mse": history[0]["L_mse"], "final_mse": history[-1]["L_mse"]}

    gen, meta = cached_model(f"purifiers/{namespace}", config, build, train, code=(train_purifier,), device=device)
    return Purifier(gen).to(device).eval(), meta


# --------------------------------------------------------------------------- attacks and evaluation helpers

def pick_targets(y: torch.Tensor, n_classes: int, seed: int = 0, mode: str = "random") -> torch.Tensor:
    """Target labels for targeted attacks: uniformly random != y (fixed seed), or 'fixed3' (3, or 1 where y == 3)."""
    check_labels(y, len(y))
    if mode == "fixed3":
        return torch.where(y == 3, torch.ones_like(y), torch.full_like(y, 3))
    if mode != "random":
        raise ValueError(f"mode must be 'random' or 'fixed3', got {mode!r}")
    offset = torch.randint(1, n_classes, y.shape, generator=torch.Generator().manual_seed(seed))
    return (y.cpu() + offset) % n_classes


def error_rate(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               batch_size: int = 500) -> float:
    """Error (%) over all examples, clean mistakes included (spec §3.6): 100 - accuracy."""
    from lib.evaluate import accuracy

    return 100.0 - accuracy(model, x, y, batch_size)


# --------------------------------------------------------------------------- tables: ours beside the paper's

def error_rows(classifier: nn.Module, defenses: Mapping[str, Defense], adversarial: Mapping[str, torch.Tensor],
               y: torch.Tensor, batch_size: int = 500, **keys: Any) -> list[dict]:
    """One row per (defense, attack): error (%) of classifier(defense(x_adv)) on the true labels, plus `keys`."""
    from lib.defenses.base import Defended

    rows = []
    for name, defense in defenses.items():
        model = Defended(classifier, defense).eval()
        for attack, x_adv in adversarial.items():
            rows.append({**keys, "defense": name, "attack": attack, "error": error_rate(model, x_adv, y, batch_size)})
    return rows


def beside_paper(ours: "pd.DataFrame", table: str, paper_dataset: str, on: Sequence[str] = ("defense", "attack"),
                 value_col: str = "error", **filters: str) -> "pd.DataFrame":
    """lib.reference.compare of our rows with the paper's `table` rows for `paper_dataset` (and column filters),
    plus a `status` column: 'both', 'paper only (not reproduced)' or 'ours only (no paper number)'."""
    from lib.reference import compare, load_reference

    paper = load_reference("arn", table)
    paper = paper[paper["dataset"] == paper_dataset]
    for column, value in filters.items():
        paper = paper[paper[column] == value]
    joined = compare(ours, paper, on=list(on), value_col=value_col)
    joined["status"] = "both"
    joined.loc[joined["ours"].isna(), "status"] = "paper only (not reproduced)"
    joined.loc[joined["paper"].isna(), "status"] = "ours only (no paper number)"
    return joined


def mark_lowest(df: "pd.DataFrame", value_col: str = "error", by: Sequence[str] = ("attack",),
                exclude: Sequence[str] = ("None",)) -> "pd.Series":
    """True where `value_col` is lowest within each `by` group among defenses not in `exclude` (computed from data)."""
    import pandas as pd

    from lib.report import mark_best

    keep = ~df["defense"].isin(list(exclude))
    best = pd.Series(False, index=df.index)
    best[keep] = mark_best(df[keep], value_col, higher_is_better=False, by=list(by))
    return best


# --------------------------------------------------------------------------- profile entry points (notebook 05)

NOTEBOOK = "05_attack_invariant_arn"
SEEN: dict[str, tuple[str, ...]] = {"PP": ("PGD_N", "PGD_T"), "DP": ("DDN_N", "PGD_N"), "PS": ("PGD_N", "STA_N")}
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


def budgets(cfg: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """A dataset's entry of the section's per_dataset: paper_dataset, eps, eps_prime, eps_white, alpha."""
    per_dataset = cfg.get("per_dataset", {})
    if dataset not in per_dataset:
        raise ValueError(f"no ARN budgets for dataset {dataset!r}; per_dataset has: {', '.join(sorted(per_dataset))}")
    return dict(per_dataset[dataset])


def arn_subset(profile: Mapping[str, Any], dataset: str, split: str = "train") -> "ImageData":
    """The class-balanced subset of a split: train_size images (the purifiers' training set, on which the seen
    attacks are crafted) or test_size images (every table), drawn with the profile's seed."""
    from lib.data import load_dataset
    from lib.profiles import notebook_config

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cfg = notebook_config(profile, NOTEBOOK)
    return load_dataset(dataset, split, n=cfg[f"{split}_size"], seed=profile["seed"])


def attack_suite(cfg: Mapping[str, Any], c: Mapping[str, Any]) -> dict[str, "AttackSpec"]:
    """The paper's attacks at one dataset's budgets `c` and the section's iterations (AA only where configured)."""
    from lib.evaluate import AttackSpec

    def pgd(eps: float, **kw: Any) -> AttackSpec:
        return AttackSpec("pgd", {"eps": eps, "alpha": c["alpha"], "steps": cfg["pgd_steps"], **kw})

    suite = {"PGD_N": pgd(c["eps"]), "PGD_T": pgd(c["eps"], targeted=True), "CW_N": AttackSpec("cw_l2", cfg["cw"]),
             "DDN_N": AttackSpec("ddn", cfg["ddn"]), "PGD_Nε'": pgd(c["eps_prime"]),
             "STA_N": AttackSpec("stadv", cfg["stadv"]),
             "STA_T": AttackSpec("stadv", {**cfg["stadv"], "targeted": True})}
    if cfg.get("autoattack"):
        suite["AA_N"] = AttackSpec("autoattack", {"eps": c["eps"], **cfg["autoattack"]})
        suite["AA_Nε'"] = AttackSpec("autoattack", {"eps": c["eps_prime"], **cfg["autoattack"]})
    return suite


def craft(spec: "AttackSpec", model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
          n_classes: int, *, seed: int = 0, batch_size: int = 256, device: torch.device | None = None
          ) -> tuple[torch.Tensor, float]:
    """Run (or load from the cache) one attack; targeted attacks get uniformly random targets != y drawn with
    `seed` (spec A18). Returns (x_adv on the CPU, seconds of the run that produced it)."""
    from lib.evaluate import adversarial_set

    device = device or get_device()
    labels = pick_targets(y, n_classes, seed=seed) if spec.params.get("targeted") else y
    x_adv, seconds = adversarial_set(spec, model, x.to(device), labels.to(device), batch_size=batch_size)
    return x_adv.cpu(), seconds


def craft_seen(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, train: "ImageData",
               names: Sequence[str], *, device: torch.device | None = None) -> dict[str, tuple[torch.Tensor, float]]:
    """The seen attacks `names`, crafted (cached) against `classifier` on the training subset: name -> (x_adv, s)."""
    from lib.profiles import notebook_config

    cfg = notebook_config(profile, NOTEBOOK)
    suite = attack_suite(cfg, budgets(cfg, dataset))
    unknown = set(names) - set(suite)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; this profile's suite has: {', '.join(suite)}")
    return {name: craft(suite[name], classifier, train.x, train.y, train.info.num_classes, seed=profile["seed"],
                        batch_size=profile["eval_batch_size"], device=device) for name in names}


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


def train_variant(cfg: Mapping[str, Any], variant: str, seed: int, x_nat: torch.Tensor,
                  train_adv: Mapping[str, torch.Tensor], classifier: nn.Module, *, dataset: str,
                  device: torch.device | None = None) -> tuple[Purifier, dict]:
    """Train (or load) one variant on x_nat and its seen attacks from `train_adv`; the meta adds variant, seed,
    epochs and seen to trained_purifier's (train_seconds, cache_hit, losses)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    missing = [a for a in v.seen if a not in train_adv]
    if missing:
        raise ValueError(f"{variant} is trained on {v.seen}; missing crafted sets {missing}")
    pc = purifier_cfg(cfg, v.section, seed, **v.weights)
    defense, meta = trained_purifier(pc, x_nat, [train_adv[a] for a in v.seen], classifier=classifier,
                                     namespace=f"arn/{dataset}", device=device)
    return defense, {**meta, "variant": variant, "seed": seed, "epochs": pc.epochs, "seen": list(v.seen)}


def arn_for(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *, variant: str = "ARN_PP",
            seed: int | None = None, device: torch.device | None = None) -> tuple[Purifier, dict]:
    """The profile's purifier `variant` for `dataset`, defending `classifier` (moved to `device`): the seen attacks
    are crafted on it over the training subset (cached), then the purifier is trained once (cached). Settings come
    from the profile's notebooks.05_attack_invariant_arn section; seed defaults to its first seed."""
    from lib.profiles import notebook_config

    cfg = notebook_config(profile, NOTEBOOK)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    budgets(cfg, dataset)  # a clear error before any data is loaded
    device = device or get_device()
    classifier.to(device)
    train = arn_subset(profile, dataset, "train")
    crafted = craft_seen(profile, dataset, classifier, train, VARIANTS[variant].seen, device=device)
    seed = cfg["seeds"][0] if seed is None else seed
    defense, meta = train_variant(cfg, variant, seed, train.x, {a: xs for a, (xs, _) in crafted.items()}, classifier,
                                  dataset=dataset, device=device)
    return defense, {**meta, "attack_seconds": {a: s for a, (_, s) in crafted.items()}}
