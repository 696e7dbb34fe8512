"""Paper 003 (Zhang et al., PeerJ CS 2021): pixel-depth compression Q_k followed by an EDSR-style restorer R_θ.

The defense is D(x) = clamp(R_θ(Q_k(x)), 0, 1) in front of an unchanged classifier (spec-003 §2.1).
Q_k rounds every pixel to k levels (a step function: zero gradient almost everywhere, so adaptive attacks
use BPDA through it, `ReconstructionDefense.bpda_purify`); R_θ is an EDSR body at the native resolution
trained with eq. (4) on (Q_k(x̃), x) pairs, x̃ a clean image or its FGSM(ε_max) version (§2.4-2.5).
Also here: the Table 4 adversarial-training losses (Kurakin-style FGSM / BIM, §2.8), the BIM step rule
(§2.7), clipping of minimum-norm attacks to the table's L-inf ball (§2.7) and cached training of the
paper's classifiers and of R_θ.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lib import cache
from lib.attacks import bim, fgsm
from lib.attacks.gradient import input_gradient
from lib.data import ImageData
from lib.defenses.base import Defense
from lib.evaluate import AttackSpec, accuracy, adversarial_set, model_digest
from lib.models import build_classifier
from lib.runtime import get_device, seed_everything
from lib.train import TrainConfig, cached_model, fit_classifier
from lib.validate import check_images, check_labels, check_nonnegative, check_positive_int

Model = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- pixel-depth compression

def _check_levels(levels: int) -> None:
    check_positive_int(levels, "levels")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be between 2 and 256 (k quantisation levels per channel), got {levels}")


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q_k(x) = round(x (k - 1)) / (k - 1): every pixel and channel to one of k levels in [0, 1] (§2.2).

    Non-differentiable (a step function); `straight_through_quantize` is its BPDA version.
    """
    _check_levels(levels)
    check_images(x)
    return torch.round(x * (levels - 1)) / (levels - 1)


def straight_through_quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q_k forward, identity backward (straight-through BPDA, Athalye et al. 2018)."""
    return x + (quantize(x, levels) - x).detach()


class PixelDepthCompression(Defense):
    """Q_k alone as a defense (the paper's Fig. 3 ablation). Not differentiable: attacks need BPDA."""

    differentiable = False

    def __init__(self, levels: int):
        super().__init__()
        _check_levels(levels)
        self.levels = levels

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


# --------------------------------------------------------------------------- EDSR-style restorer

class ResBlock(nn.Module):
    """EDSR residual block without batch norm: x + res_scale · conv(relu(conv(x)))."""

    def __init__(self, n_feats: int, res_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feats, n_feats, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.body(x)


class EDSRRestorer(nn.Module):
    """EDSR (Lim et al. 2017) body: head conv, n_blocks ResBlocks, body-tail conv + global skip, tail (§2.3).

    scale = 1 (the default reading) keeps the resolution; scale 2 or 4 puts EDSR's up-sampler
    (log2(scale) x [conv F->4F, PixelShuffle(2)]) before the last conv. The output is not squashed;
    ReconstructionDefense clamps it to [0, 1].
    """

    def __init__(self, in_channels: int = 1, n_feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0,
                 scale: int = 1):
        super().__init__()
        for value, name in ((in_channels, "in_channels"), (n_feats, "n_feats"), (n_blocks, "n_blocks")):
            check_positive_int(value, name)
        if scale not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
        if not res_scale > 0:
            raise ValueError(f"res_scale must be > 0, got {res_scale}")
        self.in_channels, self.n_feats, self.n_blocks, self.res_scale, self.scale = (
            in_channels, n_feats, n_blocks, float(res_scale), scale)
        self.head = nn.Conv2d(in_channels, n_feats, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_blocks)],
                                  nn.Conv2d(n_feats, n_feats, 3, padding=1))
        upsampler: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            upsampler += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2)]
        self.tail = nn.Sequential(*upsampler, nn.Conv2d(n_feats, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.body(h) + h)


def edsr_parameter_count(in_channels: int, n_feats: int, n_blocks: int, scale: int = 1) -> int:
    """Closed form of EDSRRestorer's parameter count (3x3 convolutions with biases), as in spec §2.3."""
    conv = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731
    ups = int(math.log2(scale)) * conv(n_feats, 4 * n_feats)
    return conv(in_channels, n_feats) + (2 * n_blocks + 1) * conv(n_feats, n_feats) + ups + conv(n_feats, in_channels)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (4): L(θ) = 1/(2N) Σ ||F(X, θ) − Y||², the squared error summed per image, halved, averaged."""
    if output.shape != target.shape:
        raise ValueError(f"output and target shapes differ: {tuple(output.shape)} vs {tuple(target.shape)}")
    return 0.5 * (output - target).pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------- the defense

class ReconstructionDefense(Defense):
    """D(x) = clamp(R_θ(Q_k(x)), 0, 1). Q_k is a step function, so `differentiable` is False.

    `bpda_purify` is the same forward with a straight-through gradient for Q_k and exact gradients
    through R_θ: what an adaptive (BPDA) attacker differentiates (spec §7.4); lib.attacks.attack_surface uses it.
    """

    differentiable = False

    def __init__(self, restorer: nn.Module, levels: int):
        super().__init__()
        _check_levels(levels)
        self.restorer = restorer
        self.levels = levels

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.restorer(quantize(x, self.levels)).clamp(0.0, 1.0)

    def bpda_purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.restorer(straight_through_quantize(x, self.levels)).clamp(0.0, 1.0)

    def fit(self, x_clean: torch.Tensor, x_adv: torch.Tensor, cfg: RestorerConfig, *,
            device: torch.device | None = None) -> "ReconstructionDefense":
        """Train R_θ on (Q_k(x̃), x) pairs with train_restorer; cfg.levels must be this defense's k."""
        if cfg.levels != self.levels:
            raise ValueError(f"cfg.levels={cfg.levels} differs from the defense's levels={self.levels}")
        self.history = train_restorer(self.restorer, x_clean, x_adv, cfg, device=device)
        return self.eval()

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


# --------------------------------------------------------------------------- training R_θ

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
        _check_levels(self.levels)
        check_nonnegative(self.eps_max, "eps_max")
        for name in ("n_feats", "n_blocks", "epochs", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if not 0.0 <= self.p_adv <= 1.0:
            raise ValueError(f"p_adv must lie in [0, 1], got {self.p_adv}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def lr_factor(epoch: int, epochs: int) -> float:
    """EDSR-style step schedule: 1, then 1/2 from 50% of the epochs, 1/4 from 75%."""
    return 0.5 ** sum(epoch >= m * epochs for m in (0.5, 0.75))


def train_restorer(restorer: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, cfg: RestorerConfig, *,
                   device: torch.device | None = None, checkpoint: Path | None = None) -> list[dict]:
    """Train R_θ in place with eq. (4) on (Q_k(x̃), x), x̃ = x_adv with probability p_adv else x (§2.4).

    With `checkpoint`, state is saved atomically after every epoch and an interrupted run resumes.
    Returns the per-epoch history (mean eq.-(4) loss).
    """
    check_images(x_clean, "x_clean")
    check_images(x_adv, "x_adv")
    if x_clean.shape != x_adv.shape:
        raise ValueError(f"x_clean and x_adv shapes differ: {tuple(x_clean.shape)} vs {tuple(x_adv.shape)}")
    device = device or get_device()
    restorer.to(device)
    opt = torch.optim.Adam(restorer.parameters(), lr=cfg.lr)
    history: list[dict] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = cache.load(checkpoint)
        restorer.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = list(state["history"]), int(state["epoch"])
    n = len(x_clean)
    for epoch in range(start, cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(epoch, cfg.epochs)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        use_adv = torch.rand(n, generator=gen) < cfg.p_adv
        order = torch.randperm(n, generator=gen)
        restorer.train()
        loss_sum = 0.0
        for idx in order.split(cfg.batch_size):
            target = x_clean[idx].to(device)
            source = torch.where(use_adv[idx].view(-1, 1, 1, 1).to(device), x_adv[idx].to(device), target)
            opt.zero_grad(set_to_none=True)
            loss = reconstruction_loss(restorer(quantize(source, cfg.levels)), target)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
        history.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "loss": loss_sum / n,
                        "adv_fraction": float(use_adv.float().mean())})
        if checkpoint is not None:
            cache.atomic_save({"model": restorer.state_dict(), "optimizer": opt.state_dict(),
                               "history": history, "epoch": epoch + 1}, checkpoint)
    restorer.eval()
    return history


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

    Returns (ReconstructionDefense in eval mode, metadata incl. history, train_seconds and cache_hit).
    """
    device = device or get_device()

    def build() -> nn.Module:
        seed_everything(cfg.seed)
        return EDSRRestorer(train.info.channels, cfg.n_feats, cfg.n_blocks, cfg.res_scale)

    def fit(restorer: nn.Module, partial: Path) -> dict:
        x_adv = fgsm_examples(classifier, train.x, train.y, cfg.eps_max, device=device)
        history = train_restorer(restorer, train.x, x_adv, cfg, device=device, checkpoint=partial)
        return {"history": history, "final_loss": history[-1]["loss"], "train_size": len(train)}

    config = {"restorer": asdict(cfg), "data": cache.tensor_digest(train.x, train.y),
              "classifier": model_digest(classifier)}
    restorer, meta = cached_model("reconstruction/restorer", config, build, fit, code=(fgsm_examples,), device=device)
    return ReconstructionDefense(restorer, cfg.levels).to(device).eval(), meta


# --------------------------------------------------------------------------- attacks as the paper runs them

def bim_schedule(eps: float, steps: int | None = None) -> dict[str, float | int]:
    """BIM's (steps, alpha) for ε in [0, 1] (spec §2.7).

    steps None: Kurakin's rule T = max(10, int(min(ε255 + 4, 1.25 ε255))), α = min(1/255, 2.5 ε / T);
    a fixed `steps` (the cpu-scale deviation) uses α = 2.5 ε / steps.
    """
    check_nonnegative(eps, "eps")
    if steps is None:
        e255 = 255.0 * eps
        steps = max(10, int(min(e255 + 4, 1.25 * e255)))
        return {"steps": steps, "alpha": min(1.0 / 255.0, 2.5 * eps / steps)}
    check_positive_int(steps, "steps")
    return {"steps": steps, "alpha": 2.5 * eps / steps}


def clip_to_linf_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """Project x_adv onto the L-inf ball of radius ε around x (and [0, 1]): the tables' ε for DeepFool/CW (§2.7)."""
    check_nonnegative(eps, "eps")
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv shapes differ: {tuple(x.shape)} vs {tuple(x_adv.shape)}")
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- Table 4 adversarial training

ADV_TRAINING = ("fgsm", "bim")


def adversarial_training_loss(kind: str, *, sigma: float = 8 / 255, max_steps: int | None = None,
                              adv_weight: float = 0.3) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Kurakin et al. (2017) adversarial training as in PixelDefend's code (spec §2.8), for fit_classifier.

    Half of each batch stays clean; the other half is attacked with the model's *predicted* labels
    (no label leaking) at ε = |truncated normal(0, σ)| (cut at 2σ): per example for FGSM, per batch for
    BIM with T = int(min(ε255 + 4, 1.25 ε255)) steps (at most `max_steps`) of α = max(1/255, ε/T).
    Loss = (CE_clean + adv_weight · CE_adv) / (1 + adv_weight). Attacks run in the model's current mode.
    """
    if kind not in ADV_TRAINING:
        raise ValueError(f"unknown adversarial training {kind!r}; valid: {', '.join(ADV_TRAINING)}")
    check_nonnegative(sigma, "sigma")
    check_nonnegative(adv_weight, "adv_weight")
    if max_steps is not None:
        check_positive_int(max_steps, "max_steps")

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        half = len(xb) // 2
        x_src = xb[half:]
        with torch.no_grad():
            pred = model(x_src).argmax(1)
        if kind == "fgsm":
            eps = (torch.randn(len(x_src), device=xb.device).clamp(-2, 2).abs() * sigma).view(-1, 1, 1, 1)
            x_adv = (x_src + eps * input_gradient(model, x_src, pred).sign()).clamp(0.0, 1.0).detach()
        else:
            eps = float(torch.randn(()).clamp(-2, 2).abs()) * sigma
            e255 = 255.0 * eps
            steps = max(1, int(min(e255 + 4, 1.25 * e255)))
            steps = min(steps, max_steps) if max_steps is not None else steps
            x_adv = bim(model, x_src, pred, eps=eps, alpha=max(1.0 / 255.0, eps / steps), steps=steps)
        ce_clean = F.cross_entropy(model(xb[:half]), yb[:half])
        ce_adv = F.cross_entropy(model(x_adv), yb[half:])
        return (ce_clean + adv_weight * ce_adv) / (1.0 + adv_weight)

    return loss_fn


def paper_classifier(arch: str, train: ImageData, test: ImageData, cfg: TrainConfig, *, width: float = 1.0,
                     adversarial: str | None = None, adv_max_steps: int | None = None,
                     device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """One of the paper's classifiers (lib.models name `arch`) trained on `train`, cached; meta has test accuracy.

    `adversarial` 'fgsm' / 'bim' trains with adversarial_training_loss.
    """
    device = device or get_device()
    info = train.info
    loss_fn = None if adversarial is None else adversarial_training_loss(adversarial, max_steps=adv_max_steps)

    def build() -> nn.Module:
        seed_everything(cfg.seed)
        return build_classifier(arch, num_classes=info.num_classes, in_channels=info.channels,
                                image_size=info.image_size, mean=info.mean, std=info.std, width=width)

    def fit(model: nn.Module, partial: Path) -> dict:
        history = fit_classifier(model, train, cfg, device=device, checkpoint=partial, loss_fn=loss_fn,
                                 desc=f"{info.name}/{arch}" + (f"/adv-{adversarial}" if adversarial else ""))
        return {"test_accuracy": accuracy(model, test.x, test.y, device=device), "final_loss": history[-1]["loss"]}

    config = {"dataset": info.name, "arch": arch, "width": width, "train": asdict(cfg),
              "adversarial": adversarial, "adv_max_steps": adv_max_steps,
              "train_data": cache.tensor_digest(train.x, train.y), "test_data": cache.tensor_digest(test.x, test.y)}
    code = (adversarial_training_loss,) if adversarial else ()
    return cached_model(f"reconstruction/classifiers/{info.name}", config, build, fit, code=code, device=device)


# --------------------------------------------------------------------------- evaluation as the paper does it

def paper_attacks(eps: float, *, bim_steps: int | None = None, deepfool: dict | None = None,
                  cw: dict | None = None) -> dict[str, AttackSpec]:
    """The four attacks of Tables 1-4 at strength ε: FGSM, BIM (bim_schedule), DeepFool and CW-L2.

    DeepFool and CW are minimum-norm attacks with their own parameters (`deepfool`, `cw`: keyword
    arguments of lib.attacks.deepfool / cw_l2); the tables clip them to the ε-ball afterwards.
    """
    return {"FGSM": AttackSpec("fgsm", {"eps": eps}, "FGSM"),
            "BIM": AttackSpec("bim", {"eps": eps, **bim_schedule(eps, bim_steps)}, "BIM"),
            "DeepFool": AttackSpec("deepfool", dict(deepfool or {}), "DeepFool"),
            "CW": AttackSpec("cw_l2", dict(cw or {}), "CW")}


def robustness_rows(attacked: nn.Module, evaluated: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                    attacks: dict[str, AttackSpec], *, clip_eps: float | None = None, batch_size: int = 256,
                    device: torch.device | None = None) -> list[dict]:
    """Accuracy (%) of every model in `evaluated` on clean x and on each attack crafted on `attacked`.

    The paper's protocol: attacks see `attacked` only (e.g. the bare classifier), then every evaluated
    model (e.g. classifier and classifier∘defense) classifies the same adversarial images. Attacks
    without an ε (DeepFool, CW) are projected onto the clip_eps L-inf ball when clip_eps is given;
    rows say so in 'clipped'. Adversarial sets are cached (lib.evaluate.adversarial_set).
    """
    device = device or get_device()
    x, y = x.to(device), y.to(device)
    rows = [{"attack": "Clean", "model": name, "accuracy": accuracy(m, x, y, batch_size, device), "clipped": False,
             "attack_seconds": 0.0} for name, m in evaluated.items()]
    for label, spec in attacks.items():
        x_adv, seconds = adversarial_set(spec, attacked, x, y, batch_size=batch_size)
        clipped = clip_eps is not None and spec.eps is None
        if clipped:
            x_adv = clip_to_linf_ball(x, x_adv, clip_eps)
        rows += [{"attack": label, "model": name, "accuracy": accuracy(m, x_adv, y, batch_size, device),
                  "clipped": clipped, "attack_seconds": seconds} for name, m in evaluated.items()]
    return rows


def reconstruction_for(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
                       device: torch.device | None = None) -> tuple[ReconstructionDefense, dict]:
    """Compression + reconstruction for `dataset`, trained (cached) on FGSM examples of `classifier`, with the
    settings of the profile's notebooks.04_image_reconstruction section (its per-dataset levels and eps_max)."""
    from lib.data import load_dataset
    from lib.profiles import notebook_config

    cfg = notebook_config(profile, "04_image_reconstruction")
    if dataset not in cfg["per_dataset"]:
        raise ValueError(f"profile {profile['name']!r} has no reconstruction settings for {dataset!r}; "
                         f"it has: {', '.join(cfg['per_dataset'])}")
    ds = cfg["per_dataset"][dataset]
    train = load_dataset(dataset, "train", n=ds.get("train_size", cfg["train_size"]), seed=profile["seed"])
    rcfg = RestorerConfig(levels=ds["levels"], eps_max=ds["eps_max"], seed=profile["seed"],
                          **{**cfg["restorer"], **ds.get("restorer", {})})
    return trained_reconstruction(classifier, train, rcfg, device=device)
