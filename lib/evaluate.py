"""Threat models, defined once, returning tidy pandas tables.

- black box: adversarial examples crafted on an independently trained surrogate, then fed to the
  defended target (transfer);
- gray box: crafted on the target classifier (or a model the caller names), ignorant of the defense;
- white box / adaptive: crafted on classifier(defense(x)) itself, with BPDA for non-differentiable
  defenses and EOT for randomised ones (lib.attacks.attack_surface).

Accuracies in the tables are percentages of all evaluated examples (clean mistakes included).
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from statistics import NormalDist
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib import cache, distributed
from lib.defenses.base import Defense, Defended
from lib.runtime import get_device, seeded_rng
from lib.validate import check_images, check_labels, check_positive_int

THREATS = ("black", "gray", "white")   # white also reports "white-identity" (identity BPDA) where it applies
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration: a registry name, its keyword parameters and a display label."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None
    l2_budget: float | None = None   # minimal-norm attacks (CW, DeepFool, DDN): success only within this L2 radius

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def norm(self) -> str | None:
        """The norm of the attack's threat model: 'l2' for PGD-L2, an L2 AutoAttack and minimal-norm attacks with an L2
        budget, 'linf' for the other attacks with an eps, None for attacks without a budget (stAdv)."""
        if self.l2_budget is not None or self.name == "pgd_l2" or str(self.params.get("norm", "")).lower() == "l2":
            return "l2"
        return "linf" if "eps" in self.params else None

    @property
    def eps(self) -> float | None:
        """The attack's budget: its L-inf/L2 eps parameter, or the L2 budget of a minimal-norm attack."""
        eps = self.params.get("eps", self.l2_budget)
        return None if eps is None else float(eps)


def attack_specs(entries: Sequence[Mapping[str, Any]]) -> list[AttackSpec]:
    """AttackSpecs from a profile's list of {name, params, label, l2_budget} mappings (ValueError naming the entry,
    e.g. an unknown attack name with the valid ones, or a parameter the attack does not have)."""
    from lib.attacks.registry import check_attack_entry

    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise ValueError(f"entries must be a list of attack mappings, got {entries!r}")
    for i, entry in enumerate(entries):
        check_attack_entry(entry, f"attack entry {i}")
    return [AttackSpec(e["name"], dict(e.get("params", {})), e.get("label"), e.get("l2_budget")) for e in entries]


def within_l2_budget(x: torch.Tensor, x_adv: torch.Tensor, budget: float | None) -> torch.Tensor:
    """x_adv where its L2 distance to x is within `budget`, else x (the attack failed within the budget)."""
    if budget is None:
        return x_adv
    inside = (x_adv - x).flatten(1).norm(dim=1) <= budget
    return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), x_adv, x)


@torch.no_grad()
def in_batches(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, batch_size: int = 256,
               device: torch.device | None = None) -> torch.Tensor:
    """fn over aligned mini-batches of `tensors` (moved to `device` when given), without gradients; the
    concatenated result on CPU. The one batch-apply helper: purification, masks, features at bounded memory."""
    chunks = zip(*(t.split(batch_size) for t in tensors))
    return torch.cat([fn(*(c.to(device) if device is not None else c for c in chunk)).cpu() for chunk in chunks])


def stream_size(defense: Defense, batch_size: int) -> int:
    """Images per batch when `defense` purifies a set: `batch_size`, at most the defense's `max_batch`."""
    return batch_size if defense.max_batch is None else min(batch_size, defense.max_batch)


@torch.no_grad()
def purify_stream(defense: Defense, sets: Sequence[torch.Tensor], batch_size: int,
                  after_batch: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """defense.purify of every tensor of `sets`, as if they were one set streamed in batches of
    stream_size(defense, batch_size) images (a batch may span two tensors), without stacking them; each result on
    its input's device. With a batch that covers them all, the result is that of one purify call on their
    concatenation, also for a defense whose result depends on which images share a call (TVM's joint L-BFGS).
    `after_batch(n)` is called after each purify call of n images (e.g. to collect per-call statistics)."""
    size, starts = stream_size(defense, batch_size), [0]
    for t in sets:
        starts.append(starts[-1] + len(t))
    out = []
    for lo in range(0, starts[-1], size):
        hi = min(lo + size, starts[-1])
        parts = [t[max(lo - s0, 0):hi - s0] for t, s0, s1 in zip(sets, starts, starts[1:]) if s0 < hi and s1 > lo]
        out.append(defense.purify(torch.cat(parts)))
        if after_batch is not None:
            after_batch(hi - lo)
    done = torch.cat(out) if out else torch.empty(0)
    return [done[s0:s1].to(t.device) for t, s0, s1 in zip(sets, starts, starts[1:])]


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, batch_size: int = 500, device: torch.device | None = None) -> torch.Tensor:
    """Predicted labels (on CPU) for a [0, 1] batch, evaluated in mini-batches."""
    device = device or _device_of(model)
    return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(batch_size)])


def accuracy(model: Model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent."""
    check_images(x)
    check_labels(y, len(x))
    return 100.0 * float((predict(model, x, batch_size, device) == y.cpu()).float().mean())


def accuracy_interval(accuracy_pct: Any, n: Any, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) in % of the Wilson score interval of accuracies measured on n images: how far sampling alone
    moves an accuracy, so a published number can be judged against ours (scalars, arrays or Series; NaN stays NaN)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    p, n = np.asarray(accuracy_pct, dtype=float) / 100.0, np.asarray(n, dtype=float)
    if np.any(n <= 0):
        raise ValueError("n (images measured) must be positive")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("accuracies must lie in [0, 100] %")
    z2 = NormalDist().inv_cdf(0.5 + level / 2.0) ** 2
    centre, half = p + z2 / (2 * n), np.sqrt(z2 * (p * (1 - p) / n + z2 / (4 * n ** 2)))
    scale = 100.0 / (1 + z2 / n)
    return np.clip(scale * (centre - half), 0.0, 100.0), np.clip(scale * (centre + half), 0.0, 100.0)


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Mean L-inf, mean and median L2 of x_adv - x over all examples."""
    delta = (x_adv - x).flatten(1)
    return norm_summary(delta.abs().amax(1), delta.norm(dim=1))


def norm_summary(linf: torch.Tensor, l2: torch.Tensor) -> dict[str, float]:
    """Mean L-inf, mean and median L2 of per-example perturbation norms."""
    return {"linf_mean": float(linf.mean()), "l2_mean": float(l2.mean()), "l2_median": float(l2.median())}


def model_digest(model: nn.Module) -> str:
    """Hash of a module's class and weights: identifies it in cache keys."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _setting(value: Any) -> Any:
    """A module attribute as cache.content_digest can hash it stably: containers and dataclasses item by item, arrays
    as tensors, callables by name (their repr holds an address), objects without a stable repr by their type."""
    if isinstance(value, (tuple, list)):
        return [_setting(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _setting(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return [type(value).__qualname__, _setting(asdict(value))]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if callable(value):
        return getattr(getattr(value, "__func__", value), "__qualname__", type(value).__qualname__)
    return type(value).__qualname__


def attacked_digest(model: nn.Module) -> str:
    """model_digest plus what weights cannot tell apart: each submodule's public settings (JPEG's quality, EOT's draws,
    a BPDA backward) and its class's source file. It keys cached attacks, white-box ones through a defense included."""
    settings, classes = [], set()
    for module in model.modules():
        classes.add(type(module))
        settings.append([type(module).__qualname__, {k: _setting(v) for k, v in sorted(vars(module).items())
                                                     if not k.startswith("_") and k != "training"}])
    sources = []
    for cls in classes:
        try:
            sources.append(cache.source_fingerprint([cls]))
        except (TypeError, OSError):   # a class without a source file (built in, or defined interactively)
            sources.append(f"{cls.__module__}.{cls.__qualname__}")
    return cache.content_digest([model_digest(model), settings, sorted(sources)])[:20]


def adversarial_set(spec: AttackSpec, model: Model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                    use_cache: bool = True) -> tuple[torch.Tensor, float]:
    """Run one attack on `model`; returns (x_adv on x's device, seconds spent).

    The set is crafted in chunks of `batch_size` images, each seeded from (attack, parameters, its own images), so a
    result is the same whether or not anything ran or was cached before it, and however the chunks are shared out.
    When `model` is an nn.Module each chunk is cached under (attack, parameters, attacked_digest, its images, attack
    code); a cached chunk reports the seconds of the run that produced it. In a distributed job each rank crafts its
    share of the chunks (lib.distributed.shard) and every rank receives the whole set, as a single process would.
    """
    model_key = attacked_digest(model) if use_cache and isinstance(model, nn.Module) else None
    bounds = _chunks(len(x), batch_size)
    mine = {i: _crafted(spec, model, x[lo:hi], y[lo:hi], batch_size=batch_size, model_key=model_key)
            for i in distributed.shard(len(bounds)) for lo, hi in [bounds[i]]}
    parts = distributed.gather_parts(mine)
    return torch.cat([p[0] for p in parts]).to(x.device), sum(p[1] for p in parts)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of the consecutive chunks of `size` images (the last one shorter) of a set of n images: the unit
    that is seeded, cached and shared out to the ranks."""
    check_positive_int(size, "batch_size")
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _crafted(spec: AttackSpec, model: Model, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
             model_key: str | None, inputs: str | None = None) -> tuple[torch.Tensor, float, str]:
    """One chunk's adversarial examples (on the CPU), seconds and AutoAttack's failed checks ('; '-joined): the attack
    run over the chunk in batches of `batch_size`, seeded from (attack, parameters, the chunk's digest `inputs`), and
    cached per rank under `model_key` (the weights' digest; None: not cached)."""
    from lib import attacks
    from lib.attacks.autoattack import AutoAttackWarning

    inputs = inputs or cache.tensor_digest(x, y)

    def run() -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with seeded_rng(_seed_of(spec.name, dict(spec.params), inputs), x.device):   # random starts, restarts
                x_adv = attacks.generate(spec.name, model, x, y, batch_size=batch_size, **spec.params)
        flags = [str(w.message) for w in caught if issubclass(w.category, AutoAttackWarning)]
        for w in caught:
            if not issubclass(w.category, AutoAttackWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        text = "; ".join(dict.fromkeys(flags)).encode()
        return {"x_adv": x_adv, "seconds": torch.tensor(time.perf_counter() - t0),
                "flags": torch.tensor(list(text), dtype=torch.uint8)}

    if model_key is not None:
        config = {"attack": spec.name, "params": dict(spec.params), "model": model_key, "inputs": inputs,
                  "batch": min(batch_size, len(x)), "rng": "seeded per chunk"}
        code = cache.source_fingerprint([attacks.ATTACKS[spec.name]])
        out = cache.cached_tensors("adversarial", config, run, code=code, per_rank=True)
    else:
        out = run()
    flags = bytes(out["flags"].tolist()).decode() if "flags" in out else ""
    return out["x_adv"].cpu(), float(out["seconds"]), flags


def evaluate_threats(*args: Any, **kwargs: Any) -> pd.DataFrame:
    """The table of `threat_outcomes` (same arguments) alone: one row per (threat, defense, attack)."""
    return threat_outcomes(*args, **kwargs)[0]


def threat_outcomes(classifier: nn.Module, defenses: Mapping[str, Defense], x: torch.Tensor, y: torch.Tensor,
                    attacks: Sequence[AttackSpec], *, threats: Sequence[str] = ("gray", "white"),
                    surrogate: Model | None = None, gray_box_models: Mapping[str, Model] | None = None,
                    eot_samples: int = 1, batch_size: int = 256, device: torch.device | None = None,
                    use_cache: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clean and robust accuracy of every defense under every attack and threat model, and every example's outcome.

    Adversarial sets that do not depend on the defense (black box, gray box) are crafted once and shared; every set,
    white-box ones included, is cached on disk unless `use_cache` is False. `gray_box_models[name]` overrides the model
    attacked in the gray box for one defense (e.g. SFM's gray box differentiates through the masker but not the
    squeezer).
    White box: a non-differentiable defense with its own differentiable approximation (`bpda_purify`) is attacked
    through it and, reported beside it as threat `white-identity`, with identity BPDA. A randomised defense meets
    AutoAttack's `rand` version, with EOT over `eot_samples` draws, instead of the profile's version.
    AutoAttack's failed checks are printed and kept in the `flags` column. Attacks and predictions run in batches of
    `batch_size` images; those that go through a defense, of at most its `max_batch` (lib.evaluate.stream_size).
    The test set is evaluated in chunks of `batch_size` images, each seeded from its own images: in a distributed job
    each rank evaluates its share of the chunks and every rank receives all outcomes, identical image for image to a
    single-process run.

    Returns (rows, examples). rows: one row per (threat, defense, attack) with the attack's `eps` and `norm`
    (its threat model), clean and robust accuracy (%), mean perturbation norms, seconds (of every chunk's attack run),
    gradient route and flags. examples: one row per test image of each of them: `example` (its position in x),
    `correct` (still classified correctly), `clean_correct`, and its perturbation's `linf` and `l2` norms.
    """
    unknown = set(threats) - set(THREATS)
    if unknown:
        raise ValueError(f"unknown threat model(s) {sorted(unknown)}; valid: {', '.join(THREATS)}")
    if "black" in threats and surrogate is None:
        raise ValueError("the black-box threat model needs an independently trained `surrogate`")
    check_images(x)
    check_labels(y, len(x))
    device = device or get_device()
    x, y = x.to(device), y.to(device)
    classifier.to(device)
    gray_box_models = dict(gray_box_models or {})
    defended = {name: _Defended(Defended(classifier, d.to(device)).eval(), stream_size(d, batch_size))
                for name, d in defenses.items()}   # each defense's pipeline and batch bound
    cases = [_Case(threat, spec, name, route) for threat in threats for spec in attacks
             for name, defense in defenses.items()
             for route in _routes(threat, spec, name, defense, classifier, surrogate, gray_box_models, eot_samples,
                                  use_cache)]
    digests: dict[int, str] = {}   # one attacked_digest per disk-cached attacked model
    for case in cases:
        if case.route.cacheable and isinstance(case.route.model, nn.Module) and id(case.route.model) not in digests:
            digests[id(case.route.model)] = attacked_digest(case.route.model)
    bounds = _chunks(len(x), batch_size)
    parts = distributed.gather_parts({i: _chunk_outcomes(cases, defended, x[lo:hi], y[lo:hi], lo, batch_size, device,
                                                         digests)
                                      for i in distributed.shard(len(bounds)) for lo, hi in [bounds[i]]})
    rows: list[dict[str, Any]] = []
    examples: list[pd.DataFrame] = []
    printed: set[tuple] = set()
    for c, case in enumerate(cases):
        frame = pd.concat([part[0][c] for part in parts], ignore_index=True)
        seconds = sum(part[1][c][0] for part in parts)
        flags = "; ".join(dict.fromkeys(f for part in parts for f in part[1][c][1].split("; ") if f))
        if flags and case.route.key not in printed:
            printed.add(case.route.key)
            print(f"AutoAttack flags ({case.route.threat} box, {case.defense}, {case.spec.title}): {flags}")
        linf, l2 = (torch.tensor(frame[column].to_numpy()) for column in ("linf", "l2"))   # reduced as torch did
        rows.append({**case.outcome, "n": len(frame),
                     "clean_acc": 100.0 * float(torch.tensor(frame["clean_correct"].to_numpy()).float().mean()),
                     "robust_acc": 100.0 * float(torch.tensor(frame["correct"].to_numpy()).float().mean()),
                     **norm_summary(linf, l2), "attack_seconds": seconds, "gradient": case.route.gradient,
                     "flags": flags})
        examples.append(frame)
    return pd.DataFrame(rows), (pd.concat(examples, ignore_index=True) if examples else pd.DataFrame())


def _chunk_outcomes(cases: Sequence["_Case"], defended: Mapping[str, "_Defended"], x: torch.Tensor, y: torch.Tensor,
                    offset: int, batch_size: int, device: torch.device, digests: Mapping[int, str]
                    ) -> tuple[list[pd.DataFrame], list[tuple[float, str]]]:
    """Every case's per-example outcomes on one chunk (the images offset, offset + 1, ... of the test set), and each
    case's attack seconds and flags. All randomness (attacks, randomised defenses) is seeded from the chunk's own
    images, so a chunk's outcomes do not depend on which rank, run or chunk order computes them."""
    inputs = cache.tensor_digest(x, y)
    labels = y.cpu()
    clean = {}
    for name, d in defended.items():
        with seeded_rng(_seed_of(name, "clean", inputs), device):
            clean[name] = predict(d.pipeline, x, d.batch, device) == labels
    crafted: dict[tuple, tuple[torch.Tensor, float, str]] = {}   # one run per (attacked model, attack, parameters)
    frames, runs = [], []
    for case in cases:
        route, spec, d = case.route, case.spec, defended[case.defense]
        if route.key not in crafted:
            x_adv, seconds, flags = _crafted(route.spec, route.model, x, y, inputs=inputs,
                                             batch_size=batch_size if route.owner[0] == "transfer" else d.batch,
                                             model_key=digests.get(id(route.model)) if route.cacheable else None)
            crafted[route.key] = x_adv.to(device), seconds, flags
        x_adv, seconds, flags = crafted[route.key]
        x_adv = within_l2_budget(x, x_adv, spec.l2_budget)
        with seeded_rng(_seed_of(case.defense, spec.name, dict(spec.params), case.threat, inputs), device):
            correct = predict(d.pipeline, x_adv, d.batch, device) == labels   # randomised defenses: seeded draws
        delta = (x_adv - x).flatten(1).cpu()
        frames.append(pd.DataFrame({**case.outcome, "example": range(offset, offset + len(y)),
                                    "correct": correct.numpy(), "clean_correct": clean[case.defense].numpy(),
                                    "linf": delta.abs().amax(1).numpy(), "l2": delta.norm(dim=1).numpy()}))
        runs.append((seconds, flags))
    return frames, runs


def ensemble_accuracy(examples: pd.DataFrame, by: Sequence[str] = ("defense", "threat")) -> pd.Series:
    """Robust accuracy (%) of an attack ensemble per `by` group: the share of examples correct under every attack (every
    row of the group), the per-example worst case as AutoAttack reports it; never above the lowest single attack's."""
    survived = examples.groupby([*by, "example"], sort=False)["correct"].all()
    return 100.0 * survived.groupby(level=list(by), sort=False).mean()


@dataclass(frozen=True)
class _Route:
    """How one (threat, attack, defense) is attacked: the threat label, the attacked model, the attack as run, the
    gradient route, whether its adversarial set may be cached on disk, and the key of its in-memory sharing."""

    threat: str
    model: Model
    spec: AttackSpec
    gradient: str
    cacheable: bool
    owner: tuple

    @property
    def key(self) -> tuple:
        """What identifies one attack run, shared by every case that needs it (within one process)."""
        return (*self.owner, self.spec.name, repr(sorted(self.spec.params.items())))


@dataclass(frozen=True)
class _Case:
    """One outcome of threat_outcomes: the threat model asked for, the attack, the defense and how it is attacked."""

    threat: str
    spec: AttackSpec
    defense: str
    route: _Route

    @property
    def outcome(self) -> dict[str, Any]:
        """The columns that name this outcome in rows and examples alike."""
        return {"threat": self.route.threat, "defense": self.defense, "attack": self.spec.title, "eps": self.spec.eps,
                "norm": self.spec.norm}


class _Defended(NamedTuple):
    """A defended classifier as evaluated: its pipeline and the batch bound of its defense."""

    pipeline: nn.Module
    batch: int


def _routes(threat: str, spec: AttackSpec, name: str, defense: Defense, classifier: nn.Module,
            surrogate: Model | None, gray_box_models: Mapping[str, Model], eot_samples: int,
            use_cache: bool) -> list[_Route]:
    """The attack runs of one (threat, attack, defense), each cached on disk under its attacked model's
    attacked_digest (white box: classifier, defense, its settings and gradient route together)."""
    from lib.attacks import attack_surface

    if threat != "white":
        model = surrogate if threat == "black" else gray_box_models.get(name, classifier)
        gradient = "surrogate" if threat == "black" else ("classifier" if model is classifier else "custom")
        return [_Route(threat, model, spec, gradient, use_cache, ("transfer", id(model)))]
    if defense.randomized and spec.name == "autoattack":   # AutoAttack's own EOT: its `rand` version
        params = {k: v for k, v in spec.params.items() if k not in ("version", "attacks")}
        rand = AttackSpec(spec.name, {**params, "version": "rand", "eot_iter": eot_samples}, spec.label, spec.l2_budget)
        return [_Route("white", attack_surface(classifier, defense), rand, _gradient_route(defense, eot_samples),
                       use_cache, ("white", name))]
    routes = [_Route("white", attack_surface(classifier, defense, eot_samples=eot_samples), spec,
                     _gradient_route(defense, eot_samples), use_cache, ("white", name))]
    if not defense.differentiable and defense.bpda_purify is not None:
        identity = attack_surface(classifier, defense, eot_samples=eot_samples, backward_fn=nn.Identity())
        routes.append(_Route("white-identity", identity, spec, _gradient_route(defense, eot_samples, identity=True),
                             use_cache, ("white-identity", name)))
    return routes


def _seed_of(*parts: Any) -> int:
    """A 32-bit seed determined by `parts` alone."""
    return int(cache.config_key(list(parts))[:8], 16)


def _gradient_route(defense: Defense, eot_samples: int, identity: bool = False) -> str:
    """How the white-box attacker differentiates the defense: `full` (exact), `BPDA-approx` (its own differentiable
    approximation), `BPDA` (identity backward), `+EOT-k` for a randomised defense averaged over k draws."""
    approx = defense.bpda_purify is not None and not identity
    route = "full" if defense.differentiable else ("BPDA-approx" if approx else "BPDA")
    return f"{route}+EOT-{eot_samples}" if defense.randomized and eot_samples > 1 else route


def _device_of(model: Model) -> torch.device:
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")
