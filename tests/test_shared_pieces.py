"""The pieces every paper package shares: the training loop, batch apply, the ours-beside-paper join,
the defense contract's base classes and the notebook setup."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from lib.defenses.base import Built, Compose, Defense, NoDefense
from lib.defenses.squeeze import BitDepthReduction, MedianFilter
from lib.evaluate import in_batches
from lib.notebook import setup
from lib.reference import beside_paper, load_reference, stand_in_label
from lib.train import constant_lr, cosine_lr, descend, fit, tensor_batches


def _regression_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]])


def _fit_linear(epochs: int, checkpoint=None, stop_after: int | None = None):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _regression_problem()
    calls = []

    def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, float]:
        calls.append(len(xb))
        return {"loss": descend(opt, ((model(xb) - yb) ** 2).mean())}

    def batches(epoch: int):
        if stop_after is not None and epoch >= stop_after:
            raise KeyboardInterrupt
        return tensor_batches(x, y, batch_size=16, seed=epoch)

    history = fit(step, batches, epochs=epochs, modules={"m": model}, optimizers={"m": opt},
                  device=torch.device("cpu"), checkpoint=checkpoint, epoch_end=lambda e: {"seen": len(calls)})
    return model, opt, history


def test_fit_lowers_the_loss_applies_the_schedule_and_logs_epoch_extras():
    model, opt, history = _fit_linear(epochs=4)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert [h["lr"] for h in history] == pytest.approx([0.1 * cosine_lr(e, 4) for e in range(4)])
    assert [h["seen"] for h in history] == [4, 8, 12, 16]      # 64 images in batches of 16
    assert not model.training
    assert constant_lr(3, 4) == 1.0


def test_fit_resumes_an_interrupted_run_to_the_same_weights(tmp_path):
    reference, _, full = _fit_linear(epochs=4)
    checkpoint = tmp_path / "partial.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit_linear(epochs=4, checkpoint=checkpoint, stop_after=2)
    resumed, _, history = _fit_linear(epochs=4, checkpoint=checkpoint)
    assert len(history) == 4
    assert torch.equal(resumed.weight, reference.weight) and torch.equal(resumed.bias, reference.bias)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full])


def test_tensor_batches_cover_every_row_once_aligned():
    x, y = torch.arange(10.0), torch.arange(10) * 2
    seen = list(tensor_batches(x, y, batch_size=4, seed=1))
    assert [len(b[0]) for b in seen] == [4, 4, 2]
    xs, ys = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
    assert sorted(xs.tolist()) == list(range(10)) and torch.equal(ys, xs.long() * 2)


def test_in_batches_matches_one_call_and_returns_cpu_without_grad():
    x = torch.rand(10, 1, 4, 4, requires_grad=True)
    out = in_batches(lambda a, b: a * b, x, 2 * torch.ones_like(x), batch_size=3)
    assert torch.equal(out, (2 * x).detach()) and not out.requires_grad and out.device.type == "cpu"


def test_beside_paper_like_for_like_and_stand_in():
    ref = load_reference("reconstruction", "table2")
    key = ref.iloc[0]
    ours = pd.DataFrame([{c: key[c] for c in ("model", "defense", "attack", "eps")} | {"value": 50.0}])
    same = beside_paper(ours, ref, ["model", "defense", "attack", "eps"],
                        paper_setting={"dataset": "F-MNIST"}, ours_setting={"dataset": "fashion_mnist"})
    assert list(same.columns[-3:]) == ["ours", "paper", "diff"]
    row = same[same["ours"].notna()].iloc[0]
    assert row["diff"] == pytest.approx(50.0 - key["value"])
    other = beside_paper(ours, ref, ["model", "defense", "attack", "eps"],
                         paper_setting={"dataset": "F-MNIST"}, ours_setting={"dataset": "digits"})
    assert "diff" not in other.columns and "paper (F-MNIST; ours digits)" in other.columns
    assert stand_in_label({"dataset": "CIFAR10", "model": "ResNet18"},
                          {"dataset": "cifar10", "model": "ResNet18"}) is None
    assert stand_in_label({"dataset": "CIFAR-10", "model": "ResNet18"},
                          {"dataset": "cifar10", "model": "SmallCNN"}) == "paper (ResNet18; ours SmallCNN)"


def test_built_fills_the_metadata_and_gives_the_defended_model():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    built = Built(BitDepthReduction(1), classifier, {"train_seconds": 3.0})
    assert built.meta == {"config": {}, "train_seconds": 3.0, "cache_key": None}
    x = torch.rand(5, 1, 2, 2)
    assert torch.equal(built.model()(x), classifier(built.defense.purify(x)))


def test_compose_flags_bpda_and_stages():
    x = torch.rand(2, 1, 6, 6)
    differentiable = Compose(MedianFilter(2), NoDefense())
    assert differentiable.differentiable and differentiable.bpda_purify is None
    quantised = Compose(MedianFilter(2), BitDepthReduction(2))
    assert not quantised.differentiable
    stages = quantised.stages(x)
    assert list(stages) == ["after MedianFilter"] and stages["after MedianFilter"].shape == x.shape
    assert torch.equal(quantised.purify(x), BitDepthReduction(2).purify(MedianFilter(2).purify(x)))
    if quantised.bpda_purify is not None:    # chained approximations keep the forward value
        x_var = x.clone().requires_grad_(True)
        out = quantised.bpda_purify(x_var)
        out.sum().backward()
        assert torch.allclose(out, quantised.purify(x), atol=1e-6) and x_var.grad is not None


def test_defense_base_defaults():
    class Identity(Defense):
        def purify(self, x: torch.Tensor) -> torch.Tensor:
            return x

    d = Identity()
    assert d.differentiable and not d.randomized and d.bpda_purify is None and d.stages(torch.zeros(1)) == {}


def test_setup_and_per_dataset_record_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_RESULTS_DIR", str(tmp_path))
    run = setup("smoke", "06_activation_maps")
    assert run.out == tmp_path / "smoke" / "06_activation_maps" and run.config["datasets"]
    results = run.per_dataset(lambda r, d: d.upper(), ["digits", "no_such_set"])
    assert results == {"digits": "DIGITS"}
    skips = json.loads((run.out / "skipped.json").read_text())
    assert [s["what"] for s in skips] == ["dataset no_such_set"]
    with pytest.raises(RuntimeError, match="none of the datasets"):
        run.per_dataset(lambda r, d: d, ["no_such_set"])
