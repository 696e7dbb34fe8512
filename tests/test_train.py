import os
import time
from pathlib import Path

import pytest
import torch

from lib import cache
from lib.data import load_dataset
from lib.profiles import load_profile
from lib.train import TrainConfig, augment_batch, cached_model, fit_classifier, trained_classifier
from tests.conftest import make_digits_cnn


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADV_CACHE_DIR", str(tmp_path / "cache"))


def _small_data():
    return load_dataset("digits", "train", n=300)


def test_training_lowers_the_loss_and_is_deterministic():
    data, cfg = _small_data(), TrainConfig(epochs=3, batch_size=50, lr=3e-3, seed=0)
    torch.manual_seed(0)
    a = make_digits_cnn(8)
    history = fit_classifier(a, data, cfg, device=torch.device("cpu"))
    assert history[-1]["loss"] < history[0]["loss"]
    torch.manual_seed(0)
    b = make_digits_cnn(8)
    fit_classifier(b, data, cfg, device=torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    data, cfg = _small_data(), TrainConfig(epochs=3, batch_size=50, lr=3e-3)
    torch.manual_seed(0)
    reference = make_digits_cnn(8)
    fit_classifier(reference, data, cfg, device=torch.device("cpu"))

    calls = {"n": 0}

    def crashing_loss(model, x, y):
        calls["n"] += 1
        if calls["n"] == 8:  # during the second epoch (6 batches per epoch)
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(model(x), y)

    ckpt = tmp_path / "run.partial.pt"
    torch.manual_seed(0)
    model = make_digits_cnn(8)
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(model, data, cfg, device=torch.device("cpu"), checkpoint=ckpt, loss_fn=crashing_loss)
    assert cache.load(ckpt)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run.partial.pt"]  # no temporary files left behind

    torch.manual_seed(123)  # a fresh process would start from different random weights
    resumed = make_digits_cnn(8)
    fit_classifier(resumed, data, cfg, device=torch.device("cpu"), checkpoint=ckpt)
    for p, q in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6)


def test_cached_model_trains_once_then_loads(tmp_path):
    calls = []

    def train(model, partial):
        calls.append(partial)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"note": "trained"}

    build = lambda: make_digits_cnn(4)  # noqa: E731
    torch.manual_seed(0)
    first, meta1 = cached_model("unit", {"a": 1}, build, train, device=torch.device("cpu"))
    torch.manual_seed(1)
    second, meta2 = cached_model("unit", {"a": 1}, build, train, device=torch.device("cpu"))
    assert len(calls) == 1 and not meta1["cache_hit"] and meta2["cache_hit"] and meta2["note"] == "trained"
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    cached_model("unit", {"a": 2}, build, train, device=torch.device("cpu"))
    assert len(calls) == 2  # another configuration is another entry


def test_failed_training_leaves_no_cache_entry():
    def train(model, partial):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_model("unit", {"b": 1}, lambda: make_digits_cnn(4), train, device=torch.device("cpu"))
    root = cache.cache_root() / "unit"
    assert not root.exists() or not any(root.glob("*.pt"))


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    cache.atomic_save({"w": torch.ones(2)}, target)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        cache.atomic_save({"w": torch.zeros(2)}, target)
    assert torch.equal(cache.load(target)["w"], torch.ones(2))  # old entry intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_cache_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"f": print}, path)
    with pytest.raises(Exception):
        cache.load(path)


def test_augmentation_keeps_shape_and_range():
    x = torch.rand(16, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(epochs=0)


def test_profile_classifier_is_accurate_and_cached():
    profile = load_profile("smoke")
    model, meta = trained_classifier(profile, "digits", device=torch.device("cpu"))
    assert meta["test_accuracy"] > 85.0 and not meta["cache_hit"]
    again, meta2 = trained_classifier(profile, "digits", device=torch.device("cpu"))
    assert meta2["cache_hit"] and meta2["test_accuracy"] == meta["test_accuracy"]
    with pytest.raises(ValueError, match="valid roles"):
        trained_classifier(profile, "digits", role="teacher")


def _entry_of(namespace: str) -> Path:
    (entry,) = (cache.cache_root() / namespace).glob("*.pt")
    return entry


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble", "nan"])
def test_damaged_cache_entry_is_named_moved_aside_and_recomputed(damage):
    namespace = f"unit_damaged_{damage}"
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(64, dtype=torch.float32)}

    first = cache.cached_tensors(namespace, {"k": 1}, compute)
    path = _entry_of(namespace)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garble":   # flip bytes inside the tensor data: still loadable, caught by the digest
        at = raw.index(torch.arange(64, dtype=torch.float32).numpy().tobytes()[8:16])
        path.write_bytes(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 8]) + raw[at + 8:])
    else:                      # a loadable entry whose stored digest is right but whose numbers are NaN
        cache.atomic_save({"x": torch.full((64,), float("nan"))}, path)
    with pytest.warns(RuntimeWarning, match=str(path.name)):
        again = cache.cached_tensors(namespace, {"k": 1}, compute)
    assert len(calls) == 2 and torch.equal(again["x"], first["x"])
    assert path.with_name(path.name + ".corrupt").is_file()
    assert torch.equal(cache.load(path)["x"], first["x"])     # the recomputed entry is sound


def test_orphaned_temporary_files_are_removed_and_writes_are_readable_by_others(tmp_path, monkeypatch):
    old, fresh = tmp_path / "a.pt.x1.tmp", tmp_path / "b.pt.x2.tmp"
    for f in (old, fresh):
        f.write_bytes(b"partial")
    os.utime(old, (time.time() - 2 * cache.ORPHAN_SECONDS,) * 2)
    assert cache.remove_orphans(tmp_path) == [old] and fresh.exists()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        monkeypatch.setattr(cache, "_UMASK", umask)
        cache.atomic_write_text("hello", tmp_path / "t.md")
        assert (tmp_path / "t.md").stat().st_mode & 0o777 == mode


def test_cached_model_whose_shapes_do_not_fit_is_moved_aside_and_retrained():
    trained = []

    def train(model, partial):
        trained.append(1)
        return {}

    cached_model("unit_shapes", {"s": 1}, lambda: make_digits_cnn(4), train, device=torch.device("cpu"))
    path = _entry_of("unit_shapes")
    entry = cache.load(path)
    entry["state_dict"] = {k: v[:1] if v.dim() else v for k, v in entry["state_dict"].items()}   # damaged shapes
    cache.atomic_save(entry, path)
    with pytest.warns(RuntimeWarning, match="do not fit the model"):
        model, meta = cached_model("unit_shapes", {"s": 1}, lambda: make_digits_cnn(4), train,
                                   device=torch.device("cpu"))
    assert len(trained) == 2 and not meta["cache_hit"] and path.with_name(path.name + ".corrupt").is_file()
