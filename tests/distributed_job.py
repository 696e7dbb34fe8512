"""The work of tests/test_distributed.py, run there in one process and here, under torchrun, by each of 2 gloo ranks:
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_job.py OUT` saves what each rank
got to OUT/rank<r>.pkl."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

CPU = torch.device("cpu")


def smoke_classifier() -> tuple[nn.Module, dict]:
    """The smoke profile's digits classifier: trained (data-parallel in a job) or loaded from the cache."""
    from lib.profiles import load_profile
    from lib.train import trained_classifier

    return trained_classifier(load_profile("smoke"), "digits", device=CPU)


def smoke_outcomes(classifier: nn.Module) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gray- and white-box PGD (random start) against no defense and TVM (randomised: EOT, seeded draws) on 24 test
    images in chunks of 8: 3 chunks, one for rank 0 and two for rank 1."""
    from lib.data import load_dataset
    from lib.defenses import registry
    from lib.defenses.base import NoDefense
    from lib.evaluate import AttackSpec, threat_outcomes
    from lib.profiles import load_profile

    test = load_dataset("digits", "test", n=24, seed=0)
    defenses = {"none": NoDefense(), "tvm": registry.build("tvm", load_profile("smoke"), "digits", classifier).defense}
    return threat_outcomes(classifier, defenses, test.x, test.y, [AttackSpec("pgd", {"eps": 0.15, "steps": 2}, "PGD")],
                           threats=("gray", "white"), eot_samples=2, batch_size=8, device=CPU)


def parallel_steps() -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Two epochs of plain SGD on 15 examples in batches of 8 (shares 4 + 4, then 4 + 3 rows): weights, history."""
    from lib.train import fit, tensor_batches

    torch.manual_seed(0)
    x, y = torch.randn(15, 5), torch.randint(0, 3, (15,))
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    history = fit(step, lambda epoch: tensor_batches(x, y, batch_size=8, seed=epoch), epochs=2,
                  modules={"model": model}, optimizers={"model": opt}, device=CPU)
    return {k: v.clone() for k, v in model.state_dict().items()}, history


def tiny_cached_model() -> tuple[nn.Module, dict]:
    """A small linear model trained for one epoch through lib.train.cached_model (cache key without process count)."""
    from lib.train import cached_model, fit, tensor_batches

    def train(model: nn.Module, partial: Path) -> dict:
        torch.manual_seed(0)
        x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            return {}

        fit(step, lambda epoch: tensor_batches(x, y, batch_size=16, seed=epoch), epochs=1, modules={"m": model},
            optimizers={"m": opt}, device=CPU, checkpoint=partial)
        return {}

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    return cached_model("tests/tiny", {"what": "tiny linear"}, build, train, device=CPU)


def crafting_calls(fn):
    """fn()'s result and how many times it ran an attack on a batch (lib.attacks.generate)."""
    import lib.attacks as attacks

    calls, generate = [], attacks.generate
    attacks.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    try:
        return fn(), len(calls)
    finally:
        attacks.generate = generate


if __name__ == "__main__":
    from lib import distributed
    from lib.evaluate import model_digest

    assert distributed.init_from_env() and distributed.world_size() == 2
    torch.set_num_threads(1)
    tiny, tiny_meta = tiny_cached_model()
    classifier, meta = smoke_classifier()
    (rows, examples), calls = crafting_calls(lambda: smoke_outcomes(classifier))
    weights, history = parallel_steps()
    result = {"tiny_meta": tiny_meta, "meta": meta, "digest": model_digest(classifier), "rows": rows,
              "examples": examples, "calls": calls, "weights": weights, "history": history}
    with open(Path(sys.argv[1]) / f"rank{distributed.rank()}.pkl", "wb") as fh:
        pickle.dump(result, fh)
