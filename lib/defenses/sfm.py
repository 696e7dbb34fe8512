"""SFM-Defense (Yu et al. 2022): a sparse feature masker in front of a feature-squeezing preprocessor.

An Attention U-Net G predicts one mask channel m = G(x) in [0, 1]; the defended prediction is
F(T(x * m)) (mask first, then the squeezer T). G is trained with Eq. 2,
    L_mask = w1 * ||x~||_1 + w2 * (1 - cos(F(x), F(x~))) + w3 * ||x - x~||_2,
alternating epoch by epoch with cross-entropy epochs of the classifier F on T(x) (Algorithm 1,
where the masker sees T(x), so training uses M(T(x)) as written in the paper; spec-000 §8 item 3).

The batch reduction of the L1/L2 terms decides whether the published w1 does anything at all
(spec-000 §2.5.1): the default "batch_tensor" sums |x~| over the whole batch and takes one Frobenius
norm of x - x~ over the whole batch; `rescale_w1` keeps w1 at the paper's distance from the
identity-mask threshold when batch size or image size change. Mask statistics are logged every epoch
and a mask collapsed to all zeros or all ones is reported. `sfm_for` builds the whole thing from a profile
(notebook 01 and the defense registry both call it).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lib.attacks.adaptive import bpda
from lib.data import DatasetInfo, ImageData, balanced_subset, load_dataset
from lib.defenses.base import Defense, NoDefense
from lib.defenses.squeeze import squeezer
from lib.evaluate import model_digest
from lib.profiles import dataset_config, notebook_config
from lib.runtime import get_device, seed_everything
from lib.train import augment_batch
from lib.validate import check_images, check_positive_int

REDUCTIONS = ("batch_tensor", "per_sample")
SEG_REDUCTIONS = ("mean", "sum")
# Elements coupled by one norm for which the paper's weights were published (spec-000 §2.5.1):
# 3 x 32 x 32 x 128 for CIFAR10/SVHN (w1 = 2.5e-3), 3 x 64 x 64 x 128 for Tiny-ImageNet (w1 = 0.1, w3 = 100).
REFERENCE_ELEMENTS = {"cifar": 3 * 32 * 32 * 128, "tiny": 3 * 64 * 64 * 128}
PAPER_WEIGHTS = {"cifar": (2.5e-3, 1.0, 1.0), "tiny": (0.1, 0.01, 100.0)}
ZERO_LEVEL, ONE_LEVEL = 0.01, 0.99
NOTEBOOK = "01_sfm_defense"  # the profile section read by sfm_for
# w1 / threshold used when no ratio is given: where the paper's CIFAR weights sit (paper_threshold_ratio("cifar")
# = 1.568, to the two digits of every profile's sweep grid); a profile may set `default_ratio` instead.
DEFAULT_RATIO = 1.57


# --------------------------------------------------------------------------- mask generator


class _ConvBlock(nn.Sequential):
    """[Conv3x3 -> BatchNorm -> ReLU] x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpConv(nn.Sequential):
    """Nearest x2 upsampling -> Conv3x3 -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _AttentionGate(nn.Module):
    """Oktay et al. 2018 additive attention: skip * sigmoid(BN(conv(relu(BN(conv g) + BN(conv skip)))))."""

    def __init__(self, f_g: int, f_l: int, f_int: int):
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(f_g, f_int, 1), nn.BatchNorm2d(f_int))
        self.w_x = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.BatchNorm2d(f_int))
        self.psi = nn.Sequential(nn.Conv2d(f_int, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(F.relu(self.w_g(g) + self.w_x(skip)))


class AttentionUNet(nn.Module):
    """The mask generator G: Attention U-Net (AttU_Net layout), C channels in, one sigmoid channel out.

    base_width b and depth d (resolution levels, d - 1 poolings) set the size; the paper's scale is
    b = 64, d = 5 (about 35 M parameters). Inputs need sides divisible by 2 ** (d - 1).
    """

    def __init__(self, in_channels: int, base_width: int = 64, depth: int = 5):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(base_width, "base_width")
        if int(depth) != depth or depth < 2:
            raise ValueError(f"depth must be an integer >= 2 (levels of the U-Net), got {depth}")
        widths = [base_width * 2 ** i for i in range(depth)]
        self.depth = depth
        self.encoders = nn.ModuleList([_ConvBlock(in_channels, widths[0])] +
                                      [_ConvBlock(widths[i - 1], widths[i]) for i in range(1, depth)])
        self.ups = nn.ModuleList([_UpConv(widths[i], widths[i - 1]) for i in range(depth - 1, 0, -1)])
        self.gates = nn.ModuleList([_AttentionGate(widths[i - 1], widths[i - 1], max(1, widths[i - 1] // 2))
                                    for i in range(depth - 1, 0, -1)])
        self.decoders = nn.ModuleList([_ConvBlock(2 * widths[i - 1], widths[i - 1]) for i in range(depth - 1, 0, -1)])
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.depth - 1)
        if x.dim() != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"AttentionUNet of depth {self.depth} needs (N, C, H, W) with H and W divisible by "
                             f"{factor}, got {tuple(x.shape)}")
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(F.max_pool2d(h, 2) if i else h)
            skips.append(h)
        for up, gate, dec, skip in zip(self.ups, self.gates, self.decoders, reversed(skips[:-1])):
            h = up(h)
            h = dec(torch.cat([gate(h, skip), h], dim=1))
        return torch.sigmoid(self.out(h))


# --------------------------------------------------------------------------- losses (Eqs. 3-5)


def _check_reduction(reduction: str, seg_reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    if seg_reduction not in SEG_REDUCTIONS:
        raise ValueError(f"unknown seg_reduction {seg_reduction!r}; valid: {', '.join(SEG_REDUCTIONS)}")


def sparsity_loss(x_tilde: torch.Tensor, reduction: str = "batch_tensor") -> torch.Tensor:
    """Eq. 3, L_sp = ||x~||_1: summed over the whole batch, or per sample then averaged."""
    _check_reduction(reduction, "mean")
    per = x_tilde.abs().flatten(1).sum(1)
    return per.sum() if reduction == "batch_tensor" else per.mean()


def semantic_loss(logits_clean: torch.Tensor, logits_masked: torch.Tensor, seg_reduction: str = "mean") -> torch.Tensor:
    """Eq. 4, L_seg = 1 - cos(F(x), F(x~)) per sample, averaged (or summed) over the batch."""
    _check_reduction("batch_tensor", seg_reduction)
    per = 1.0 - F.cosine_similarity(logits_clean, logits_masked, dim=1, eps=1e-12)
    return per.mean() if seg_reduction == "mean" else per.sum()


def reconstruction_loss(x: torch.Tensor, x_tilde: torch.Tensor, reduction: str = "batch_tensor") -> torch.Tensor:
    """Eq. 5, L_recon = ||x - x~||_2 (not squared): one norm over the whole batch, or per sample then averaged."""
    _check_reduction(reduction, "mean")
    diff = (x - x_tilde).flatten(1)
    # sqrt(sum + tiny) keeps the gradient finite when x~ = x exactly (all-ones mask)
    if reduction == "batch_tensor":
        return (diff.square().sum() + 1e-12).sqrt()
    return (diff.square().sum(1) + 1e-12).sqrt().mean()


def sfm_losses(x: torch.Tensor, x_tilde: torch.Tensor, logits_clean: torch.Tensor, logits_masked: torch.Tensor,
               weights: tuple[float, float, float], reduction: str = "batch_tensor",
               seg_reduction: str = "mean") -> dict[str, torch.Tensor]:
    """The three terms and Eq. 2's total L_mask = w1 L_sp + w2 L_seg + w3 L_recon."""
    w1, w2, w3 = weights
    terms = {"sp": sparsity_loss(x_tilde, reduction), "seg": semantic_loss(logits_clean, logits_masked, seg_reduction),
             "recon": reconstruction_loss(x, x_tilde, reduction)}
    terms["total"] = w1 * terms["sp"] + w2 * terms["seg"] + w3 * terms["recon"]
    return terms


# --------------------------------------------------------------------------- loss scale (spec §2.5.1)


def coupled_elements(x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor") -> float:
    """Effective number of elements one L1/L2 norm couples: sum_p a_p^2 / b_p per image (a_p, b_p: sum and sum of
    squares of pixel p over channels; 3 per grey colour pixel, 1 per non-zero grey pixel), times the batch size
    for the batch-tensor reduction. The identity mask is optimal for w1 / w3 <= 1 / sqrt(this)."""
    check_images(x)
    a, b = x.sum(1), x.square().sum(1)
    per_image = torch.where(b > 0, a.square() / b.clamp_min(1e-12), torch.zeros_like(a)).flatten(1).sum(1).mean()
    return float(per_image) * (batch_size if reduction == "batch_tensor" else 1)


def identity_threshold(x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor") -> float:
    """1 / sqrt(coupled_elements): the largest w1 / w3 for which the all-ones mask minimises w1 L_sp + w3 L_recon."""
    return 1.0 / math.sqrt(coupled_elements(x, batch_size, reduction))


def paper_threshold_ratio(setting: str = "cifar") -> float:
    """(w1 / w3) / threshold of the paper's published weights under the batch-tensor reading at B = 128
    (about 1.57 for CIFAR10/SVHN, 1.25 for Tiny-ImageNet): how far past the identity threshold the paper sits."""
    if setting not in PAPER_WEIGHTS:
        raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(PAPER_WEIGHTS)}")
    w1, _, w3 = PAPER_WEIGHTS[setting]
    return w1 / w3 * math.sqrt(REFERENCE_ELEMENTS[setting])


def w1_for_ratio(ratio: float, x: torch.Tensor, batch_size: int, reduction: str = "batch_tensor",
                 w3: float = 1.0) -> float:
    """The w1 that puts w1 / w3 at `ratio` times the identity threshold for images like x (spec-000 §2.5.1 rescaling)."""
    if not ratio >= 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    return float(ratio) * w3 * identity_threshold(x, batch_size, reduction)


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


# --------------------------------------------------------------------------- the defense


class MaskedClassifier(nn.Module):
    """F(x * G(x)): the gray-box attack surface (classifier and masker known, squeezer T not)."""

    def __init__(self, classifier: nn.Module, masker: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.masker = masker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x * self.masker(x))


class SFMDefense(Defense):
    """purify(x) = T(x * G(x)); the defended model is classifier(purify(x)) with the classifier trained by train_sfm.

    Gradients are meaningful (differentiable = True): they flow through the masker exactly and through T
    by BPDA with an identity backward (spec-000 §8 item 8), which is what the adaptive white box differentiates.
    """

    def __init__(self, masker: nn.Module, preprocess: Defense | None = None):
        super().__init__()
        self.masker = masker
        self.preprocess = preprocess if preprocess is not None else NoDefense()
        self._t = bpda(self.preprocess.purify)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """m = G(x), shape (N, 1, H, W), values in [0, 1]."""
        return self.masker(x)

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """x~ = x * G(x), the mask broadcast over channels."""
        return x * self.masker(x)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self._t(self.masked(x))

    def gray_box_model(self, classifier: nn.Module) -> MaskedClassifier:
        """The model a gray-box attacker differentiates: classifier(x * G(x)), without T."""
        return MaskedClassifier(classifier, self.masker)


# --------------------------------------------------------------------------- training (Algorithm 1)


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
        _check_reduction(self.reduction, self.seg_reduction)
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


def classifier_optimizer(classifier: nn.Module, cfg: SFMConfig) -> torch.optim.Optimizer:
    """The optimizer of F's cross-entropy epochs."""
    if cfg.clf_optimizer == "adam":
        return torch.optim.Adam(classifier.parameters(), lr=cfg.clf_lr, weight_decay=cfg.clf_weight_decay)
    return torch.optim.SGD(classifier.parameters(), lr=cfg.clf_lr, momentum=cfg.clf_momentum,
                           weight_decay=cfg.clf_weight_decay)


def masker_optimizer(masker: nn.Module, cfg: SFMConfig) -> torch.optim.Optimizer:
    """SGD on the masker's parameters only (Algorithm 1)."""
    return torch.optim.SGD(masker.parameters(), lr=cfg.masker_lr, momentum=cfg.masker_momentum)


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        yield x[idx], y[idx]


def classifier_epoch(classifier: nn.Module, x_t: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                     batch_size: int, seed: int, augment: bool = False, device: torch.device | None = None
                     ) -> dict[str, float]:
    """One cross-entropy epoch of F on already squeezed images T(x) (Algorithm 1, step 1); the masker is not used."""
    device = device or get_device()
    gen = torch.Generator().manual_seed(seed)
    classifier.train()
    total, correct, loss_sum = 0, 0, 0.0
    for xb, yb in _batches(x_t, y, batch_size, seed):
        xb, yb = xb.to(device), yb.to(device)
        if augment:
            xb = augment_batch(xb, gen)
        opt.zero_grad(set_to_none=True)
        logits = classifier(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        opt.step()
        loss_sum += float(loss.detach()) * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        total += len(yb)
    classifier.eval()
    return {"ce": loss_sum / total, "train_acc": 100.0 * correct / total}


def masker_epoch(classifier: nn.Module, masker: nn.Module, x_t: torch.Tensor, opt: torch.optim.Optimizer,
                 cfg: SFMConfig, seed: int, device: torch.device | None = None) -> dict[str, float]:
    """One SFM epoch (Algorithm 1, step 2) on x_t = T(x): step on eta with Eq. 2; F frozen in eval mode, labels unused.

    Returns the epoch means of the three loss terms, L_mask and the mask statistics.
    """
    device = device or get_device()
    classifier.eval()
    frozen = [p for p in classifier.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    masker.train()
    sums: dict[str, float] = {}
    batches = 0
    try:
        for xb, _ in _batches(x_t, torch.zeros(len(x_t), dtype=torch.long), cfg.batch_size, seed):
            xb = xb.to(device)
            with torch.no_grad():
                logits_clean = classifier(xb)
            mask = masker(xb)
            x_tilde = xb * mask
            terms = sfm_losses(xb, x_tilde, logits_clean, classifier(x_tilde), cfg.weights, cfg.reduction,
                               cfg.seg_reduction)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            stats = {f"L_{k}": float(v.detach()) for k, v in terms.items()} | mask_statistics(mask.detach())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
    finally:
        for p in frozen:
            p.requires_grad_(True)
        masker.eval()
    return {k: v / batches for k, v in sums.items()}


@torch.no_grad()
def apply_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 512,
                     device: torch.device | None = None) -> torch.Tensor:
    """fn over x in mini-batches on `device`; the result on CPU."""
    device = device or get_device()
    return torch.cat([fn(xb.to(device)).cpu() for xb in x.split(batch_size)])


def train_sfm(classifier: nn.Module, masker: nn.Module, preprocess: Defense, data: ImageData, cfg: SFMConfig, *,
              device: torch.device | None = None, log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Algorithm 1: E_pre cross-entropy epochs of F on T(x), then E alternating (F epoch, SFM epoch) rounds.

    T is deterministic, so T(train set) is computed once. Every SFM epoch logs the mask statistics and
    its status; a mask that ends collapsed (all zeros) or trivial (all ones) raises a warning.
    Returns one history row per epoch (phase 'pretrain', 'classifier' or 'masker').
    """
    device = device or get_device()
    classifier.to(device)
    masker.to(device)
    preprocess.to(device).eval()
    x_t = apply_in_batches(preprocess.purify, data.x, device=device)
    clf_opt, mask_opt = classifier_optimizer(classifier, cfg), masker_optimizer(masker, cfg)
    history: list[dict[str, Any]] = []
    say = log or (lambda _msg: None)
    for epoch in range(cfg.pre_epochs):
        row = classifier_epoch(classifier, x_t, data.y, clf_opt, cfg.batch_size, cfg.seed * 1000 + epoch,
                               cfg.augment, device)
        history.append({"phase": "pretrain", "epoch": epoch + 1, **row})
        say(f"pretrain {epoch + 1}/{cfg.pre_epochs}: CE {row['ce']:.4f}, train acc {row['train_acc']:.1f}%")
    for epoch in range(cfg.epochs):
        seed = cfg.seed * 1000 + cfg.pre_epochs + epoch
        row = classifier_epoch(classifier, x_t, data.y, clf_opt, cfg.batch_size, seed, cfg.augment, device)
        history.append({"phase": "classifier", "epoch": epoch + 1, **row})
        stats = masker_epoch(classifier, masker, x_t, mask_opt, cfg, seed, device)
        status = mask_status(stats)
        history.append({"phase": "masker", "epoch": epoch + 1, **stats, "mask_status": status})
        say(f"round {epoch + 1}/{cfg.epochs}: CE {row['ce']:.4f} | L_mask {stats['L_total']:.4g} (sp {stats['L_sp']:.4g}, "
            f"seg {stats['L_seg']:.4f}, recon {stats['L_recon']:.4g}) | mask mean {stats['mask_mean']:.3f}, "
            f"<0.01 {stats['mask_frac_zero']:.3f}, >0.99 {stats['mask_frac_one']:.3f} [{status}]")
    final = final_mask_status(history)
    if final not in ("partial", "not trained"):
        warnings.warn(f"SFM mask ended {final} (w = {cfg.weights}, reduction {cfg.reduction}); see spec-000 §2.5.1",
                      RuntimeWarning, stacklevel=2)
    return history


def final_mask_status(history: list[Mapping[str, Any]]) -> str:
    """The mask status of the last SFM epoch in a train_sfm history ('not trained' if there was none)."""
    rows = [r for r in history if r.get("phase") == "masker"]
    return rows[-1]["mask_status"] if rows else "not trained"


class _SFMPair(nn.Module):
    """Classifier F and masker G as one module, so both are cached together."""

    def __init__(self, classifier: nn.Module, masker: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.masker = masker


def trained_sfm(build_classifier: Callable[[], nn.Module], preprocess: Defense, preprocess_config: Mapping[str, Any],
                data: ImageData, cfg: SFMConfig, *, key: Mapping[str, Any], device: torch.device | None = None,
                log: Callable[[str], None] | None = print) -> tuple[nn.Module, SFMDefense, dict[str, Any]]:
    """Train (or load from the cache) F and G with train_sfm; returns (F, SFMDefense(G, T), metadata).

    `key` describes the classifier architecture and dataset, `preprocess_config` the squeezer T; together
    with cfg, the training data digest and the source code they key the cache entry.
    """
    from lib import cache
    from lib.train import cached_model

    device = device or get_device()

    def build() -> _SFMPair:
        seed_everything(cfg.seed)
        return _SFMPair(build_classifier(), AttentionUNet(data.info.channels, cfg.base_width, cfg.depth))

    def train(pair: _SFMPair, _partial: Path) -> dict:
        t0 = time.perf_counter()
        history = train_sfm(pair.classifier, pair.masker, preprocess, data, cfg, device=device, log=log)
        return {"history": history, "train_seconds": time.perf_counter() - t0, "train_size": len(data),
                "mask_status": final_mask_status(history)}

    config = {"model": dict(key), "preprocess": dict(preprocess_config), "sfm": asdict(cfg),
              "train_data": cache.tensor_digest(data.x, data.y)}
    pair, meta = cached_model("sfm", config, build, train, code=(type(preprocess), train_sfm), device=device)
    defense = SFMDefense(pair.masker, preprocess).to(device).eval()
    return pair.classifier, defense, meta


# --------------------------------------------------------------------------- from a profile (notebook 01, registry)


def sfm_splits(profile: Mapping[str, Any], dataset: str) -> tuple[ImageData, ImageData]:
    """(SFM training subset, validation split) of the profile's training split for `dataset`.

    The validation split (`val_size` class-balanced images, seed + 1) is held out to choose w1; the rest, reduced to a
    class-balanced `sfm_train_size` subset when that is set, trains Algorithm 1.
    """
    cfg = notebook_config(profile, NOTEBOOK)
    seed = profile["seed"]
    train = load_dataset(dataset, "train", n=dataset_config(profile, dataset).get("train_size"), seed=seed)
    val_idx = balanced_subset(train.y, cfg["val_size"], seed=seed + 1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    rest = keep.nonzero().flatten()
    n_sfm = cfg["sfm_train_size"]
    if n_sfm is not None and n_sfm < len(rest):
        rest = rest[balanced_subset(train.y[rest], n_sfm, seed=seed)]
    return train.subset(rest), train.subset(val_idx)


def default_ratio(profile: Mapping[str, Any]) -> float:
    """The profile's `default_ratio` (w1 / identity threshold) for SFM, else DEFAULT_RATIO (the paper's weights)."""
    return float(notebook_config(profile, NOTEBOOK).get("default_ratio", DEFAULT_RATIO))


def sfm_config(profile: Mapping[str, Any], sfm_data: ImageData, *, ratio: float | None = None,
               overrides: Mapping[str, Any] | None = None) -> SFMConfig:
    """The profile's SFM settings with w1 = ratio x the identity threshold of the SFM training images (spec-000
    §2.5.1, computed with the profile's w3 and batch size), then `overrides` (e.g. the loss ablations)."""
    base = dict(notebook_config(profile, NOTEBOOK)["sfm"])
    defaults = SFMConfig()
    base["w1"] = w1_for_ratio(default_ratio(profile) if ratio is None else ratio, sfm_data.x,
                              base.get("batch_size", defaults.batch_size), base.get("reduction", defaults.reduction),
                              base.get("w3", defaults.w3))
    return SFMConfig.from_mapping({**base, **(overrides or {}), "seed": profile["seed"]})


def _fresh_classifier(arch: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
    """An untrained classifier of the profile's architecture for the dataset described by `info`."""
    from lib.models import build_classifier

    return build_classifier(arch["arch"], num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, mean=info.mean, std=info.std,
                            width=arch.get("width", 1.0), depth=arch.get("depth"))


def sfm_for(profile: Mapping[str, Any], dataset: str, target: nn.Module, *, preprocess: str | None = None,
            ratio: float | None = None, overrides: Mapping[str, Any] | None = None,
            device: torch.device | None = None, log: Callable[[str], None] | None = print
            ) -> tuple[nn.Module, SFMDefense, dict[str, Any]]:
    """SFM-Defense for `dataset` as the profile's `notebooks.01_sfm_defense` section sets it up, trained or cached.

    Returns (F_theta, SFMDefense(G, T), metadata). F_theta is SFM's own classifier, fine-tuned on T(x) by
    Algorithm 1 (starting from a copy of `target` when the profile sets `init_from_target`, else from scratch);
    (F_theta, defense) is the pipeline notebook 01 evaluates. The registry places the SFMDefense alone, element [1],
    in front of the benchmark's common classifier instead. `preprocess` is a squeezer spec ('median2', 'bit5', 'nlm';
    default the profile's `default_preprocess`), `ratio` sets w1 / identity threshold (default: default_ratio),
    `overrides` replace SFM settings after that (ablations). Metadata adds 'ratio', 'preprocess' and 'config'
    (the SFMConfig) to trained_sfm's.
    """
    cfg = notebook_config(profile, NOTEBOOK)
    spec = cfg["default_preprocess"] if preprocess is None else preprocess
    ratio = default_ratio(profile) if ratio is None else float(ratio)
    arch = dataset_config(profile, dataset)["classifier"]
    sfm_data, _ = sfm_splits(profile, dataset)
    sfm_cfg = sfm_config(profile, sfm_data, ratio=ratio, overrides=overrides)
    init = bool(cfg["init_from_target"])
    build = ((lambda: copy.deepcopy(target).requires_grad_(True)) if init
             else (lambda: _fresh_classifier(arch, sfm_data.info)))
    key = {"dataset": dataset, "arch": arch, "init": model_digest(target) if init else "scratch"}
    say = log or (lambda _msg: None)
    extra = f", overrides {dict(overrides)}" if overrides else ""
    say(f"--- {dataset}: SFM-Defense, T = {spec}, w1 = {ratio} x threshold{extra} "
        f"(w = {tuple(round(w, 6) for w in sfm_cfg.weights)})")
    clf, defense, meta = trained_sfm(build, squeezer(spec), {"spec": spec}, sfm_data, sfm_cfg, key=key,
                                     device=device, log=log)
    if meta["cache_hit"]:
        say(f"loaded from cache; mask status at the end of training: {meta['mask_status']}")
    return clf, defense, {**meta, "ratio": ratio, "preprocess": spec, "config": sfm_cfg}
