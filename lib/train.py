"""One training loop for classifiers, and a checkpoint cache so that nothing is trained twice.

Training saves a resumable checkpoint after every epoch (atomically); the finished model is stored
under a key made from its configuration and the source code of its class and of this module. A
re-run with nothing changed loads it in seconds; an interrupted run resumes from its last epoch.

In a distributed job (lib.distributed) training is data-parallel as DistributedDataParallel makes it: every rank
sees the same global batches, trains on its share of each, and each optimizer step uses the gradient averaged over
the ranks, so the model is the one a single process would train, up to float rounding and BatchNorm statistics
(per rank, rank 0's kept). The averaging is an optimizer step hook rather than the DDP wrapper because the project's
trainings are step closures that call their modules directly, several optimizers and backward passes per batch
included. Rank 0 alone reads and writes checkpoints and sends what it read to the others; cache keys do not depend
on the number of processes, so a model trained by N processes is loaded by a later single one, and the reverse.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lib import cache, distributed
from lib.data import ImageData, load_dataset
from lib.defenses.base import NotBuiltForDataset
from lib.profiles import dataset_config
from lib.profiles.schema import CLASSIFIER_ROLES
from lib.runtime import get_device, seed_everything

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one classifier training run."""

    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    cosine: bool = True          # cosine learning-rate decay over the epochs
    augment: bool = False        # random crop (pad 1/8 of the side) and horizontal flip
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"epochs, batch_size and lr must be positive, got {self.epochs}, {self.batch_size}, {self.lr}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a profile section, ignoring keys that are not training hyper-parameters."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding of 1/8 of the side) and horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg` names, over the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


LRFactor = Callable[[int, int], float]


def cosine_lr(epoch: int, epochs: int) -> float:
    """Cosine decay from 1 at the first epoch towards 0."""
    return 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def constant_lr(epoch: int, epochs: int) -> float:
    """No decay."""
    return 1.0


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimizer step on `loss` (zero grads, backward, step); returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def tensor_batches(*tensors: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Aligned mini-batches of `tensors` in an order shuffled deterministically from `seed`."""
    order = torch.randperm(len(tensors[0]), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        yield tuple(t[idx] for t in tensors)


Step = Callable[..., Mapping[str, float]]


def fit(step: Step, batches: Callable[[int], Iterable[Sequence[torch.Tensor]]], *, epochs: int,
        modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
        lr_factor: LRFactor | Mapping[str, LRFactor] = cosine_lr, seed: int = 0, device: torch.device | None = None,
        checkpoint: Path | None = None, desc: str = "train",
        epoch_end: Callable[[int], Mapping[str, Any]] | None = None) -> list[dict]:
    """The one training loop of the project; returns the per-epoch history.

    Each epoch sets every optimizer's learning rate to its initial value times `lr_factor(epoch, epochs)` (one
    schedule for all, or {optimizer name: schedule}), seeds
    the global RNGs from (seed, epoch), puts `modules` in train mode and calls `step(*batch)` on each batch of
    `batches(epoch)` (moved to `device`); `step` takes its own optimizer steps (see `descend`) and returns named
    losses, averaged over the epoch weighted by batch size. `epoch_end(epoch)` may add entries to the history.
    With `checkpoint`, modules, optimizers and history are saved atomically after each epoch and a run finding
    the file resumes from it. Modules end in eval mode.
    In a distributed job each rank steps on every world_size-th example of each batch (a batch with fewer examples
    than ranks is skipped by all), gradients are averaged over the ranks, weighted by their shares, before every
    optimizer step, the epoch's losses are summed over the ranks, and rank 0's modules are sent to the others after
    every epoch.
    """
    device = device or get_device()
    for module in modules.values():
        module.to(device)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    history: list[dict] = []
    start = 0
    state = distributed.from_main(lambda: cache.load_or_none(checkpoint)) if checkpoint is not None else None
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        history, start = list(state["history"]), int(state["epoch"])
    share = {"weight": 1.0}   # this rank's share of the current batch, read by the gradient averaging
    hooks = [opt.register_step_pre_hook(_averaging(share)) for opt in optimizers.values()
             ] if distributed.world_size() > 1 else []
    bar = tqdm(range(start, epochs), desc=desc, initial=start, total=epochs, mininterval=2.0,
               disable=not distributed.is_main())
    try:
        for epoch in bar:
            for name, opt in optimizers.items():
                factor = lr_factor[name] if isinstance(lr_factor, Mapping) else lr_factor
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor(epoch, epochs)
            seed_everything(seed * 1000 + epoch)
            for module in modules.values():
                module.train()
            sums: dict[str, float] = {}
            total = 0
            for batch in batches(epoch):
                if len(batch[0]) < distributed.world_size():   # some rank would have no share: all skip it
                    continue
                rows = distributed.shard(len(batch[0]), strided=True)
                share["weight"] = len(rows) / len(batch[0])
                batch = [t[rows.start::rows.step].to(device, non_blocking=True) for t in batch]
                for name, value in step(*batch).items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(batch[0])
                total += len(batch[0])
            sums, total = _summed(sums, total, device)
            for module in modules.values():
                module.eval()
                for tensor in module.state_dict().values():
                    distributed.broadcast_(tensor)
            first_lr = next(iter(optimizers.values())).param_groups[0]["lr"] if optimizers else 0.0
            history.append({"epoch": epoch + 1, "lr": first_lr, **{k: v / max(total, 1) for k, v in sums.items()},
                            **(epoch_end(epoch) if epoch_end else {})})
            if "loss" in history[-1]:
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if checkpoint is not None and distributed.is_main():
                cache.atomic_save({"modules": {k: m.state_dict() for k, m in modules.items()},
                                   "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                                   "history": history, "epoch": epoch + 1}, checkpoint)
    finally:
        for hook in hooks:
            hook.remove()
    for module in modules.values():
        module.eval()
    return history


def _averaging(share: Mapping[str, float]) -> Callable[..., None]:
    """An optimizer step pre-hook that replaces each gradient by the share-weighted sum of the ranks' gradients:
    the gradient of the loss over the whole batch, as DistributedDataParallel's all-reduce gives it."""
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            flat = distributed.all_reduce_sum_(torch.cat([g.reshape(-1) for g in grads]) * share["weight"])
            for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(summed.view_as(g))

    return hook


def _summed(sums: dict[str, float], total: int, device: torch.device) -> tuple[dict[str, float], int]:
    """An epoch's loss sums and example count, added up over the ranks (as they are outside a job)."""
    if distributed.world_size() == 1:
        return sums, total
    flat = distributed.all_reduce_sum_(torch.tensor([*sums.values(), total], dtype=torch.float64, device=device))
    return dict(zip(sums, flat[:-1].tolist())), int(flat[-1])


def fit_classifier(model: nn.Module, data: ImageData, cfg: TrainConfig, *, device: torch.device | None = None,
                   checkpoint: Path | None = None, desc: str = "train",
                   loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Train `model` in place with cross-entropy (or `loss_fn(model, x, y)`) on `data`; returns per-epoch history.

    With `checkpoint`, state is saved atomically after each epoch and a run finding one resumes from it.
    """
    opt = make_optimizer(model, cfg)
    loss_fn = loss_fn or cross_entropy_loss

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        for xb, yb in data.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch):
            yield (augment_batch(xb, gen) if cfg.augment else xb), yb

    def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
        return {"loss": descend(opt, loss_fn(model, xb, yb))}

    return fit(step, batches, epochs=cfg.epochs, modules={"model": model}, optimizers={"model": opt},
               lr_factor=cosine_lr if cfg.cosine else constant_lr, seed=cfg.seed, device=device,
               checkpoint=checkpoint, desc=desc)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode with requires_grad off inside the block (gradients still flow *through* it, to a
    masker or restorer trained in front of it); its mode and flags are restored afterwards."""
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


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain training: cross-entropy of the model's logits."""
    return F.cross_entropy(model(x), y)


def cached_model(namespace: str, config: Mapping[str, Any], build: Callable[[], nn.Module],
                 train: Callable[[nn.Module, Path], dict], *, code: tuple = (), device: torch.device | None = None
                 ) -> tuple[nn.Module, dict]:
    """Build a module and load its trained weights from the cache, or train it once and store it.

    `train(model, partial_checkpoint_path)` trains in place and returns metadata (plain values).
    The key hashes `config` and the source files of every lib class inside the module, of `code` and of this module.
    Returns (model in eval mode on `device`, metadata incl. 'cache_hit'). In a distributed job every rank trains
    (lib.train.fit), rank 0 alone reads and writes the entry, and the other ranks receive its weights and metadata.
    """
    device = device or get_device()
    model = build()
    own_classes = {type(m) for m in model.modules() if type(m).__module__.startswith("lib.")}
    fingerprint = cache.source_fingerprint((*own_classes, fit, fit_classifier, *code))
    key = cache.config_key(dict(config), fingerprint)
    final = cache.cache_root() / namespace / f"{key}.pt"
    entry = distributed.from_main(lambda: cache.load_or_none(final, _fits(model)))
    if entry is not None:
        model.load_state_dict(entry["state_dict"])
        return model.to(device).eval(), {**entry["meta"], "cache_hit": True, "cache_key": key}
    partial = final.with_suffix(".partial.pt")
    t0 = time.perf_counter()
    meta = dict(train(model.to(device), partial))
    meta.setdefault("train_seconds", time.perf_counter() - t0)
    state, meta = distributed.from_main(lambda: ({k: v.cpu() for k, v in model.state_dict().items()}, meta))
    if distributed.is_main():
        cache.atomic_save({"state_dict": state, "meta": meta}, final)
        partial.unlink(missing_ok=True)
    else:   # every rank goes on with rank 0's model
        model.load_state_dict(state)
    return model.eval(), {**meta, "cache_hit": False, "cache_key": key}


def _fits(model: nn.Module) -> Callable[[dict], None]:
    """A cache-entry check: the stored state dict has the model's parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def check(entry: dict) -> None:
        stored = {k: tuple(v.shape) for k, v in entry["state_dict"].items()}
        if stored != expected:
            wrong = sorted(set(stored.items()) ^ set(expected.items()))[:3]
            raise cache.CorruptEntry(f"its parameters do not fit the model (names or shapes differ: {wrong})")

    return check


def trained_classifier(profile: Mapping[str, Any], dataset: str, role: str = "target",
                       device: torch.device | None = None) -> tuple[nn.Module, dict]:
    """The profile's classifier for a dataset: role 'target', its independent 'surrogate', 'adversarial' (the
    target's architecture trained with PGD adversarial training, Madry et al. 2018, a baseline defense) or
    'transfer' (one more independent classifier, as ARN's Table 5 VGG-19).

    Trained on the profile's training subset (or the role's own `train_size`), cached; metadata carries the
    test accuracy. The role's spec is read by lib.models.classifier_from_spec (arch, width, depth, pretrained,
    widen_factor...); `image_size` sets the size a folder dataset is decoded at (ImageNet: 224 for ResNet-50, 299
    for Inception-v3). A `pretrained: true` spec with `epochs: 0` is the published model as it is: nothing is
    trained, the training split is not loaded.
    """
    from lib.evaluate import accuracy
    from lib.models import ARCH_KEYWORDS, classifier_from_spec

    if role not in CLASSIFIER_ROLES:
        raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(CLASSIFIER_ROLES)}")
    key = CLASSIFIER_ROLES[role]
    section = dataset_config(profile, dataset)
    if key not in section:
        raise NotBuiltForDataset(f"profile {profile['name']!r} has no {key!r} settings for dataset {dataset!r}")
    spec = dict(section[key])
    size = spec.get("image_size")
    if spec.get("pretrained") and spec.get("epochs") == 0:
        return _published_classifier(spec, load_dataset(dataset, "test", n=section.get("test_size"),
                                                        seed=profile["seed"], image_size=size), device)
    cfg = TrainConfig.from_mapping(spec)
    attack = dict(spec.get("attack", {})) if role == "adversarial" else {}
    from lib.adversarial_training import pgd_training_loss

    loss_fn = pgd_training_loss(**attack) if role == "adversarial" else None
    train_data = load_dataset(dataset, "train", n=spec.get("train_size", section.get("train_size")), seed=profile["seed"],
                              image_size=size)
    test_data = load_dataset(dataset, "test", n=section.get("test_size"), seed=profile["seed"], image_size=size)
    info = train_data.info
    device = device or get_device()

    def build() -> nn.Module:
        seed_everything(cfg.seed)
        return classifier_from_spec(spec, info)

    def train(model: nn.Module, partial: Path) -> dict:
        t0 = time.perf_counter()
        history = fit_classifier(model, train_data, cfg, device=device, checkpoint=partial, desc=f"{dataset}/{role}",
                                 loss_fn=loss_fn)
        seconds = time.perf_counter() - t0
        return {"test_accuracy": accuracy(model, test_data.x, test_data.y, device=device),
                "train_seconds": seconds, "final_loss": history[-1]["loss"], "train_size": len(train_data)}

    config = {"dataset": dataset, "arch": spec["arch"], "width": spec.get("width", 1.0), "depth": spec.get("depth"),
              "train_data": cache.tensor_digest(train_data.x, train_data.y),
              "test_data": cache.tensor_digest(test_data.x, test_data.y), "train": asdict(cfg), "attack": attack}
    model_keys = {k: spec[k] for k in ("pretrained", "image_size", *ARCH_KEYWORDS) if k in spec}
    if model_keys:   # only where set, so the cache keys of the plain specs stay as they were
        config["model"] = model_keys
    return cached_model(f"classifiers/{dataset}", config, build, train, device=device,
                        code=(pgd_training_loss,) if attack else ())


def _published_classifier(spec: Mapping[str, Any], test_data: ImageData,
                          device: torch.device | None) -> tuple[nn.Module, dict]:
    """A published pretrained classifier used as it is (nothing trained, nothing cached), with trained_classifier's
    metadata: its accuracy on `test_data`, no training time."""
    from lib.evaluate import accuracy
    from lib.models import classifier_from_spec

    device = device or get_device()
    model = classifier_from_spec(spec, test_data.info).to(device).eval()
    return model, {"test_accuracy": accuracy(model, test_data.x, test_data.y, device=device), "train_seconds": 0.0,
                   "final_loss": None, "train_size": 0, "cache_hit": False, "cache_key": None, "published": True}
