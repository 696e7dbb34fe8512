"""The attacks of ARN's tables as configuration: the profile's budgets, the named attack suite, the data subsets,
and crafting (cached) through lib.evaluate. The attacks themselves live in lib.attacks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lib.defenses.base import NotBuiltForDataset
from lib.runtime import get_device
from lib.validate import check_labels

if TYPE_CHECKING:
    from lib.data import ImageData
    from lib.evaluate import AttackSpec

NOTEBOOK = "05_attack_invariant_arn"
# the seen attacks of each training setting: PP (PGD_N + PGD_T, the main one), DP (DDN_N + PGD_N), PS (PGD_N + STA_N)
SEEN: dict[str, tuple[str, ...]] = {"PP": ("PGD_N", "PGD_T"), "DP": ("DDN_N", "PGD_N"), "PS": ("PGD_N", "STA_N")}


def budgets(cfg: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """A dataset's entry of the section's per_dataset: paper_dataset, eps, eps_prime, eps_white, alpha."""
    per_dataset = cfg.get("per_dataset", {})
    if dataset not in per_dataset:
        raise NotBuiltForDataset(f"no ARN budgets for dataset {dataset!r}; per_dataset has: {', '.join(sorted(per_dataset))}")
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


def pick_targets(y: torch.Tensor, n_classes: int, seed: int = 0, mode: str = "random") -> torch.Tensor:
    """Target labels for targeted attacks: uniformly random != y (fixed seed), or 'fixed3' (3, or 1 where y == 3)."""
    check_labels(y, len(y))
    if mode == "fixed3":
        return torch.where(y == 3, torch.ones_like(y), torch.full_like(y, 3))
    if mode != "random":
        raise ValueError(f"mode must be 'random' or 'fixed3', got {mode!r}")
    offset = torch.randint(1, n_classes, y.shape, generator=torch.Generator().manual_seed(seed))
    return (y.cpu() + offset) % n_classes


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
