"""IDFR (anonymous ICLR-2022 submission, spec-001): a U-Net input denoiser (ID) and an MLP feature restorer (FR)
around a frozen classifier f = f_cls o f_enc. Prediction: f_cls(F_pi(f_enc(I_w(x)))).

- InputDenoiser: the 9-layer U-Net of the paper's Table 6 (strides/upsampling as in the authors' PyTorch code),
  channel counts scaled by `width` for small profiles.
- id_loss / train_denoiser: Eq. 3, cross-entropy of the frozen classifier on I_w(z) for adversarial examples and
  Gaussian-noised clean images ("ce"); the authors' code variant, L1 between f_enc(I_w(x')) and f_enc(x)
  ("feature_l1", HGD-style); and a pixel-L1 denoiser ("pixel_l1", HGD's pixel-guided baseline).
- FeatureRestorer / ConvexHullSampler / train_restorer: Table 7's MLP on penultimate features, trained with
  f_cls's cross-entropy on mixtures a*h_x + (1-a)*h_x~ of a correctly classified (p1) and a misclassified (p2)
  embedding of the same class (Eq. 6, Alg. 2; pairing="code" draws both endpoints from the class's union pool).
- IDFRClassifier: the whole pipeline as one module (ablation by leaving ID or FR out), so lib.evaluate and the
  attack registry can treat it as a plain classifier; InputDenoising is the ID alone as a lib Defense.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib import cache
from lib.defenses.base import Defense
from lib.evaluate import AttackSpec, adversarial_set
from lib.runtime import get_device, seed_everything
from lib.train import cached_model
from lib.validate import check_images, check_labels, check_nonnegative, check_positive_int

SKIP8 = ("layer2", "layer1")
OUT_ACTS = ("bn_relu", "linear")
ID_LOSSES = ("ce", "feature_l1", "pixel_l1")
PAIRINGS = ("paper", "code")


def _scale(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class InputDenoiser(nn.Module):
    """Table 6 U-Net: L1-L2 (32), L3-L4 (64, stride 2), L5 (128, stride 2), cat(a3, up a5) -> L6 (192) -> L7 (64),
    cat(skip, up a7) -> L8 (96) -> L9 (in_channels); output x + r (residual, authors' code), clamped to [0, 1].

    skip8: which 32-channel map feeds L8 ("layer2" = paper text, "layer1" = authors' code). out_act: L9 as in
    Table 6 (conv+BN+ReLU, so r >= 0) or a plain conv ("linear"). Upsampling is bilinear (align_corners=True) to the
    skip tensor's exact size, so any image size works. clamp01 keeps the project's [0, 1] contract (the paper has none).
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, skip8: str = "layer2", out_act: str = "bn_relu",
                 residual: bool = True, clamp01: bool = True):
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if skip8 not in SKIP8:
            raise ValueError(f"skip8 must be one of {SKIP8}, got {skip8!r}")
        if out_act not in OUT_ACTS:
            raise ValueError(f"out_act must be one of {OUT_ACTS}, got {out_act!r}")
        c1, c3, c5 = (_scale(c, width) for c in (32, 64, 128))
        self.skip8, self.residual, self.clamp01 = skip8, residual, clamp01
        self.l1, self.l2 = _conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1)
        self.l3, self.l4 = _conv_bn_relu(c1, c3, 2), _conv_bn_relu(c3, c3)
        self.l5 = _conv_bn_relu(c3, c5, 2)
        self.l6, self.l7 = _conv_bn_relu(c3 + c5, c3 + c5), _conv_bn_relu(c3 + c5, c3)
        self.l8 = _conv_bn_relu(c1 + c3, c1 + c3)
        self.l9 = (_conv_bn_relu(c1 + c3, in_channels) if out_act == "bn_relu"
                   else nn.Conv2d(c1 + c3, in_channels, 3, padding=1))

    @staticmethod
    def _up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.l1(x)
        a2 = self.l2(a1)
        a3 = self.l3(a2)
        a5 = self.l5(self.l4(a3))
        a7 = self.l7(self.l6(torch.cat([a3, self._up(a5, a3)], 1)))
        skip = a2 if self.skip8 == "layer2" else a1
        r = self.l9(self.l8(torch.cat([skip, self._up(a7, skip)], 1)))
        out = x + r if self.residual else r
        return out.clamp(0.0, 1.0) if self.clamp01 else out


def restorer_dims(dim: int) -> tuple[int, int, int]:
    """Hidden sizes of the FR encoder: Table 7's 512 -> 256 -> 128 -> 32, as ratios d/2, d/4, max(d/16, 16)."""
    check_positive_int(dim, "dim")
    return max(dim // 2, 1), max(dim // 4, 1), max(dim // 16, 16)


class FeatureRestorer(nn.Module):
    """Table 7: d -> d/2 -> d/4 -> d/16 -> d/4 -> d/2 -> d, Linear + ReLU after every layer (output >= 0, like the
    post-ReLU features it replaces). skips=True adds the authors' Keras skips (L1 out -> L5 out, L2 out -> L4 out)."""

    def __init__(self, dim: int, skips: bool = False):
        super().__init__()
        h1, h2, h3 = restorer_dims(dim)
        sizes = [dim, h1, h2, h3, h2, h1, dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.skips = skips
        self.dim = dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"FeatureRestorer({self.dim}) needs features of shape (N, {self.dim}), got {tuple(h.shape)}")
        outs = []
        for i, layer in enumerate(self.layers):
            h = F.relu(layer(h))
            if self.skips and i in (3, 4):
                h = h + outs[4 - i if i == 3 else 0]  # L4 += L2 out, L5 += L1 out
            outs.append(h)
        return h


class IDFRClassifier(nn.Module):
    """f_cls(F_pi(f_enc(I_w(x)))): the defended classifier as one differentiable module.

    `classifier` must expose features(x) and head(h) (lib.models.ImageClassifier). denoiser or restorer None
    leaves that stage out (Table 5's ablation: none / ID / FR / ID+FR).
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module | None = None, restorer: nn.Module | None = None):
        super().__init__()
        if not (hasattr(classifier, "features") and hasattr(classifier, "head")):
            raise ValueError("IDFRClassifier needs a classifier with features(x) and head(h) (an ImageClassifier)")
        self.classifier, self.denoiser, self.restorer = classifier, denoiser, restorer

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Restored penultimate features F_pi(f_enc(I_w(x)))."""
        h = self.classifier.features(self.denoiser(x) if self.denoiser is not None else x)
        return self.restorer(h) if self.restorer is not None else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.head(self.embed(x))


class InputDenoising(Defense):
    """The ID alone as a lib Defense (purify = I_w(x)), for evaluate_threats beside other purifiers."""

    differentiable = True

    def __init__(self, denoiser: InputDenoiser):
        super().__init__()
        self.denoiser = denoiser

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x).clamp(0.0, 1.0)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and requires_grad=False inside the block (gradients still flow *through* it); restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


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


# ----------------------------------------------------------------------------------------- input denoiser training

def id_loss(denoiser: nn.Module, classifier: nn.Module, z: torch.Tensor, x_clean: torch.Tensor, y: torch.Tensor,
            kind: str = "ce") -> torch.Tensor:
    """ID training loss on inputs z (adversarial or noisy) whose clean originals are x_clean.

    ce: CE(f(I_w(z)), y), the paper's Eq. 3. feature_l1: mean |f_enc(I_w(z)) - f_enc(x_clean)|, the authors' code
    (HGD-style representation guidance). pixel_l1: mean |I_w(z) - x_clean| (a pixel-guided denoiser baseline).
    """
    if kind not in ID_LOSSES:
        raise ValueError(f"unknown ID loss {kind!r}; valid: {', '.join(ID_LOSSES)}")
    out = denoiser(z)
    if kind == "ce":
        return F.cross_entropy(classifier(out), y)
    if kind == "feature_l1":
        with torch.no_grad():
            target = classifier.features(x_clean)
        return (classifier.features(out) - target).abs().mean()
    return (out - x_clean).abs().mean()


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


def train_denoiser(denoiser: nn.Module, classifier: nn.Module, x_adv: torch.Tensor, x_clean: torch.Tensor,
                   y: torch.Tensor, cfg: IDConfig, device: torch.device | None = None) -> list[dict]:
    """Algorithm 1: Adam on id_loss over AEs x_adv (clean originals x_clean, labels y) plus cfg.noise_copies
    Gaussian copies clip01(x_clean + N(0, sigma^2)), redrawn every epoch. The classifier stays frozen (eval mode).
    Returns the mean loss per epoch."""
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
    history = []
    with frozen(classifier):
        for epoch in range(cfg.epochs):
            noisy = [(x_clean + cfg.noise_sigma * torch.randn(x_clean.shape, generator=gen)).clamp(0, 1)
                     for _ in range(cfg.noise_copies)]
            inputs = torch.cat([x_adv, *noisy])
            clean = x_clean.repeat(1 + cfg.noise_copies, 1, 1, 1)
            labels = y.repeat(1 + cfg.noise_copies)
            order = torch.randperm(len(labels), generator=gen)
            denoiser.train()
            total = 0.0
            for idx in order.split(cfg.batch_size):
                z, xc, yb = inputs[idx].to(device), clean[idx].to(device), labels[idx].to(device)
                opt.zero_grad(set_to_none=True)
                loss = id_loss(denoiser, classifier, z, xc, yb, cfg.loss)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history.append({"epoch": epoch + 1, "loss": total / len(labels)})
    denoiser.eval()
    return history


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
def build_pool(classifier: nn.Module, denoiser: nn.Module | None, inputs: Sequence[torch.Tensor], y: torch.Tensor,
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


def fr_loss(restorer: nn.Module, classifier: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6: CE(f_cls(F_pi(h_mix)), y) with the frozen head f_cls."""
    return F.cross_entropy(classifier.head(restorer(h)), y)


def train_restorer(restorer: nn.Module, classifier: nn.Module, sampler: ConvexHullSampler, cfg: FRConfig,
                   device: torch.device | None = None) -> list[dict]:
    """Algorithm 2: Adam on fr_loss over fresh convex-hull mixtures each step; returns the mean loss per epoch."""
    device = device or get_device()
    restorer.to(device).train()
    classifier.to(device)
    opt = torch.optim.Adam(restorer.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    with frozen(classifier), _one_cpu_thread(device):
        for epoch in range(cfg.epochs):
            total = 0.0
            for _ in range(cfg.steps_per_epoch):
                batch = sampler.sample(cfg.batch_size, gen)
                opt.zero_grad(set_to_none=True)
                loss = fr_loss(restorer, classifier, batch["h"].to(device), batch["y"].to(device))
                loss.backward()
                opt.step()
                total += float(loss.detach())
            history.append({"epoch": epoch + 1, "loss": total / cfg.steps_per_epoch})
    restorer.eval()
    return history


# ----------------------------------------------------------------------------------------- cached end-to-end fit

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


def fit_denoiser(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec], *,
                 id_cfg: IDConfig, denoiser_kwargs: Mapping[str, Any] | None = None, batch_size: int = 256,
                 device: torch.device | None = None) -> tuple[InputDenoiser, torch.Tensor, dict[str, Any]]:
    """Algorithm 1 for one frozen target, cached: training AEs white-box on the target, one configuration of
    `specs` per image (mixture mode, cached per configuration), then train_denoiser. Returns (ID, AEs, metadata)."""
    from lib.evaluate import model_digest

    device = device or get_device()
    classifier.to(device).eval()
    x, y = x.to(device), y.to(device)
    kwargs = dict(denoiser_kwargs or {})
    kwargs.setdefault("in_channels", x.shape[1])
    t0 = time.perf_counter()
    x_adv, _ = mixture_adversarial(classifier, x, y, specs, seed=id_cfg.seed, batch_size=batch_size)
    seconds_aes = time.perf_counter() - t0

    def build() -> nn.Module:
        seed_everything(id_cfg.seed)
        return InputDenoiser(**kwargs)

    def train(model: nn.Module, _partial) -> dict:
        return {"history": train_denoiser(model, classifier, x_adv, x, y, id_cfg, device)}

    config = {"target": model_digest(classifier), "data": cache.tensor_digest(x.cpu(), y.cpu()),
              "attacks": [repr(s) for s in specs], "id": asdict(id_cfg), "arch": kwargs}
    denoiser, meta = cached_model("idfr/denoiser", config, build, train,
                                  code=(train_denoiser, id_loss, mixture_adversarial), device=device)
    return denoiser.eval(), x_adv, {**meta, "aes_seconds": seconds_aes}


def fit_idfr(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec], *,
             id_cfg: IDConfig, fr_cfg: FRConfig, denoiser_kwargs: Mapping[str, Any] | None = None,
             fr_pool: str = "all_configs", fr_skips: bool = False, noise_copies_in_pool: int = 2,
             pool_images: int | None = None, batch_size: int = 256, device: torch.device | None = None) -> IDFRFit:
    """Train ID (fit_denoiser) then FR for one frozen target on training images (x, y); both cached.

    FR pool (spec §2.6) from the first `pool_images` training images (all when None): "all_configs" = post-ID
    embeddings of the AEs of every configuration + noisy copies + clean; "train_mix" = only the AEs the ID trained
    on + noisy copies (the literal Alg. 2).
    """
    from lib.evaluate import model_digest

    if fr_pool not in ("all_configs", "train_mix"):
        raise ValueError(f"fr_pool must be 'all_configs' or 'train_mix', got {fr_pool!r}")
    device = device or get_device()
    denoiser, x_adv, id_meta = fit_denoiser(classifier, x, y, specs, id_cfg=id_cfg, denoiser_kwargs=denoiser_kwargs,
                                            batch_size=batch_size, device=device)
    x, y = x.to(device), y.to(device)
    base = {"target": model_digest(classifier), "data": cache.tensor_digest(x.cpu(), y.cpu()),
            "attacks": [repr(s) for s in specs]}

    t1 = time.perf_counter()
    n = len(y) if pool_images is None else min(int(pool_images), len(y))
    xp, yp = x[:n], y[:n]
    gen = torch.Generator().manual_seed(fr_cfg.seed)
    noisy = [(xp.cpu() + id_cfg.noise_sigma * torch.randn(xp.shape, generator=gen)).clamp(0, 1)
             for _ in range(noise_copies_in_pool)]
    if fr_pool == "all_configs":
        aes = [adversarial_set(s, classifier, xp, yp, batch_size=batch_size)[0].cpu() for s in specs]
        inputs = [*aes, *noisy, xp.cpu()]
    else:
        inputs = [x_adv[:n].cpu(), *noisy]
    pool = build_pool(classifier, denoiser, inputs, yp.cpu(), device=device)
    seconds_pool = time.perf_counter() - t1
    sampler = ConvexHullSampler(pool, fr_cfg.pairing)

    def build_fr() -> nn.Module:
        seed_everything(fr_cfg.seed)
        return FeatureRestorer(classifier.feat_dim, skips=fr_skips)

    def train_fr(model: nn.Module, _partial) -> dict:
        return {"history": train_restorer(model, classifier, sampler, fr_cfg, device)}

    fr_config = {**base, "denoiser": model_digest(denoiser), "fr": asdict(fr_cfg), "pool": fr_pool, "pool_images": n,
                 "pool_data": cache.tensor_digest(pool.h, pool.y), "skips": fr_skips}
    restorer, fr_meta = cached_model("idfr/restorer", fr_config, build_fr, train_fr,
                                     code=(train_restorer, fr_loss, ConvexHullSampler, build_pool), device=device)
    meta = {"id_seconds": id_meta["train_seconds"], "id_cache_hit": id_meta["cache_hit"],
            "id_history": id_meta["history"], "fr_seconds": fr_meta["train_seconds"],
            "fr_cache_hit": fr_meta["cache_hit"], "fr_history": fr_meta["history"], "aes_seconds": id_meta["aes_seconds"],
            "pool_seconds": seconds_pool, "pool_size": len(pool.y), "p2_fraction": pool.p2_fraction,
            "fallback_classes": sampler.fallback_classes}
    return IDFRFit(denoiser.eval(), restorer.eval(), pool, meta)


def idfr_for(profile: Mapping[str, Any], dataset: str, classifier: nn.Module, *,
             device: torch.device | None = None) -> IDFRFit:
    """IDFR for `classifier` on `dataset` with the settings of the profile's notebooks.02_idfr section (its training
    subset, attack grid and budgets, ID / FR configurations); trained once, then loaded from the cache."""
    from lib.data import load_dataset
    from lib.profiles import notebook_config

    cfg = notebook_config(profile, "02_idfr")
    if dataset not in cfg["eps"]:
        raise ValueError(f"profile {profile['name']!r} has no IDFR budgets for {dataset!r}; it has: {', '.join(cfg['eps'])}")
    train = load_dataset(dataset, "train", n=cfg["id_train_size"], seed=profile["seed"])
    specs = attack_grid(cfg["attacks"], cfg["eps"][dataset])
    return fit_idfr(classifier, train.x, train.y, specs, id_cfg=IDConfig(**cfg["id"], seed=profile["seed"]),
                    fr_cfg=FRConfig(**cfg["fr"], seed=profile["seed"]), denoiser_kwargs=cfg["denoiser"],
                    fr_pool=cfg["fr_pool"], pool_images=cfg["pool_images"], device=device)


def attack_grid(entries: Sequence[Mapping[str, Any]], eps: Sequence[float]) -> list[AttackSpec]:
    """The paper's attack x epsilon grid: one AttackSpec per (entry, eps), labelled by the entry's label."""
    if not eps:
        raise ValueError("attack_grid needs at least one epsilon")
    return [AttackSpec(e["name"], {**dict(e.get("params", {})), "eps": float(v)}, e.get("label", e["name"]))
            for e in entries for v in eps]


# ----------------------------------------------------------------------------------------- evaluation and tables

THREAT_LABELS = {"black": "black-box", "gray": "white-box (oblivious)", "white": "adaptive (ours)"}
PAPER_TABLES = {"cifar10": ("table1", "CIFAR-10"), "cifar100": ("table2", "CIFAR-100"), "imagenet": ("table3", "ImageNet")}
PAPER_MODELS = {"table1": ("VGG16", "ResNet18"), "table2": ("VGG16", "ResNet18"), "table3": ("ResNet50", "InceptionV3")}
PAPER_ONLY = ("NRP", "Fast AT", "ComDefend", "ADP", "SOAP")


def evaluate_models(target: nn.Module, models: Mapping[str, nn.Module], purifiers: Mapping[str, Defense],
                    x: torch.Tensor, y: torch.Tensor, specs: Sequence[AttackSpec], *, threats: Sequence[str],
                    surrogate: nn.Module | None = None, batch_size: int = 256,
                    device: torch.device | None = None) -> "pd.DataFrame":
    """Accuracy of whole defended models (e.g. IDFRClassifier pipelines) and of purifiers in front of `target`.

    Uses lib.evaluate.evaluate_threats: a model is passed as the classifier with NoDefense and its gray box is the
    bare target (the paper's defense-oblivious white box); "white" attacks the model end to end (adaptive).
    Threats are relabelled with THREAT_LABELS. Adversarial sets of the black and gray box are shared (cached).
    """
    import pandas as pd

    from lib.defenses.base import NoDefense
    from lib.evaluate import evaluate_threats

    frames = []
    common = dict(surrogate=surrogate, batch_size=batch_size, device=device)
    for name, model in models.items():
        frames.append(evaluate_threats(model, {name: NoDefense()}, x, y, specs, threats=threats,
                                       gray_box_models={name: target}, **common))
    if purifiers:
        frames.append(evaluate_threats(target, dict(purifiers), x, y, specs, threats=threats, **common))
    out = pd.concat(frames, ignore_index=True)
    out["threat"] = out["threat"].map(THREAT_LABELS)
    return out


def paper_long(rows: "pd.DataFrame", model: str, eps_labels: Sequence[str]) -> "pd.DataFrame":
    """Our tidy rows (one threat) as the reference schema: a Clean row per defense and one row per (attack, eps),
    with eps relabelled by position to the paper's values (ours are kept in 'our_eps')."""
    import pandas as pd

    eps_values = sorted({float(e) for e in rows["eps"].dropna()})
    if len(eps_values) != len(eps_labels):
        raise ValueError(f"{len(eps_values)} epsilons {eps_values} cannot map onto the paper's {list(eps_labels)}")
    label = dict(zip(eps_values, eps_labels))
    clean = rows.groupby("defense", sort=False)["clean_acc"].first().reset_index()
    clean = clean.rename(columns={"clean_acc": "value"}).assign(attack="Clean", eps="", our_eps=float("nan"))
    attacked = rows.assign(value=rows["robust_acc"], our_eps=rows["eps"].astype(float),
                           eps=rows["eps"].astype(float).map(label))[["defense", "attack", "eps", "our_eps", "value"]]
    return pd.concat([clean, attacked], ignore_index=True).assign(model=model)


def side_by_side(ours: "pd.DataFrame", table: str, *, dataset: str | None = None) -> "pd.DataFrame":
    """Ours (paper_long frames) beside lib.reference's idfr `table` (optionally one dataset of it): ours, paper, diff.

    Rows the paper has and we did not run keep the paper's number only (ran_here = False)."""
    from lib.reference import compare, load_reference

    ref = load_reference("idfr", table)
    if dataset is not None:
        ref = ref[ref["dataset"] == dataset]
    keys = ["model", "defense", "attack", "eps"]
    ref = ref[ref["model"].isin(ours["model"].unique())]
    out = compare(ours, ref, on=keys, value_col="value")
    our_eps = ours.drop_duplicates(keys).set_index(keys)["our_eps"]
    out["our_eps"] = [our_eps.get(tuple(k), float("nan")) for k in out[keys].itertuples(index=False)]
    out["ran_here"] = out["ours"].notna()
    return out


def average_accuracy(long: "pd.DataFrame", value_col: str = "value") -> "pd.Series":
    """Fig. 3: mean over every cell (clean + attacks, all models) of a table, per defense (table order)."""
    return long.groupby("defense", sort=False)[value_col].mean()


def aggregate_claims(long: "pd.DataFrame", value_col: str = "value", idfr: str = "IDFR(Ours)",
                     undefended: str = "No Defense") -> dict[str, float]:
    """Spec §6 item 7: gap of IDFR's and of the (uniformly averaged) baselines' mean accuracy to the mean undefended
    clean accuracy, and IDFR's margin over the baselines. Reproduces the text's 4.2/17.7 (CIFAR-10) and 2.4/11.8/9.4
    (CIFAR-100) from Tables 1-2."""
    avg = average_accuracy(long, value_col)
    clean_ref = long[(long["defense"] == undefended) & (long["attack"] == "Clean")][value_col].mean()
    baselines = avg.drop([undefended, idfr], errors="ignore")
    if idfr not in avg or baselines.empty:
        raise ValueError(f"aggregate_claims needs rows for {idfr!r} and at least one baseline")
    return {"idfr_clean_gap": float(clean_ref - avg[idfr]), "baseline_clean_gap": float(clean_ref - baselines.mean()),
            "idfr_margin": float(avg[idfr] - baselines.mean())}


def hull_figure(pool: FeaturePool, sampler: ConvexHullSampler, klass: int, n_mix: int = 200, seed: int = 0):
    """Fig. 2 made from data: 2-D PCA of one class's post-ID embeddings (p1 / p2), the convex hull of the
    points and sampled mixtures of the FR's training distribution."""
    import matplotlib.pyplot as plt
    from scipy.spatial import ConvexHull

    mask = pool.y == klass
    if not mask.any():
        raise ValueError(f"class {klass} has no embedding in the pool")
    h = pool.h[mask]
    mean = h.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(h - mean, q=2, center=False)
    proj = lambda t: ((t - mean) @ v[:, :2]).numpy()  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    mixes = []
    while sum(len(m) for m in mixes) < n_mix:
        batch = sampler.sample(max(n_mix, 64), gen)
        mixes.append(batch["h"][batch["y"] == klass])
    mix = proj(torch.cat(mixes)[:n_mix])
    pts, ok = proj(h), pool.correct[mask].numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(*pts[ok].T, s=6, c="tab:blue", alpha=0.4, label=f"p1: classified correctly ({ok.sum()})")
    ax.scatter(*pts[~ok].T, s=14, c="tab:red", marker="x", label=f"p2: misclassified ({(~ok).sum()})")
    ax.scatter(*mix.T, s=5, c="tab:green", alpha=0.5, label=f"sampled mixtures ({len(mix)})")
    if len(pts) >= 3:
        hull = ConvexHull(pts)
        for simplex in hull.simplices:
            ax.plot(*pts[simplex].T, c="grey", lw=0.8)
    ax.set(title=f"class {klass}: post-ID embeddings (PCA) and the FR's convex-hull samples",
           xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=7)
    return fig
