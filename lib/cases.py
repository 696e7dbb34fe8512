"""The case list of the visualisation notebooks 06 (activation maps), 07 (Grad-CAM attention) and 08 (masks and
restorations): per available dataset, the test subset, the profile's target classifier and the shown defenses,
each built through `lib.defenses.registry.build` (trained once, then loaded from the caches).

Every case is analysed the same way: gray-box adversarial examples crafted on the target classifier (ignorant of the
defense, cached), so every defense purifies the same adversarial inputs; the defended prediction is the defense's
own `Built.classifier` on its purified input (SFM's fine-tuned classifier for SFM, the target classifier otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from lib import data
from lib.defenses.base import Built
from lib.defenses.registry import LABELS, build_each, defense_names
from lib.evaluate import AttackSpec, accuracy, adversarial_set, in_batches
from lib.notebook import Run
from lib.train import trained_classifier

# Registry entries whose purified input repeats another one's, so not shown unless a profile names them: no purifier
# at all (the adversarial input itself), or IDFR's denoiser (idfr_id's; its feature restorer acts inside the
# classifier, which these notebooks do not look into).
SAME_INPUT: dict[str, str] = {"none": "the adversarial input", "adv_training": "the adversarial input",
                              "idfr": "idfr_id's denoised input"}


def shown_defenses(names: list[str] | None = None) -> list[str]:
    """`names` when a profile lists them, else every registered defense whose purified input is its own."""
    return list(names) if names else [n for n in defense_names() if n not in SAME_INPUT]


@dataclass
class Case:
    """One dataset of a visualisation notebook: test subset, target classifier, built defenses, and how to use them."""

    dataset: str
    test: data.ImageData
    classifier: nn.Module
    defenses: dict[str, Built]
    device: torch.device
    batch_size: int

    @property
    def x(self) -> torch.Tensor:
        return self.test.x.to(self.device)

    @property
    def y(self) -> torch.Tensor:
        return self.test.y.to(self.device)

    @property
    def class_names(self) -> list[str]:
        return list(self.test.info.classes or [str(i) for i in range(self.test.info.num_classes)])

    @staticmethod
    def label(name: str) -> str:
        """The registry's display name of a defense."""
        return LABELS.get(name, name)

    def adversarial(self, spec: AttackSpec) -> torch.Tensor:
        """Gray-box adversarial examples of the test subset, crafted on the target classifier (cached)."""
        return adversarial_set(spec, self.classifier, self.x, self.y)[0]

    def purified(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every defense's purification of `x`, in mini-batches, on the case's device."""
        return {name: in_batches(built.defense.purify, x, batch_size=self.batch_size, device=self.device).to(self.device)
                for name, built in self.defenses.items()}

    def accuracy(self, x: torch.Tensor, defense: str | None = None) -> float:
        """Accuracy (%) on `x` of the target classifier, or of defense's own `Built.classifier` (x is then its
        purified input)."""
        model = self.classifier if defense is None else self.defenses[defense].classifier
        return accuracy(model, x, self.y, self.batch_size, self.device)


def visual_case(run: Run, dataset: str) -> Case:
    """The case of `dataset` in the notebook's profile section (`eval_size`, `defenses`), printing one line; a
    defense that cannot be built for `dataset` is recorded as skipped (lib.defenses.registry.build_each)."""
    profile: Mapping[str, Any] = run.profile
    test = data.load_dataset(dataset, "test", n=run.config["eval_size"], seed=profile["seed"])
    classifier, meta = trained_classifier(profile, dataset, "target", device=run.device)
    defenses = build_each(shown_defenses(run.config.get("defenses")), profile, dataset, classifier, skip=run.skip,
                          device=run.device)
    for built in defenses.values():
        built.defense.to(run.device).eval()
        built.classifier.to(run.device).eval()
    print(f"{dataset}: classifier test accuracy {meta['test_accuracy']:.1f}%, defenses: {', '.join(defenses)}")
    return Case(dataset, test, classifier, defenses, run.device, int(profile["eval_batch_size"]))


def visual_cases(run: Run) -> list[Case]:
    """The case of every dataset of the notebook's profile section; a missing dataset is recorded as skipped."""
    return list(run.per_dataset(visual_case).values())
